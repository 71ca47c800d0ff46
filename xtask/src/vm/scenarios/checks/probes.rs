//! The probes scenario: both flavours see sysfs resets, VFIO opens and releases, bus resets
//! named as such.
use anyhow::{Context as _, ensure};

use crate::vm::records::{
    Attachment, Event, Flavour, KernelReset, Kind, TraceLine, attaches, events, trace,
};

/// The edu behind the root port: its function and bus resets, its VFIO opens and releases.
const RP: &str = "0000:01:00.0";

pub(crate) fn check_probes(console: &str) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    let auto = trace(console, "trace-fentry")?;
    attached(console, &auto, &mut notes)?;
    resets_and_opens(&auto, RP)?;
    releases(&auto, RP, &mut notes)?;
    auto_flavour(console, RP, &mut notes)?;
    Ok(notes)
}

fn on(v: &Event, f: &str, bdf: &str) -> bool {
    v.function == f && v.bdf == bdf
}

/// How `f` is attached in an attach notice.
fn flavour(attachments: &[Attachment], f: &str) -> Option<Flavour> {
    attachments
        .iter()
        .find(|x| x.function == f)
        .and_then(|x| x.flavour)
}

/// Whether an attach notice mentions `text` (a function, or a note's reason).
fn mentions(attachments: &[Attachment], text: &str) -> bool {
    attachments
        .iter()
        .any(|a| a.function.contains(text) || a.note.as_deref().is_some_and(|n| n.contains(text)))
}

/// `--flavour fentry`: fentry/fexit on the reset functions, kprobes on the VFIO brackets (at
/// start when VFIO is built in, when the module loads otherwise).
fn attached(console: &str, auto: &[TraceLine], notes: &mut Vec<String>) -> anyhow::Result<()> {
    let attaches = attaches(auto);
    let attach = *attaches.last().context("no attach record in trace --all")?;
    // Built in, the brackets attach at start (and say why); a module attaches them when it loads.
    let builtin = console.contains("VMLAB vfio-module=0");
    if builtin {
        ensure!(
            mentions(attaches[0], "vfio_pci_core is built into this kernel"),
            "built-in VFIO: the brackets must attach at start, saying why: {attaches:?}"
        );
        notes.push("vfio_pci_core built in: brackets attached at start from vmlinux BTF".into());
    } else {
        notes.push(
            "vfio_pci_core a module: brackets attached when it loaded after the tracer started"
                .into(),
        );
        ensure!(
            attaches.len() >= 2 && !mentions(attaches[0], "vfio_pci_core_disable"),
            "the VFIO probes should attach only once vfio-pci loads: {attaches:?}"
        );
    }
    ensure!(
        flavour(attach, "pci_reset_function") == Some(Flavour::Fentry),
        "--flavour fentry did not attach fentry: {attach:?}"
    );
    ensure!(
        flavour(attach, "vfio_pci_core_disable") == Some(Flavour::Kprobe),
        "vfio_pci_core_disable not attached: {attach:?}"
    );
    notes.push(
        "--flavour fentry: fentry/fexit on the reset functions; kprobes on vfio_pci_core".into(),
    );
    Ok(())
}

/// A sysfs reset, the -ENOTTY once `reset_method` is empty, and each open's reset attempt.
fn resets_and_opens(auto: &[TraceLine], rp: &str) -> anyhow::Result<()> {
    let sysfs_ok = events(auto, Kind::Attempt)
        .any(|v| on(v, "pci_reset_function", rp) && v.ret == 0 && v.flavour == Flavour::Fentry);
    ensure!(
        sysfs_ok,
        "no successful sysfs pci_reset_function (fentry) on {rp}"
    );
    let enotty = events(auto, Kind::Attempt).any(|v| {
        on(v, "pci_reset_function", rp) && v.ret == -25 && v.errno.as_deref() == Some("ENOTTY")
    });
    ensure!(
        enotty,
        "no pci_reset_function -ENOTTY after emptying reset_method"
    );
    let opens: Vec<&Event> = events(auto, Kind::Open).filter(|v| v.bdf == rp).collect();
    ensure!(
        opens.len() == 2,
        "expected 2 VFIO opens of {rp}, got {}",
        opens.len()
    );
    ensure!(
        opens[0].tried("pci_try_reset_function", 0),
        "open 1 attempts: {:?}",
        opens[0]
    );
    ensure!(
        opens[1].tried("pci_try_reset_function", -25),
        "open 2 attempts: {:?}",
        opens[1]
    );
    Ok(())
}

/// Releases behind the port (the bus reset named and not trusted) and on the root bus (no
/// reset at all).
fn releases(auto: &[TraceLine], rp: &str, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let rels: Vec<&Event> = events(auto, Kind::Release)
        .filter(|v| v.bdf == rp)
        .collect();
    ensure!(
        rels.len() == 2,
        "expected 2 releases of {rp}, got {}",
        rels.len()
    );
    ensure!(
        rels[0].tried("__pci_reset_function_locked", 0),
        "release 1: {:?}",
        rels[0]
    );
    ensure!(
        rels[0].tried("pci_reset_bus_function", 0)
            && rels[0].kernel_reset == Some(KernelReset::Bus)
            && rels[0].left_unreset == Some(true),
        "release 1: the bus reset must be named and not trusted: {:?}",
        rels[0]
    );
    ensure!(
        rels[0].needs_reset == Some(false),
        "release 1: the bus reset cleared needs_reset, the summary must read it: {:?}",
        rels[0]
    );
    notes.push(format!(
        "release behind a root port: kernel_reset=bus left_unreset=true (needs_reset=false), attempts {:?}",
        rels[0].attempts
    ));
    let r2 = &rels[1].attempts;
    ensure!(
        !r2.iter()
            .any(|a| a.function == "__pci_reset_function_locked"),
        "release 2 tried a function reset: {:?}",
        rels[1]
    );
    ensure!(
        rels[1].tried("pci_reset_bus", 0),
        "release 2 without the bus reset: {:?}",
        rels[1]
    );
    let root_rel = events(auto, Kind::Release)
        .find(|v| v.bdf != rp)
        .context("no release of the root-bus edu")?;
    ensure!(
        root_rel.left_unreset == Some(true)
            && root_rel.kernel_reset == Some(KernelReset::None)
            && root_rel.needs_reset == Some(true),
        "root-bus release must be left unreset, needs_reset read as true: {root_rel:?}"
    );
    notes.push(format!(
        "release without any reset method: kernel_reset=none, attempts {:?}",
        root_rel.attempts
    ));
    Ok(())
}

/// `auto` takes kprobes wherever the kernel has them.
fn auto_flavour(console: &str, rp: &str, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let kp = trace(console, "trace-auto")?;
    let kattach = *attaches(&kp)
        .first()
        .context("no attach record with the auto flavour")?;
    ensure!(
        kattach.iter().all(|x| x.flavour == Some(Flavour::Kprobe)),
        "not every probe attached as kprobe: {kattach:?}"
    );
    ensure!(
        events(&kp, Kind::Attempt)
            .any(|v| on(v, "pci_reset_function", rp) && v.ret == 0 && v.flavour == Flavour::Kprobe),
        "the auto flavour's kprobes saw no sysfs reset"
    );
    notes.push("auto: every probe attached as kprobe and fired".into());
    Ok(())
}
