//! A host driver takes the card mid-reset (libvirt's managed reattach): from then on the
//! session writes nothing to it and says it was taken.
use anyhow::{Context as _, ensure};

use super::journal::{self, actions};
use super::{Hit, hits, stamped};
use crate::vm::qemu::section;
use crate::vm::records::{CardState, Handover, SimReport, Write, crash_record, vmlab_json};

pub(crate) fn check_handover(
    console: &str,
    sim: Option<&SimReport>,
) -> anyhow::Result<Vec<String>> {
    let card = console
        .lines()
        .find_map(|l| l.split("VMLAB card at ").nth(1))
        .and_then(|l| l.split([' ', ',']).next())
        .context("the guest did not name the card")?
        .to_string();
    let h: Handover = vmlab_json(console, "handover")?;
    let after = &h.card;
    ensure!(
        after.driver.as_deref() == Some("uio_pci_generic"),
        "the handover did not bind uio_pci_generic, nothing was tested: {after:?}"
    );
    let (start, end) = (h.start_ns, h.end_ns);
    let log = section(console, "agent-log");
    // The SoC reset request: the agent's own, or (on a kernel with the device-specific reset)
    // the kernel's it asks for.
    let by_kernel = stamped(&log, "reset: wait for the modem to reboot").is_err();
    let (_, asked) = stamped(&log, "reset: wait for the modem to reboot")
        .or_else(|_| stamped(&log, "using its reset instead of ours"))?;
    // A card taken mid-session gets no verdict: the session ends with this line instead.
    let (_, verdict) = stamped(&log, "during the session: nothing more is written to it")?;
    // The kernel's reset holds the device lock for its whole 2 s: the unbind waits for it, and
    // the session sees the card taken as soon as vfio-pci lets go, before the new driver binds.
    // The agent's own sequence notices only at its next check, after the bind.
    let inside = if by_kernel {
        asked < start && start < verdict && verdict - asked >= 2_000_000_000
    } else {
        asked < start && end < verdict
    };
    ensure!(
        inside,
        "the handover ({start}..{end} ns) was not inside the reset (SoC reset asked at {asked}, session ended at {verdict}; by the kernel: {by_kernel})"
    );
    let mut notes = vec![format!(
        "handover to uio_pci_generic {:.0} ms after the SoC reset request ({}), {:.0} ms long; the session ended as taken {:.0} ms into it",
        (start - asked) as f64 / 1e6,
        if by_kernel {
            "the kernel's, which the unbind waited for"
        } else {
            "the agent's"
        },
        (end - start) as f64 / 1e6,
        (verdict - start) as f64 / 1e6
    )];
    notes.push(no_bar_write_after(sim, start - asked)?);
    notes.push(no_write_traced_after(console, &card, start)?);
    notes.push(state_kept(after, &vmlab_json(console, "card-state")?)?);
    notes.extend(taken_and_cleaned(console, after, end < verdict)?);
    notes.extend(not_put_back(console));
    Ok(notes)
}

/// The simulator's clock is not the guest's: the handover is placed on it by its distance from
/// the SoC reset request, measured from the agent's log line right after that write (a stamp a
/// little late, so the handover is placed a little early: the check errs strict).
pub(crate) fn no_bar_write_after(
    sim: Option<&SimReport>,
    since_request_ns: u64,
) -> anyhow::Result<String> {
    let sim = sim.context("no simulator report")?;
    ensure!(sim.family == "modem", "simulated family {}", sim.family);
    let writes = &sim.writes;
    let at = |w: &Write| w.at_us;
    // The last request is the session's (before it, a kernel's at the VM's open and release).
    let request = writes.iter().rfind(|w| w.offset == 0xb0).context(format!(
        "the simulator saw no MHI_SOC_RESET_REQ: {writes:?}"
    ))?;
    let handover_us = at(request) + since_request_ns / 1000;
    let late: Vec<&Write> = writes.iter().filter(|w| at(w) >= handover_us).collect();
    ensure!(
        late.is_empty(),
        "BAR write(s) after the handover (at {handover_us} us on the simulator's clock): {late:?}"
    );
    let last = writes.iter().map(at).max().unwrap_or(0);
    Ok(format!(
        "simulator: {} BAR write(s), the last {:.0} ms before the handover, none after",
        writes.len(),
        (handover_us - last) as f64 / 1000.0
    ))
}

/// No config or power write reached the card after the handover began, but the helper's own;
/// the session's writes before it prove the probes see them.
pub(crate) fn no_write_traced_after(
    console: &str,
    card: &str,
    start: u64,
) -> anyhow::Result<String> {
    let all = hits(console);
    let on_card: Vec<&Hit> = all.iter().filter(|h| h.dev == card).collect();
    let late: Vec<String> = on_card
        .iter()
        .filter(|h| h.ns >= start && h.comm != "vmlab-guest")
        .map(|h| format!("{} by {} at {} ns", h.event, h.comm, h.ns))
        .collect();
    ensure!(
        late.is_empty(),
        "written to the card after the handover began ({start} ns): {late:?}"
    );
    let before = |e: &str| {
        on_card
            .iter()
            .filter(|h| h.ns < start && h.event.starts_with(e) && h.comm != "vmlab-guest")
            .count()
    };
    let (config, power) = (before("config"), before("power"));
    ensure!(
        config > 0 && power > 0,
        "the probes saw no session write before the handover (config {config}, power {power}): are they attached?"
    );
    let elsewhere = all
        .iter()
        .filter(|h| h.ns >= start && h.dev != card)
        .count();
    Ok(format!(
        "traced: the session's {config} config and {power} power write(s) before the handover, none after ({elsewhere} to other devices, e.g. the port put back)"
    ))
}

/// What uio_pci_generic found right after the bind is what it has at the end.
pub(crate) fn state_kept(after: &CardState, end: &CardState) -> anyhow::Result<String> {
    let sysfs = |c: &CardState| {
        (
            c.driver.clone(),
            c.driver_override.clone(),
            c.command,
            c.power_control.clone(),
        )
    };
    ensure!(
        sysfs(after) == sysfs(end),
        "driver, driver_override, PCI_COMMAND or power/control changed after the handover: {:?} -> {:?}",
        sysfs(after),
        sysfs(end)
    );
    let (a, e) = (after.config.as_str(), end.config.as_str());
    let changed: Vec<String> = (0..a.len().min(e.len()) / 2)
        .filter(|i| a[2 * i..2 * i + 2] != e[2 * i..2 * i + 2])
        .map(|i| {
            format!(
                "{i:#x}: {} -> {}",
                &a[2 * i..2 * i + 2],
                &e[2 * i..2 * i + 2]
            )
        })
        .collect();
    ensure!(
        a.len() == e.len() && changed.is_empty(),
        "config space changed after the handover: {changed:?}"
    );
    Ok(format!(
        "card after the handover and at the end: driver {:?}, override {}, PCI_COMMAND {:#06x}, power/control {}, all {} config bytes identical",
        end.driver,
        end.driver_override,
        end.command,
        end.power_control,
        a.len() / 2
    ))
}

/// The agent said the card was taken, its one action puts nothing back onto it, and the crash
/// record (there during the session) is gone.
pub(crate) fn taken_and_cleaned(
    console: &str,
    after: &CardState,
    session_outlived_handover: bool,
) -> anyhow::Result<Vec<String>> {
    let log = section(console, "agent-log");
    // Who the session saw take it: the new driver, or (when the unbind waited for the kernel's
    // own reset and ran the moment it returned) the unbind before that driver bound.
    let takers = ["driver uio_pci_generic", "an unbind (no driver now)"];
    let (line, taker) = log
        .iter()
        .find_map(|l| {
            let t = takers
                .iter()
                .find(|t| l.contains(&format!("was taken by {t}")))?;
            Some((l, *t))
        })
        .with_context(|| {
            format!(
                "the agent never said the card was taken:\n{}",
                log.join("\n")
            )
        })?;
    let acts = actions(console)?;
    ensure!(acts.len() == 1, "expected one action: {acts:?}");
    // Taken mid-session: no verdict from registers that are the new driver's.
    ensure!(
        acts[0].result == journal::Outcome::Taken
            && acts[0]
                .detail
                .contains(&format!("was taken by {taker} during the reset")),
        "the action does not say the card was taken: {:?}",
        acts[0]
    );
    if let Some(r) = &acts[0].report {
        let restored = &r.restored;
        ensure!(
            restored.taken_by.as_deref() == Some(taker)
                && restored.command.is_none()
                && restored.power_control.is_none(),
            "the report puts something back onto the taken card: {restored:?}"
        );
    }
    // The helper looks for the record when the handover has ended: if the session ended first
    // (the kernel's reset path), it has rightly removed it by then.
    ensure!(
        after.record || !session_outlived_handover,
        "no crash record during the session: {after:?}"
    );
    ensure!(
        !console.contains("VMLAB record still there"),
        "the crash record was not removed"
    );
    // "<time>  WARN <target>: <message> <stamp>": the message.
    let said = line.rsplit_once(' ').map_or(*line, |(l, _)| l);
    let said = said.split(": ").skip(1).collect::<Vec<_>>().join(": ");
    let restored = acts[0].report.as_ref().map(|r| &r.restored);
    Ok(vec![
        format!("agent: {}", said.trim()),
        format!(
            "action {:?} ({}), restored {restored:?}; crash record removed",
            acts[0].result, acts[0].detail
        ),
    ])
}

/// What a restore would have written onto the taken card: the session's record, as the guest
/// read it right after the handover (the session may already have removed it).
pub(crate) fn not_put_back(console: &str) -> Option<String> {
    let rec = crash_record(console, "record").ok()?;
    Some(format!(
        "not put back onto it (the session's record): PCI_COMMAND {:#06x}, power/control {:?}",
        rec.command?, rec.power_control
    ))
}
