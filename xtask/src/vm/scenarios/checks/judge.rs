//! The next owner's drivers judging the card, and the golden traces they are judged against.
use crate::vm::records::SimReport;
use anyhow::{Context as _, bail, ensure};

use super::host::guest_kernel;
use super::journal::{self, actions};
use crate::vm::qemu::section;
use crate::vm::scenarios::{Judge, MHI_ENDS, Run};

/// The driver's verdict on the card as the VM left it (the users' failures: it never reaches
/// its firmware download) and after qcom-reset's reset (it does, and stops at the missing file).
pub(crate) fn check_driver_judge(
    run: &Run,
    console: &str,
    sim: Option<&SimReport>,
) -> anyhow::Result<Vec<String>> {
    const FW: &str = "Direct firmware load for qcom/sdx65m/xbl.elf failed with error -2";
    let messages = |name: &str| -> Vec<String> {
        section(console, name)
            .iter()
            .filter(|l| l.contains("mhi") || l.contains("VMLAB judged"))
            .map(|l| l.split_once("] ").map_or(*l, |(_, m)| m).trim().to_string())
            .collect()
    };
    let (before, after) = (messages("judge-before"), messages("judge-after"));
    let has = |log: &[String], s: &str| log.iter().any(|l| l.contains(s));
    ensure!(
        has(&before, "MHI PCI device found") && has(&after, "MHI PCI device found"),
        "mhi-pci-generic did not probe the card: {before:?} / {after:?}"
    );
    ensure!(
        !has(&before, FW),
        "the driver reached its firmware download on the card as the VM left it: {before:?}"
    );
    let failure = match run.state {
        "crashed" => Some("RAMDUMP DOWNLOAD MODE is not a valid EE for power on"),
        "stuck" => Some("Device failed to clear MHI Reset"),
        _ => None,
    };
    match failure {
        Some(f) => ensure!(
            has(&before, f),
            "expected {f:?} from the driver: {before:?}"
        ),
        // A previous owner's live session: 6.1 waits for mission mode and gives up; 7.x powers
        // up and then waits, silently, for state events the session never sends.
        None => ensure!(
            has(&before, "failed to power up MHI controller")
                || has(&before, "Power on setup success"),
            "the driver neither gave up nor powered up: {before:?}"
        ),
    }
    let acts = actions(console)?;
    ensure!(
        acts.first()
            .is_some_and(|a| a.result == journal::Outcome::Clean),
        "the agent's reset: {acts:?}"
    );
    ensure!(
        has(&after, FW),
        "after qcom-reset's reset the driver did not reach its firmware download: {after:?}"
    );
    // 6.1 probes synchronously and reports the failed download as a failed power-up too.
    let state_failures = &MHI_ENDS[2..];
    let wrong: Vec<&String> = after
        .iter()
        .filter(|l| state_failures.iter().any(|f| l.contains(f)))
        .collect();
    ensure!(
        wrong.is_empty(),
        "after the reset the driver still failed: {wrong:?}"
    );
    let gist = |log: &[String]| {
        log.iter()
            .filter(|l| {
                MHI_ENDS.iter().chain([&FW]).any(|e| l.contains(e)) || l.contains("VMLAB judged")
            })
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    };
    Ok(vec![
        format!("as the VM left it ({}): {}", run.state, gist(&before)),
        format!("after qcom-reset's reset: {}", gist(&after)),
        golden_trace(run, console, sim)?,
    ])
}
/// The offsets the driver read that the register model does not know (the simulator answers
/// 0), per kernel and starting state, against `xtask/src/vm/golden/<scenario>.txt`: a kernel
/// whose driver reads elsewhere is noticed. `VMLAB_BLESS=1` writes what was seen.
pub(crate) fn golden_trace(
    run: &Run,
    console: &str,
    sim: Option<&SimReport>,
) -> anyhow::Result<String> {
    let (major, minor) = guest_kernel(console)?;
    let key = format!("{major}.{minor} {}", run.state);
    let seen: Vec<String> = sim
        .context("no simulator report")?
        .beyond_model
        .iter()
        .map(|o| format!("{o:#x}"))
        .collect();
    let line = format!("{key} {}", seen.join(" ")).trim_end().to_string();
    let path = crate::workspace_root()
        .join("xtask/src/vm/golden")
        .join(format!("{}.txt", run.scenario.name()));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let known = text.lines().find(|l| {
        l.strip_prefix(&key)
            .is_some_and(|r| r.is_empty() || r.starts_with(' '))
    });
    if known == Some(line.as_str()) {
        return Ok(format!(
            "reads beyond the model, as on record: {}",
            seen.join(" ")
        ));
    }
    if std::env::var_os("VMLAB_BLESS").is_some() {
        let mut lines: Vec<&str> = text.lines().filter(|l| Some(*l) != known).collect();
        lines.push(&line);
        lines.sort();
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        std::fs::write(&path, lines.join("\n") + "\n")?;
        return Ok(format!("recorded in {}: {line}", path.display()));
    }
    bail!(
        "the driver's reads beyond the register model changed: {line:?}, on record {known:?} in {} (VMLAB_BLESS=1 records them)",
        path.display()
    )
}
/// How far a WLAN driver gets against the register model: recorded, with the one thing it must
/// show (it probed the card, as the VM left it and after the reset).
pub(crate) fn check_wlan_judge(
    run: &Run,
    console: &str,
    sim: Option<&SimReport>,
    j: &Judge,
) -> anyhow::Result<Vec<String>> {
    let lines = |name: &str| -> Vec<String> {
        section(console, name)
            .iter()
            .filter(|l| l.contains("ath1") || l.contains("mhi") || l.contains("VMLAB judged"))
            .map(|l| l.split_once("] ").map_or(*l, |(_, m)| m).trim().to_string())
            .collect()
    };
    let (before, after) = (lines("judge-before"), lines("judge-after"));
    ensure!(
        !before.is_empty() && !after.is_empty(),
        "{} said nothing about the card",
        j.module
    );
    // The driver resets the SoC itself at power-up (ath1xk_pci_sw_reset), then loads the
    // firmware through MHI's BHI: after qcom-reset's reset it gets there.
    let fw = format!(
        "Direct firmware load for {} failed with error -2",
        j.firmware
    );
    let reached = |log: &[String]| log.iter().any(|l| l.contains(&fw));
    ensure!(
        reached(&after),
        "after qcom-reset's reset {} did not reach its firmware download: {after:?}",
        j.module
    );
    let last = |log: &[String]| {
        log.iter()
            .filter(|l| !l.contains("firmware-2.bin") && !l.contains("VMLAB"))
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    };
    Ok(vec![
        format!(
            "as the VM left it ({}): firmware download reached: {}; {}",
            run.state,
            reached(&before),
            last(&before)
        ),
        format!("after qcom-reset's reset: {}", last(&after)),
        golden_trace(run, console, sim)?,
    ])
}
