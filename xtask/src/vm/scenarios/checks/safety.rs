//! Never harm the host: held cards, faults, graceful stops, binds, observe-only, ownership,
//! SIGKILL, hand-over to a host driver, a reloaded vfio-pci.
use anyhow::{Context as _, bail, ensure};

use super::check_sim;
use super::journal::{self, actions};
use super::loops::kernel_device_specific_resets;
use crate::vm::qemu::section;
use crate::vm::records::{
    Kind, PortReading, SimReport, crash_record, journal_events, port_readings,
};

/// How a WLAN card's release ends: the agent's reset (3 writes), or, where the kernel reset it
/// at open and release (7.4's device-specific reset, 3 writes each), the verification of that
/// reset. (kernel resets, trigger, result, the agent's writes)
fn wlan_release_end(
    console: &str,
) -> anyhow::Result<(usize, journal::Trigger, journal::Outcome, usize)> {
    let kernel = kernel_device_specific_resets(console)?;
    Ok(if kernel > 0 {
        (
            kernel,
            journal::Trigger::KernelReset,
            journal::Outcome::NothingToDo,
            0,
        )
    } else {
        (
            kernel,
            journal::Trigger::Release,
            journal::Outcome::Clean,
            3,
        )
    })
}

pub(crate) fn check_held(console: &str, sim: Option<&SimReport>) -> anyhow::Result<Vec<String>> {
    let cli = section(console, "cli").join("\n");
    ensure!(
        cli.contains("is held by pid") && cli.contains("cli-rc=75"),
        "the CLI did not refuse the held device: {cli}"
    );
    // The open's own reset calls are explained by the open: nothing to answer while the VM
    // holds the card, and its release is answered once: reset, or, where the kernel reset it
    // at open and release (7.4's device-specific reset), verified.
    let (kernel, trigger, result, ours) = wlan_release_end(console)?;
    let acts = actions(console)?;
    ensure!(
        acts.len() == 1 && acts[0].trigger == trigger && acts[0].result == result,
        "expected one action, the release's {trigger:?} -> {result:?}: {acts:?}"
    );
    check_sim(sim, "wlan", ours + 3 * kernel)?;
    let refusal = cli
        .lines()
        .find(|l| l.contains("is held by pid"))
        .unwrap_or("");
    Ok(vec![
        format!("while held: the CLI refused ({refusal}); the agent did nothing"),
        format!("after the release: {trigger:?} -> {result:?}; the kernel's own resets: {kernel}"),
    ])
}
pub(crate) fn check_fault(console: &str, sim: Option<&SimReport>) -> anyhow::Result<Vec<String>> {
    let acts = actions(console)?;
    let results: Vec<journal::Outcome> = acts.iter().map(|a| a.result).collect();
    ensure!(
        results
            == [
                journal::Outcome::LinkDown,
                journal::Outcome::LinkDown,
                journal::Outcome::Skipped
            ],
        "actions: {results:?}"
    );
    ensure!(acts[2].detail.contains("gave up after 2"), "{:?}", acts[2]);
    // On a kernel with the device-specific reset, that reset at the VM's open is the one that
    // takes the link (its poll times out): the agent finds config space all-ones from its first
    // read, so it saves, writes and restores nothing.
    let kernel_took_link = journal_events(console)?
        .iter()
        .any(|j| j.event.function == "pci_dev_specific_reset" && j.event.ret == -110);
    if kernel_took_link {
        return check_fault_after_kernel(&acts, console, sim);
    }
    let restored = acts[0]
        .report()?
        .restored
        .command
        .map(u64::from)
        .context("PCI_COMMAND not restored")?;
    let now = console
        .lines()
        .find_map(|l| l.split("VMLAB pci_command=").nth(1))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("guest did not print PCI_COMMAND")?;
    // The ivshmem card's config space is QEMU's and keeps the restored value; the vfio-user
    // card's link stays down, so config reads all-ones there, as a host would read it.
    let faithful = !console.contains("(0x1af4 0x1110)");
    let want = if faithful { 0xffff } else { restored };
    ensure!(
        now == want,
        "PCI_COMMAND is {now:#x}, expected {want:#x} (the agent restored {restored:#x})"
    );
    let sim = sim.context("no simulator report")?;
    ensure!(sim.resets == 1 && !sim.link_up, "simulator: {sim:?}");
    if sim.writes.len() != 2 {
        bail!("expected 2 writes (one global reset), got {:?}", sim.writes);
    }
    Ok(vec![format!(
        "2 attempts, both link-down, then: {:?}; PCI_COMMAND restored to {restored:#06x}, reads {now:#06x}",
        acts[2].detail
    )])
}
pub(crate) fn check_fault_after_kernel(
    acts: &[journal::Action],
    console: &str,
    sim: Option<&SimReport>,
) -> anyhow::Result<Vec<String>> {
    for a in &acts[..2] {
        let r = a.report()?;
        ensure!(
            r.ops.is_empty() && r.restored.command.is_none() && r.restored.config.is_empty(),
            "a card gone before the session started gets no write and no restore: {a:?}"
        );
    }
    ensure!(
        console.contains("VMLAB pci_command=ffff"),
        "config space does not read all-ones"
    );
    let sim = sim.context("no simulator report")?;
    ensure!(
        sim.resets == 1 && !sim.link_up && sim.writes.len() == 2,
        "the kernel's global reset (assert, deassert) and nothing after: {sim:?}"
    );
    Ok(vec![format!(
        "the kernel's reset at open took the link for good (-ETIMEDOUT); 2 attempts found it down, wrote nothing, then: {:?}",
        acts[2].detail
    )])
}
pub(crate) fn check_graceful(
    console: &str,
    sim: Option<&SimReport>,
) -> anyhow::Result<Vec<String>> {
    // Where the kernel reset the card as the device closed (7.4), the wait is for the
    // verification of that reset, which finds it clean and writes nothing.
    let (kernel, trigger, result, ours) = wlan_release_end(console)?;
    let acts = actions(console)?;
    let done: Vec<&journal::Action> = acts.iter().filter(|a| a.result == result).collect();
    ensure!(done.len() == 1, "expected one {result:?}: {acts:?}");
    ensure!(done[0].trigger == trigger, "{:?}", done[0]);
    let waiting = acts
        .iter()
        .find(|a| {
            a.trigger == trigger
                && a.result == journal::Outcome::Skipped
                && a.detail.contains("held by pid")
                && a.detail.contains("waiting up to")
        })
        .with_context(|| format!("the {trigger:?} did not wait for the group: {acts:?}"))?;
    ensure!(
        acts.len() == 2,
        "expected the wait and its answer: {acts:?}"
    );
    let waited = done[0].ts_ms.saturating_sub(waiting.ts_ms);
    ensure!(
        waited >= 2000,
        "{result:?} {waited} ms after the refusal: before the group was closed?"
    );
    check_sim(sim, "wlan", ours + 3 * kernel)?;
    Ok(vec![
        format!("device closed, group kept: {:?}", waiting.detail),
        format!(
            "group closed: {trigger:?} -> {result:?} {waited} ms later; the kernel's own resets: {kernel}"
        ),
    ])
}
pub(crate) fn check_bind(console: &str, sim: Option<&SimReport>) -> anyhow::Result<Vec<String>> {
    let acts = actions(console)?;
    ensure!(acts.len() == 1, "expected one action: {acts:?}");
    let a = &acts[0];
    ensure!(
        a.trigger == journal::Trigger::Bind && a.result == journal::Outcome::Clean,
        "action: {a:?}"
    );
    let opened = journal_events(console)?
        .iter()
        .any(|j| j.event.kind == Kind::Open);
    ensure!(!opened, "the device was opened before its reset");
    // Where the kernel has the device-specific reset, the agent asks for it instead of its own.
    let log = section(console, "agent-log").join("\n");
    let method = if log.contains("regime=kernel-device-specific") {
        journal::Method::KernelDeviceSpecific
    } else {
        journal::Method::RegisterSequence
    };
    ensure!(
        a.method() == Some(method),
        "reset by {:?}, not {method:?}",
        a.method()
    );
    check_sim(sim, "modem", 1)?;
    Ok(vec![format!(
        "bound to vfio-pci -> reset in {:.1} ms, before any open: {}",
        a.latency_ms.unwrap_or(f64::NAN),
        a.detail
    )])
}
pub(crate) fn check_observe(console: &str, sim: Option<&SimReport>) -> anyhow::Result<Vec<String>> {
    let line = |tag: &str| {
        console
            .lines()
            .find_map(|l| l.split(&format!("VMLAB {tag} ")).nth(1))
            .map(str::trim)
            .map(String::from)
            .with_context(|| format!("guest did not print its {tag} state"))
    };
    let (before, after) = (line("before")?, line("after-rescan")?);
    ensure!(
        before == after,
        "the observe-only rescan changed the device: {before} -> {after}"
    );
    let acts = actions(console)?;
    let results: Vec<(journal::Trigger, journal::Outcome)> =
        acts.iter().map(|a| (a.trigger, a.result)).collect();
    // Where the kernel resets the card at open and release (7.4), the release is one to
    // verify, which observe-only cannot do on a runtime-suspended card: skipped, not woken.
    let kernel = kernel_device_specific_resets(console)?;
    let release = if kernel > 0 {
        (journal::Trigger::KernelReset, journal::Outcome::Skipped)
    } else {
        (journal::Trigger::Release, journal::Outcome::DryRun)
    };
    ensure!(
        results.contains(&(journal::Trigger::Rescan, journal::Outcome::Skipped))
            && results.contains(&release),
        "actions: {acts:?}"
    );
    check_sim(sim, "wlan", 3 * kernel)?;
    // SIGHUP with observe_only turned off in the file: the timing applies, the mode waits for a
    // restart (the release above was still a dry run), and the agent runs on.
    let log = section(console, "agent-log").join("\n");
    ensure!(
        log.contains("configuration reloaded: debounce_ms applied")
            && log.contains("observe_only changed only at the next restart"),
        "the reload was not reported: {log}"
    );
    Ok(vec![
        "SIGHUP reloaded debounce_ms and kept observe-only until a restart".into(),
        format!("rescan and release wrote nothing: {before} before and after"),
        format!("the simulator received only the kernel's {kernel} reset(s)"),
    ])
}
pub(crate) fn check_own(console: &str, sim: Option<&SimReport>) -> anyhow::Result<Vec<String>> {
    let vm = section(console, "vm").join("\n");
    ensure!(
        vm.contains("EBUSY") && !vm.contains("vm-rc=0"),
        "a VM opened the device during the reset: {vm}"
    );
    // The second VM opened the card while the verification polled with the group let go.
    let vm2 = section(console, "vm2").join("\n");
    ensure!(
        vm2.contains("vm2-rc=0"),
        "a VM starting during the verification was refused: {vm2}"
    );
    let acts = actions(console)?;
    let results: Vec<journal::Outcome> = acts.iter().map(|a| a.result).collect();
    let taken = acts
        .iter()
        .find(|a| a.result == journal::Outcome::Taken)
        .with_context(|| format!("the reset was not reported taken by the VM: {results:?}"))?;
    // Named by the kernel's EBUSY when the group was taken back, after the VM's BAR mapping
    // revoked the session's own (Debian's CONFIG_IO_STRICT_DEVMEM): no SIGBUS death.
    ensure!(taken.detail.contains("vmlab-guest"), "taken: {taken:?}");
    // Then the VM's own release is an episode of its own: reset (or, where the kernel resets
    // at release, verified) clean.
    let after = results
        .iter()
        .skip_while(|r| **r != journal::Outcome::Taken)
        .skip(1);
    ensure!(
        after
            .clone()
            .any(|r| matches!(r, journal::Outcome::Clean | journal::Outcome::NothingToDo)),
        "the VM's release was not answered: {results:?}"
    );
    // One sequence (or in-session kernel reset) per reset of ours, taken or clean; on a kernel
    // with the device-specific reset the SoC missed its first two (the scenario's fault).
    let ours = results
        .iter()
        .filter(|r| matches!(r, journal::Outcome::Taken | journal::Outcome::Clean))
        .count();
    check_sim(sim, "modem", ours + kernel_device_specific_resets(console)?)?;
    let log = section(console, "agent-log").join("\n");
    ensure!(
        log.contains("nothing more is written to it"),
        "the agent did not stop writing when the VM took the card: {log}"
    );
    Ok(vec![
        format!(
            "a VM starting mid-reset was refused: {}",
            vm.lines().find(|l| l.contains("EBUSY")).unwrap_or("").trim()
        ),
        "a VM starting during the verification (group let go) started; the reset was reported taken, nothing written after, and the VM's release reset".into(),
        format!("actions: {results:?}"),
    ])
}
pub(crate) fn check_kill(console: &str) -> anyhow::Result<Vec<String>> {
    let state = |tag: &str| {
        console
            .lines()
            .find_map(|l| l.split(&format!("VMLAB {tag} ")).nth(1))
            .map(|s| s.trim().to_string())
            .with_context(|| format!("guest did not print its {tag} state"))
    };
    let (killed, recovered) = (state("killed")?, state("recovered")?);
    let record = crash_record(console, "record").context("the killed agent left none")?;
    let cmd = record.command.context("record without PCI_COMMAND")?;
    let power = record.power_control.as_deref().unwrap_or("on");
    let want = format!("pci_command={cmd:04x} power={power}");
    ensure!(
        killed != want && killed.contains("power=on"),
        "the kill left nothing to restore? {killed} (record {record:?})"
    );
    ensure!(
        recovered == want,
        "after the restart: {recovered}, the record says {want}"
    );
    ensure!(
        !console.contains("VMLAB record still there"),
        "the record was not removed"
    );
    let mut notes = vec![
        format!("killed mid-sequence: {killed}"),
        format!("restarted agent restored {recovered} from the record"),
    ];
    // Behind the root port the kill also leaves the port masked; the record brings it back.
    let ports = port_readings(console, "port")?;
    if let [before, killed, recovered] = &ports[..] {
        let regs = |v: &PortReading| (v.slot_control, v.aer_uncor_mask);
        ensure!(
            record.port.is_some() && regs(killed) != regs(before),
            "the killed session left the port unmasked or unrecorded: {killed:?} (record {record:?})"
        );
        ensure!(
            regs(recovered) == regs(before),
            "the port after recovery {recovered:?} differs from before {before:?}"
        );
        notes.push(format!(
            "port {}: masked when killed {:?}, restored from the record {:?}",
            before.port.as_deref().unwrap_or("none"),
            regs(killed),
            regs(recovered)
        ));
    } else {
        ensure!(ports.is_empty(), "port readings: {ports:?}");
    }
    Ok(notes)
}
pub(crate) fn check_reload(console: &str, sim: Option<&SimReport>) -> anyhow::Result<Vec<String>> {
    let log = section(console, "agent-log").join("\n");
    let attached = log.matches("probe vfio_pci_core_disable attached").count();
    ensure!(
        log.contains("vfio_pci_core was unloaded") && attached >= 2,
        "the VFIO probes were not re-attached after the reload:\n{log}"
    );
    let acts = actions(console)?;
    let clean: Vec<&journal::Action> = acts
        .iter()
        .filter(|a| a.result == journal::Outcome::Clean)
        .collect();
    ensure!(
        clean.len() == 1 && clean[0].trigger == journal::Trigger::Release,
        "actions after the reload: {acts:?}"
    );
    check_sim(sim, "wlan", 3)?;
    Ok(vec![
        "vfio-pci unloaded and reloaded: probes detached, re-attached on the module uevent".into(),
        "the next release was seen and reset once, clean".into(),
    ])
}
