//! The probes scenario: both flavours see sysfs resets, VFIO opens and releases, bus resets
//! named as such.
use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{attempts, events, json_lines};

/// The edu behind the root port: its function and bus resets, its VFIO opens and releases.
const RP: &str = "0000:01:00.0";

pub(crate) fn check_probes(console: &str) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    let auto = json_lines(console, "trace-fentry");
    attached(console, &auto, &mut notes)?;
    resets_and_opens(&auto, RP)?;
    releases(&auto, RP, &mut notes)?;
    auto_flavour(console, RP, &mut notes)?;
    Ok(notes)
}

fn on(v: &Value, f: &str, bdf: &str) -> bool {
    v["function"] == f && v["bdf"] == bdf
}

/// `--flavour fentry`: fentry/fexit on the reset functions, kprobes on the VFIO brackets (at
/// start when VFIO is built in, when the module loads otherwise).
fn attached(console: &str, auto: &[Value], notes: &mut Vec<String>) -> anyhow::Result<()> {
    let attaches: Vec<&Value> = events(auto, "attach").collect();
    let attach = *attaches.last().context("no attach record in trace --all")?;
    // Built in, the brackets attach at start (and say why); a module attaches them when it loads.
    let builtin = console.contains("VMLAB vfio-module=0");
    if builtin {
        ensure!(
            attaches[0]
                .to_string()
                .contains("vfio_pci_core is built into this kernel"),
            "built-in VFIO: the brackets must attach at start, saying why: {attaches:?}"
        );
        notes.push("vfio_pci_core built in: brackets attached at start from vmlinux BTF".into());
    } else {
        notes.push(
            "vfio_pci_core a module: brackets attached when it loaded after the tracer started"
                .into(),
        );
        ensure!(
            attaches.len() >= 2 && !attaches[0].to_string().contains("vfio_pci_core_disable"),
            "the VFIO probes should attach only once vfio-pci loads: {attaches:?}"
        );
    }
    let flavour = |f: &str| {
        attach["attachments"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["function"] == f))
            .map(|x| x["flavour"].clone())
    };
    ensure!(
        flavour("pci_reset_function") == Some("fentry".into()),
        "--flavour fentry did not attach fentry: {attach}"
    );
    ensure!(
        flavour("vfio_pci_core_disable") == Some("kprobe".into()),
        "vfio_pci_core_disable not attached: {attach}"
    );
    notes.push(
        "--flavour fentry: fentry/fexit on the reset functions; kprobes on vfio_pci_core".into(),
    );
    Ok(())
}

/// A sysfs reset, the -ENOTTY once `reset_method` is empty, and each open's reset attempt.
fn resets_and_opens(auto: &[Value], rp: &str) -> anyhow::Result<()> {
    let sysfs_ok = events(auto, "attempt")
        .any(|v| on(v, "pci_reset_function", rp) && v["ret"] == 0 && v["flavour"] == "fentry");
    ensure!(
        sysfs_ok,
        "no successful sysfs pci_reset_function (fentry) on {rp}"
    );
    let enotty = events(auto, "attempt")
        .any(|v| on(v, "pci_reset_function", rp) && v["ret"] == -25 && v["errno"] == "ENOTTY");
    ensure!(
        enotty,
        "no pci_reset_function -ENOTTY after emptying reset_method"
    );
    let opens: Vec<&Value> = events(auto, "open").filter(|v| v["bdf"] == rp).collect();
    ensure!(
        opens.len() == 2,
        "expected 2 VFIO opens of {rp}, got {}",
        opens.len()
    );
    ensure!(
        attempts(opens[0]).contains(&("pci_try_reset_function".into(), 0)),
        "open 1 attempts: {}",
        opens[0]
    );
    ensure!(
        attempts(opens[1]).contains(&("pci_try_reset_function".into(), -25)),
        "open 2 attempts: {}",
        opens[1]
    );
    Ok(())
}

/// Releases behind the port (the bus reset named and not trusted) and on the root bus (no
/// reset at all).
fn releases(auto: &[Value], rp: &str, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let rels: Vec<&Value> = events(auto, "release").filter(|v| v["bdf"] == rp).collect();
    ensure!(
        rels.len() == 2,
        "expected 2 releases of {rp}, got {}",
        rels.len()
    );
    ensure!(
        attempts(rels[0])
            .iter()
            .any(|(f, r)| f == "__pci_reset_function_locked" && *r == 0),
        "release 1: {}",
        rels[0]
    );
    ensure!(
        attempts(rels[0]).contains(&("pci_reset_bus_function".into(), 0))
            && rels[0]["kernel_reset"] == "bus"
            && rels[0]["left_unreset"] == true,
        "release 1: the bus reset must be named and not trusted: {}",
        rels[0]
    );
    ensure!(
        rels[0]["needs_reset"] == false,
        "release 1: the bus reset cleared needs_reset, the summary must read it: {}",
        rels[0]
    );
    notes.push(format!(
        "release behind a root port: kernel_reset={} left_unreset={} (needs_reset={}), attempts {:?}",
        rels[0]["kernel_reset"],
        rels[0]["left_unreset"],
        rels[0]["needs_reset"],
        attempts(rels[0])
    ));
    let r2 = attempts(rels[1]);
    ensure!(
        !r2.iter().any(|(f, _)| f == "__pci_reset_function_locked"),
        "release 2 tried a function reset: {}",
        rels[1]
    );
    ensure!(
        r2.iter().any(|(f, r)| f == "pci_reset_bus" && *r == 0),
        "release 2 without the bus reset: {}",
        rels[1]
    );
    let root_rel = events(auto, "release")
        .find(|v| v["bdf"] != rp)
        .context("no release of the root-bus edu")?;
    ensure!(
        root_rel["left_unreset"] == true
            && root_rel["kernel_reset"] == "none"
            && root_rel["needs_reset"] == true,
        "root-bus release must be left unreset, needs_reset read as true: {root_rel}"
    );
    notes.push(format!(
        "release without any reset method: kernel_reset=none, attempts {:?}",
        attempts(root_rel)
    ));
    Ok(())
}

/// `auto` takes kprobes wherever the kernel has them.
fn auto_flavour(console: &str, rp: &str, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let kp = json_lines(console, "trace-auto");
    let kattach = events(&kp, "attach")
        .next()
        .context("no attach record with the auto flavour")?;
    ensure!(
        kattach["attachments"]
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["flavour"] == "kprobe")),
        "not every probe attached as kprobe: {kattach}"
    );
    ensure!(
        events(&kp, "attempt")
            .any(|v| on(v, "pci_reset_function", rp) && v["ret"] == 0 && v["flavour"] == "kprobe"),
        "the auto flavour's kprobes saw no sysfs reset"
    );
    notes.push("auto: every probe attached as kprobe and fired".into());
    Ok(())
}
