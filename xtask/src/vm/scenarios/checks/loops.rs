//! The detect → reset → verify loops, and the kernel's own regimes (7.4's device_specific).
use anyhow::{Context as _, ensure};

use super::check_sim;
use super::journal::{self, actions};
use crate::vm::qemu::section;
use crate::vm::records::{Journaled, KernelReset, Kind, SimReport, journal_events, port_readings};
use crate::vm::scenarios::{Run, Scenario, Topology};

/// What a loop expects on a kernel with the device-specific reset: the scenarios about the
/// agent's own reset make the SoC miss the kernel's two.
fn regime_of(run: &Run) -> KernelRegime {
    let stale = run
        .scenario
        .faults(true)
        .is_some_and(|f| f.contains("resets-missed"));
    match (stale, run.scenario) {
        (true, _) => KernelRegime::STALE,
        (false, Scenario::Container) => KernelRegime::VERIFIED_THROUGH_VFIO,
        (false, _) => KernelRegime::VERIFIED,
    }
}

/// Behind the root port the reset masked the port's link-drop reports and put them back (the
/// loops read the port before and after; other scenarios reuse the loop's check without).
fn port_guarded(run: &Run, console: &str, a: &journal::Action) -> anyhow::Result<()> {
    if run.topology != Topology::RootPort || !console.contains("VMLAB-BEGIN port") {
        return Ok(());
    }
    let ports = port_readings(console, "port")?;
    ensure!(
        ports.len() == 2 && ports[0] == ports[1],
        "the port before and after the reset differ: {ports:?}"
    );
    let report = a.report()?;
    let restored = &report.restored.port;
    let port = report.port.as_ref().and_then(|p| p.port.as_deref());
    ensure!(
        port.is_some() && port == ports[0].port.as_deref() && !restored.is_empty(),
        "the reset did not guard the port {:?}: restored {restored:?}",
        ports[0].port
    );
    Ok(())
}

pub(crate) fn check_loop(
    run: &Run,
    console: &str,
    sim: Option<&SimReport>,
    family: &str,
    writes: usize,
) -> anyhow::Result<Vec<String>> {
    if expected_kernel_reset(run, console)?.0 == KernelReset::DeviceSpecific {
        return check_kernel_regime(run, console, sim, regime_of(run));
    }
    let acts = actions(console)?;
    let a = acts.first().context("the agent took no action")?;
    ensure!(
        a.trigger == journal::Trigger::Release && a.result == journal::Outcome::Clean,
        "first action: {a:?}"
    );
    ensure!(
        acts.len() == 1,
        "expected one action, got {}: {acts:?}",
        acts.len()
    );
    check_sim(sim, family, writes)?;
    let power = check_runtime_pm(sim, a)?;
    let journal = journal_events(console)?;
    let ev = first_release(&journal)?;
    let (want, quirk) = expected_kernel_reset(run, console)?;
    ensure!(
        ev.event.kernel_reset == Some(want) && ev.event.left_unreset == Some(true),
        "in {} the release must name kernel_reset={}: {:?}",
        run.topology.name(),
        want.name(),
        ev.event
    );
    // Read, not trusted: true where no kernel reset ran, false after the bus reset.
    let needs_reset = want == KernelReset::None;
    ensure!(
        ev.event.needs_reset == Some(needs_reset),
        "in {} the summary must read needs_reset={needs_reset}: {:?}",
        run.topology.name(),
        ev.event
    );
    let done_ns = ev.event.returned_ns();
    let received = ev
        .received_mono_ns
        .context("the journal's event has no received_mono_ns")?;
    ensure!(
        received >= done_ns,
        "event received ({received}) before the release returned ({done_ns})?"
    );
    port_guarded(run, console, a)?;
    let detect_ms = (received - done_ns) as f64 / 1e6;
    let act_ms = a.latency_ms.unwrap_or(f64::NAN);
    let reset_ms = a.report()?.duration_ms;
    Ok([
        quirk,
        power,
        Some(format!(
            "release: kernel_reset={} needs_reset={needs_reset} -> reset anyway",
            want.name()
        )),
        Some(format!("verdict {:?}: {}", a.result, a.detail)),
        Some(format!(
            "detection {detect_ms:.1} ms (release returned -> agent), event -> reset start {act_ms:.1} ms, reset+verify {reset_ms} ms, total {:.0} ms",
            detect_ms + act_ms + reset_ms as f64
        )),
        Some(format!("simulator: {writes} write(s), in the reviewed order, values and delays")),
    ]
    .into_iter()
    .flatten()
    .collect())
}
/// The vfio-user card has a PM capability, so the guest's runtime PM puts the idle card
/// (vfio-pci allows it) into D3hot, where it answers config cycles only: the session must wake
/// it (its `power/control` record) before its first register write, and once `auto` is back
/// the card sleeps again. None for the ivshmem card (no PM capability, no power report).
pub(crate) fn check_runtime_pm(
    sim: Option<&SimReport>,
    action: &journal::Action,
) -> anyhow::Result<Option<String>> {
    let Some((power, writes)) = sim.and_then(|s| Some((s.power.as_ref()?, &s.writes))) else {
        return Ok(None);
    };
    let change = |p: &crate::vm::records::PowerChange| (p.at_us, p.from, p.to);
    let (Some(first), Some(last)) = (
        writes.first().map(|w| w.at_us),
        writes.last().map(|w| w.at_us),
    ) else {
        return Ok(None);
    };
    let woke = power.iter().map(change).rfind(|&(t, _, _)| t < first);
    ensure!(
        matches!(woke, Some((_, 3, 0))),
        "runtime PM: the card was not woken from D3hot right before the first register write \
         (its last change before it: {woke:?}; all: {power:?})"
    );
    let restored = &action.report()?.restored;
    ensure!(
        restored.power_control.as_deref() == Some("auto"),
        "runtime PM: the session did not record and restore power/control=auto: {restored:?}"
    );
    let slept = power
        .iter()
        .map(change)
        .find(|&(t, f, to)| t > last && (f, to) == (0, 3));
    ensure!(
        slept.is_some(),
        "runtime PM: the card never went back to D3hot after the session restored auto: {power:?}"
    );
    let (woke_us, slept_us) = (woke.map_or(0, |w| w.0), slept.map_or(0, |s| s.0));
    Ok(Some(format!(
        "runtime PM: D3hot while idle, woken {:.0} ms before the first write, back in D3hot {:.0} ms after the last",
        (first - woke_us) as f64 / 1e3,
        (slept_us - last) as f64 / 1e3
    )))
}
/// The kernel reset a release must name. Behind the root port it is `bus`, unless the kernel
/// carries the SBR-avoid quirk for the Qualcomm IDs ("PCI: Avoid SBR for Qualcomm WCN6855/WCN7850
/// WiFi, SDX62/SDX65 modems": mainline 7.2, stable backports from Sep 2026), which takes `bus`
/// out of `reset_method`; only the vfio-user card, with the real IDs, meets it. The quirk is the
/// only thing that may take `bus` from a card behind the port, and only from a Qualcomm one.
pub(crate) fn expected_kernel_reset(
    run: &Run,
    console: &str,
) -> anyhow::Result<(KernelReset, Option<String>)> {
    let line = console
        .lines()
        .find_map(|l| l.split("VMLAB card at ").nth(1))
        .context("the guest printed no card line")?;
    let methods = line.split("reset_method: ").nth(1).unwrap_or("").trim();
    if run.topology == Topology::RootBus && !methods.contains("device_specific") {
        return Ok((KernelReset::None, None));
    }
    if methods.split_whitespace().any(|m| m == "device_specific") {
        ensure!(
            methods.split_whitespace().next() == Some("device_specific"),
            "device_specific must be the kernel's first method: {methods}"
        );
        return Ok((
            KernelReset::DeviceSpecific,
            Some(format!(
                "the kernel resets the card itself (reset_method: {methods})"
            )),
        ));
    }
    if methods.split_whitespace().any(|m| m == "bus") {
        return Ok((KernelReset::Bus, None));
    }
    ensure!(
        line.contains("0x17cb"),
        "behind the root port only the Qualcomm quirk may take `bus` away: {line}"
    );
    Ok((
        KernelReset::None,
        Some(format!(
            "the kernel's SBR-avoid quirk took `bus` from this Qualcomm card (reset_method: {methods})"
        )),
    ))
}
/// The 7.4 regime: the kernel lists `device_specific` first and resets the card at every VFIO
/// open and release; the release summary names it; the agent starts in the
/// `kernel-device-specific` regime and answers the release as `want` says. The kernel's own
/// resets pass the simulator's conformance check: the lab's implementation of the reviewed
/// sequence and the simulator's model of it agree on order, values and delays.
pub(crate) fn check_kernel_regime(
    run: &Run,
    console: &str,
    sim: Option<&SimReport>,
    want: KernelRegime,
) -> anyhow::Result<Vec<String>> {
    let (kernel_reset, note) = expected_kernel_reset(run, console)?;
    ensure!(
        kernel_reset == KernelReset::DeviceSpecific,
        "the kernel does not list device_specific for the card"
    );
    let log = section(console, "agent-log").join("\n");
    ensure!(
        log.contains("regime=kernel-device-specific"),
        "the agent did not start in the kernel-device-specific regime:\n{log}"
    );
    regime_views(run, console)?;
    let journal = journal_events(console)?;
    let ev = first_release(&journal)?;
    ensure!(
        ev.event.kernel_reset == Some(want.release)
            && ev.event.left_unreset == Some(want.release != KernelReset::DeviceSpecific),
        "the release must name kernel_reset {}: {:?}",
        want.release.name(),
        ev.event
    );
    let timed_out = journal
        .iter()
        .any(|j| j.event.kind == Kind::Open && j.event.tried("pci_dev_specific_reset", -110));
    if want.release == KernelReset::None {
        ensure!(
            timed_out && log.contains("falling back to qcom-reset's register sequence"),
            "the kernel's reset must time out at open and the agent fall back to its own:\n{log}"
        );
    }
    verified_stale(run, &log, &want)?;
    let a = &one_action(console, &want)?;
    sequences(sim, &want)?;
    Ok([
        note,
        Some(format!(
            "release: kernel_reset={} -> {:?} {}",
            want.release.name(),
            a.result,
            a.detail
        )),
        Some(format!(
            "simulator: {} reset sequence(s), {} of the kernel's broken off by its link poll, the rest conformant with the reviewed one; {} ignored by the SoC",
            want.sequences, want.broken_off, want.missed
        )),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// `act-with-kernel` also checks `check` and `status` name the regime.
fn regime_views(run: &Run, console: &str) -> anyhow::Result<()> {
    if run.scenario == Scenario::ActWithKernel {
        for view in ["check", "status"] {
            let out = section(console, view).join("\n");
            ensure!(
                out.lines()
                    .any(|l| l.contains("regime") && l.contains("kernel-device-specific")),
                "`qcom-reset {view}` does not name the kernel-device-specific regime:\n{out}"
            );
        }
    }
    Ok(())
}

/// The kernel's resets missed: the verification finds what the VM left, crashed or not.
fn verified_stale(run: &Run, log: &str, want: &KernelRegime) -> anyhow::Result<()> {
    if want.missed > 0 {
        let found = if run.state == "crashed" {
            "crashed"
        } else {
            "stale"
        };
        ensure!(
            log.lines()
                .any(|l| l.contains(&format!("{found} (")) && l.contains("); resetting")),
            "the verification did not find the card {found}:\n{log}"
        );
    }
    Ok(())
}

/// The agent's one action after the release, as the regime expects.
fn one_action(console: &str, want: &KernelRegime) -> anyhow::Result<journal::Action> {
    let acts = actions(console)?;
    ensure!(acts.len() == 1, "expected one action, got {acts:?}");
    let a = acts[0].clone();
    ensure!(
        a.trigger == want.trigger && a.result == want.result,
        "expected {:?} -> {:?}: {a:?}",
        want.trigger,
        want.result
    );
    if want.method.is_none() {
        ensure!(
            a.detail.starts_with("clean:"),
            "the verification must find the card clean: {a:?}"
        );
    }
    ensure!(
        a.method() == want.method,
        "reset by {:?} (expected {:?})",
        a.method(),
        want.method
    );
    Ok(a)
}

/// The simulator's count of sequences: the kernel's broken off, the SoC's missed, the rest
/// conformant with the reviewed one.
fn sequences(sim: Option<&SimReport>, want: &KernelRegime) -> anyhow::Result<()> {
    let sim = sim.context("no simulator report")?;
    let c = &sim.conformance;
    let writes = &sim.writes;
    let per = if sim.family == "wlan" { 3 } else { 1 };
    let complete = want.sequences - want.broken_off;
    // Broken-off resets (assert and deassert only) come first; the last sequence is whole.
    let tail: Vec<u32> = writes
        .iter()
        .rev()
        .take(per as usize)
        .map(|w| w.offset)
        .collect();
    ensure!(
        (c.ok || want.broken_off > 0)
            && writes.len() as u64 == complete * per + want.broken_off * 2
            && (per == 1 || tail == [0x38, 0x3008, 0x3008])
            && u64::from(sim.missed) == want.missed
            && u64::from(sim.resets) == want.sequences - want.missed,
        "expected {} sequence(s) ({} broken off), {} missed: {} writes, conformance {c:?}, resets {}, missed {}",
        want.sequences,
        want.broken_off,
        want.missed,
        writes.len(),
        sim.resets,
        sim.missed
    );
    if want.broken_off == 0 {
        ensure!(c.sequences as u64 == want.sequences, "conformance {c:?}");
    }
    Ok(())
}
/// The kernel's own successful device-specific resets inside the VFIO opens and releases the
/// journal recorded: on a kernel with the quirk, their writes are the simulator's too.
pub(crate) fn kernel_device_specific_resets(console: &str) -> anyhow::Result<usize> {
    Ok(journal_events(console)?
        .iter()
        .filter(|j| matches!(j.event.kind, Kind::Open | Kind::Release))
        .filter(|j| j.event.tried("pci_dev_specific_reset", 0))
        .count())
}

/// The journal's first release event.
fn first_release(journal: &[Journaled]) -> anyhow::Result<&Journaled> {
    journal
        .iter()
        .find(|j| j.event.kind == Kind::Release)
        .context("no release event in the journal")
}

/// What a run on a kernel with the device-specific reset must show.
pub struct KernelRegime {
    /// What the release summary names: the kernel's reset at release, if it succeeded.
    release: KernelReset,
    /// The agent's one action after the release: its trigger and result.
    trigger: journal::Trigger,
    result: journal::Outcome,
    /// How it reset, if it did (`report.method`).
    method: Option<journal::Method>,
    /// Conformant sequences the card received: the kernel's at open and release, plus one of
    /// the agent's (through the kernel's `device_specific`, or its own register sequence).
    sequences: u64,
    /// Of those, the ones the SoC ignored (`resets-missed`).
    missed: u64,
    /// Of those, the kernel's that gave up after the deassert (the link poll timing out): no
    /// MHI reset written, so the conformance check rightly calls them incomplete.
    broken_off: u64,
}

impl KernelRegime {
    /// The kernel reset the card at open and release; the agent verified it and wrote nothing.
    pub(crate) const VERIFIED: KernelRegime = KernelRegime {
        release: KernelReset::DeviceSpecific,
        trigger: journal::Trigger::KernelReset,
        result: journal::Outcome::NothingToDo,
        method: None,
        sequences: 2,
        missed: 0,
        broken_off: 0,
    };
    /// The same with `access = "vfio"`: the verification's own VFIO open and close are reset
    /// by the kernel too (two more sequences, none of them the agent's writes).
    pub(crate) const VERIFIED_THROUGH_VFIO: KernelRegime = KernelRegime {
        sequences: 4,
        ..KernelRegime::VERIFIED
    };
    /// Both kernel resets missed; the agent found the card stale and reset it through the
    /// kernel's `device_specific` (sysfs `reset`), which took.
    pub(crate) const STALE: KernelRegime = KernelRegime {
        release: KernelReset::DeviceSpecific,
        trigger: journal::Trigger::KernelReset,
        result: journal::Outcome::Clean,
        method: Some(journal::Method::KernelDeviceSpecific),
        sequences: 3,
        missed: 2,
        broken_off: 0,
    };
    /// The kernel's reset timed out at open (the SoC did reset: the first sequence), made none at
    /// release; the agent's kernel reset timed out too (the second) and its own sequence (the
    /// third) reset the card.
    pub(crate) const TIMEOUT: KernelRegime = KernelRegime {
        release: KernelReset::None,
        trigger: journal::Trigger::Release,
        result: journal::Outcome::Clean,
        method: Some(journal::Method::RegisterSequence),
        sequences: 3,
        missed: 0,
        broken_off: 2,
    };
    /// `act_with_kernel_reset = true`: the agent's own sequence after the kernel's.
    pub(crate) const ACT_WITH_KERNEL: KernelRegime = KernelRegime {
        release: KernelReset::DeviceSpecific,
        trigger: journal::Trigger::KernelReset,
        result: journal::Outcome::Clean,
        method: Some(journal::Method::RegisterSequence),
        sequences: 3,
        missed: 0,
        broken_off: 0,
    };
}
