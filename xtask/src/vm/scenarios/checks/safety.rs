//! Never harm the host: held cards, faults, graceful stops, binds, observe-only, ownership,
//! SIGKILL, hand-over to a host driver, a reloaded vfio-pci.
use anyhow::{bail, ensure};
use serde_json::Value;

use super::super::*;
use super::*;

/// How a WLAN card's release ends: the agent's reset (3 writes), or, where the kernel reset it
/// at open and release (7.4's device-specific reset, 3 writes each), the verification of that
/// reset. (kernel resets, trigger, result, the agent's writes)
fn wlan_release_end(console: &str) -> (usize, &'static str, &'static str, usize) {
    let kernel = kernel_device_specific_resets(console);
    if kernel > 0 {
        (kernel, "kernel-reset", "nothing-to-do", 0)
    } else {
        (kernel, "release", "clean", 3)
    }
}

pub(crate) fn check_held(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
    let cli = section(console, "cli").join("\n");
    ensure!(
        cli.contains("is held by pid") && cli.contains("cli-rc=75"),
        "the CLI did not refuse the held device: {cli}"
    );
    // The open's own reset calls are explained by the open: nothing to answer while the VM
    // holds the card, and its release is answered once: reset, or, where the kernel reset it
    // at open and release (7.4's device-specific reset), verified.
    let (kernel, trigger, result, ours) = wlan_release_end(console);
    let acts = actions(console);
    ensure!(
        acts.len() == 1 && acts[0]["trigger"] == trigger && acts[0]["result"] == result,
        "expected one action, the release's {trigger} -> {result}: {acts:?}"
    );
    check_sim(sim, "wlan", ours + 3 * kernel)?;
    let refusal = cli
        .lines()
        .find(|l| l.contains("is held by pid"))
        .unwrap_or("");
    Ok(vec![
        format!("while held: the CLI refused ({refusal}); the agent did nothing"),
        format!("after the release: {trigger} -> {result}; the kernel's own resets: {kernel}"),
    ])
}
pub(crate) fn check_fault(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
    let acts = actions(console);
    let results: Vec<&str> = acts.iter().filter_map(|a| a["result"].as_str()).collect();
    ensure!(
        results == ["link-down", "link-down", "skipped"],
        "actions: {results:?}"
    );
    ensure!(
        acts[2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("gave up after 2")),
        "{}",
        acts[2]
    );
    // On a kernel with the device-specific reset, that reset at the VM's open is the one that
    // takes the link (its poll times out): the agent finds config space all-ones from its first
    // read, so it saves, writes and restores nothing.
    let kernel_took_link = json_lines(console, "journal")
        .iter()
        .any(|v| v["event"]["function"] == "pci_dev_specific_reset" && v["event"]["ret"] == -110);
    if kernel_took_link {
        return check_fault_after_kernel(&acts, console, sim);
    }
    let restored = acts[0]["report"]["restored"]["command"]
        .as_u64()
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
    ensure!(
        sim["resets"] == 1 && sim["link_up"] == false,
        "simulator: {sim}"
    );
    if sim["writes"].as_array().map(Vec::len) != Some(2) {
        bail!(
            "expected 2 writes (one global reset), got {}",
            sim["writes"]
        );
    }
    Ok(vec![format!(
        "2 attempts, both link-down, then: {}; PCI_COMMAND restored to {restored:#06x}, reads {now:#06x}",
        acts[2]["detail"]
    )])
}
pub(crate) fn check_fault_after_kernel(
    acts: &[Value],
    console: &str,
    sim: Option<&Value>,
) -> anyhow::Result<Vec<String>> {
    for a in &acts[..2] {
        let r = &a["report"];
        ensure!(
            r["ops"].as_array().is_some_and(Vec::is_empty)
                && r["restored"]["command"].is_null()
                && r["restored"]["config"]
                    .as_array()
                    .is_some_and(Vec::is_empty),
            "a card gone before the session started gets no write and no restore: {a}"
        );
    }
    ensure!(
        console.contains("VMLAB pci_command=ffff"),
        "config space does not read all-ones"
    );
    let sim = sim.context("no simulator report")?;
    ensure!(
        sim["resets"] == 1
            && sim["link_up"] == false
            && sim["writes"].as_array().map(Vec::len) == Some(2),
        "the kernel's global reset (assert, deassert) and nothing after: {sim}"
    );
    Ok(vec![format!(
        "the kernel's reset at open took the link for good (-ETIMEDOUT); 2 attempts found it down, wrote nothing, then: {}",
        acts[2]["detail"]
    )])
}
pub(crate) fn check_graceful(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
    // Where the kernel reset the card as the device closed (7.4), the wait is for the
    // verification of that reset, which finds it clean and writes nothing.
    let (kernel, trigger, result, ours) = wlan_release_end(console);
    let acts = actions(console);
    let done: Vec<&Value> = acts.iter().filter(|a| a["result"] == result).collect();
    ensure!(done.len() == 1, "expected one {result}: {acts:?}");
    ensure!(done[0]["trigger"] == trigger, "{}", done[0]);
    let waiting = acts
        .iter()
        .find(|a| {
            a["trigger"] == trigger
                && a["result"] == "skipped"
                && a["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("held by pid") && d.contains("waiting up to"))
        })
        .with_context(|| format!("the {trigger} did not wait for the group: {acts:?}"))?;
    ensure!(
        acts.len() == 2,
        "expected the wait and its answer: {acts:?}"
    );
    let waited = done[0]["ts_ms"].as_u64().unwrap_or(0) - waiting["ts_ms"].as_u64().unwrap_or(0);
    ensure!(
        waited >= 2000,
        "{result} {waited} ms after the refusal: before the group was closed?"
    );
    check_sim(sim, "wlan", ours + 3 * kernel)?;
    Ok(vec![
        format!("device closed, group kept: {}", waiting["detail"]),
        format!(
            "group closed: {trigger} -> {result} {waited} ms later; the kernel's own resets: {kernel}"
        ),
    ])
}
pub(crate) fn check_bind(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
    let acts = actions(console);
    ensure!(acts.len() == 1, "expected one action: {acts:?}");
    let a = &acts[0];
    ensure!(
        a["trigger"] == "bind" && a["result"] == "clean",
        "action: {a}"
    );
    let opened = json_lines(console, "journal")
        .iter()
        .any(|v| v["type"] == "event" && v["event"]["kind"] == "open");
    ensure!(!opened, "the device was opened before its reset");
    // Where the kernel has the device-specific reset, the agent asks for it instead of its own.
    let log = section(console, "agent-log").join("\n");
    let method = if log.contains("regime=kernel-device-specific") {
        "kernel-device-specific"
    } else {
        "register-sequence"
    };
    ensure!(
        a["report"]["method"] == method,
        "reset by {}, not {method}",
        a["report"]["method"]
    );
    check_sim(sim, "modem", 1)?;
    Ok(vec![format!(
        "bound to vfio-pci -> reset in {:.1} ms, before any open: {}",
        a["latency_ms"].as_f64().unwrap_or(f64::NAN),
        a["detail"]
    )])
}
pub(crate) fn check_observe(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
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
    let acts = actions(console);
    let results: Vec<(&str, &str)> = acts
        .iter()
        .filter_map(|a| Some((a["trigger"].as_str()?, a["result"].as_str()?)))
        .collect();
    // Where the kernel resets the card at open and release (7.4), the release is one to
    // verify, which observe-only cannot do on a runtime-suspended card: skipped, not woken.
    let kernel = kernel_device_specific_resets(console);
    let release = if kernel > 0 {
        ("kernel-reset", "skipped")
    } else {
        ("release", "dry-run")
    };
    ensure!(
        results.contains(&("rescan", "skipped")) && results.contains(&release),
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
pub(crate) fn check_own(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
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
    let acts = actions(console);
    let results: Vec<&str> = acts.iter().filter_map(|a| a["result"].as_str()).collect();
    let taken = acts
        .iter()
        .find(|a| a["result"] == "taken")
        .with_context(|| format!("the reset was not reported taken by the VM: {results:?}"))?;
    // Named by the kernel's EBUSY when the group was taken back, after the VM's BAR mapping
    // revoked the session's own (Debian's CONFIG_IO_STRICT_DEVMEM): no SIGBUS death.
    ensure!(
        taken["detail"]
            .as_str()
            .is_some_and(|d| d.contains("vmlab-guest")),
        "taken: {taken}"
    );
    // Then the VM's own release is an episode of its own: reset (or, where the kernel resets
    // at release, verified) clean.
    let after = results.iter().skip_while(|r| **r != "taken").skip(1);
    ensure!(
        after
            .clone()
            .any(|r| matches!(*r, "clean" | "nothing-to-do")),
        "the VM's release was not answered: {results:?}"
    );
    // One sequence (or in-session kernel reset) per reset of ours, taken or clean; on a kernel
    // with the device-specific reset the SoC missed its first two (the scenario's fault).
    let ours = results
        .iter()
        .filter(|r| matches!(**r, "taken" | "clean"))
        .count();
    check_sim(sim, "modem", ours + kernel_device_specific_resets(console))?;
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
    let record: Value = serde_json::from_str(section(console, "record").join("").trim())
        .context("no crash record was left by the killed agent")?;
    let cmd = record["command"]
        .as_u64()
        .context("record without PCI_COMMAND")?;
    let power = record["power_control"].as_str().unwrap_or("on");
    let want = format!("pci_command={cmd:04x} power={power}");
    ensure!(
        killed != want && killed.contains("power=on"),
        "the kill left nothing to restore? {killed} (record {record})"
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
    let ports = port_states(console, "port");
    if let [before, killed, recovered] = &ports[..] {
        let regs = |v: &Value| (v["slot_control"].clone(), v["aer_uncor_mask"].clone());
        ensure!(
            record["port"].is_object() && regs(killed) != regs(before),
            "the killed session left the port unmasked or unrecorded: {killed} (record {record})"
        );
        ensure!(
            regs(recovered) == regs(before),
            "the port after recovery {recovered} differs from before {before}"
        );
        notes.push(format!(
            "port {}: masked when killed {:?}, restored from the record {:?}",
            before["port"],
            regs(killed),
            regs(recovered)
        ));
    } else {
        ensure!(ports.is_empty(), "port readings: {ports:?}");
    }
    Ok(notes)
}
pub(crate) fn check_handover(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
    let card = console
        .lines()
        .find_map(|l| l.split("VMLAB card at ").nth(1))
        .and_then(|l| l.split([' ', ',']).next())
        .context("the guest did not name the card")?
        .to_string();
    let h = vmlab_json(console, "handover")?;
    let after = &h["card"];
    ensure!(
        after["driver"] == "uio_pci_generic",
        "the handover did not bind uio_pci_generic, nothing was tested: {after}"
    );
    let (start, end) = (
        h["start_ns"].as_u64().context("no start_ns")?,
        h["end_ns"].as_u64().context("no end_ns")?,
    );
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
    sim: Option<&Value>,
    since_request_ns: u64,
) -> anyhow::Result<String> {
    let sim = sim.context("no simulator report")?;
    ensure!(
        sim["family"] == "modem",
        "simulated family {}",
        sim["family"]
    );
    let writes = sim["writes"].as_array().cloned().unwrap_or_default();
    let at = |w: &Value| w["at_us"].as_u64().unwrap_or(0);
    // The last request is the session's (before it, a kernel's at the VM's open and release).
    let request = writes
        .iter()
        .rfind(|w| w["offset"] == 0xb0)
        .context(format!(
            "the simulator saw no MHI_SOC_RESET_REQ: {writes:?}"
        ))?;
    let handover_us = at(request) + since_request_ns / 1000;
    let late: Vec<&Value> = writes.iter().filter(|w| at(w) >= handover_us).collect();
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
pub(crate) fn state_kept(after: &Value, end: &Value) -> anyhow::Result<String> {
    for key in ["driver", "driver_override", "command", "power_control"] {
        ensure!(
            after[key] == end[key],
            "{key} changed after the handover: {} -> {}",
            after[key],
            end[key]
        );
    }
    let (a, e) = (
        after["config"].as_str().unwrap_or(""),
        end["config"].as_str().unwrap_or(""),
    );
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
        "card after the handover and at the end: driver {}, override {}, PCI_COMMAND {:#06x}, power/control {}, all {} config bytes identical",
        end["driver"],
        end["driver_override"],
        end["command"].as_u64().unwrap_or(0),
        end["power_control"],
        a.len() / 2
    ))
}
/// The agent said the card was taken, its one action puts nothing back onto it, and the crash
/// record (there during the session) is gone.
pub(crate) fn taken_and_cleaned(
    console: &str,
    after: &Value,
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
    let acts = actions(console);
    ensure!(acts.len() == 1, "expected one action: {acts:?}");
    // Taken mid-session: no verdict from registers that are the new driver's.
    ensure!(
        acts[0]["result"] == "taken"
            && acts[0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("was taken by {taker} during the reset"))),
        "the action does not say the card was taken: {}",
        acts[0]
    );
    let restored = &acts[0]["report"]["restored"];
    if !restored.is_null() {
        ensure!(
            restored["taken_by"] == taker
                && restored["command"].is_null()
                && restored["power_control"].is_null(),
            "the report puts something back onto the taken card: {restored}"
        );
    }
    // The helper looks for the record when the handover has ended: if the session ended first
    // (the kernel's reset path), it has rightly removed it by then.
    ensure!(
        after["record"] == true || !session_outlived_handover,
        "no crash record during the session: {after}"
    );
    ensure!(
        !console.contains("VMLAB record still there"),
        "the crash record was not removed"
    );
    // "<time>  WARN <target>: <message> <stamp>": the message.
    let said = line.rsplit_once(' ').map_or(*line, |(l, _)| l);
    let said = said.split(": ").skip(1).collect::<Vec<_>>().join(": ");
    Ok(vec![
        format!("agent: {}", said.trim()),
        format!(
            "action {} ({}), restored {restored}; crash record removed",
            acts[0]["result"], acts[0]["detail"]
        ),
    ])
}
/// What a restore would have written onto the taken card: the session's record, as the guest
/// read it right after the handover (the session may already have removed it).
pub(crate) fn not_put_back(console: &str) -> Option<String> {
    let rec: Value = serde_json::from_str(section(console, "record").join("").trim()).ok()?;
    Some(format!(
        "not put back onto it (the session's record): PCI_COMMAND {:#06x}, power/control {}",
        rec["command"].as_u64()?,
        rec["power_control"]
    ))
}
pub(crate) fn check_reload(console: &str, sim: Option<&Value>) -> anyhow::Result<Vec<String>> {
    let log = section(console, "agent-log").join("\n");
    let attached = log.matches("probe vfio_pci_core_disable attached").count();
    ensure!(
        log.contains("vfio_pci_core was unloaded") && attached >= 2,
        "the VFIO probes were not re-attached after the reload:\n{log}"
    );
    let acts = actions(console);
    let clean: Vec<&Value> = acts.iter().filter(|a| a["result"] == "clean").collect();
    ensure!(
        clean.len() == 1 && clean[0]["trigger"] == "release",
        "actions after the reload: {acts:?}"
    );
    check_sim(sim, "wlan", 3)?;
    Ok(vec![
        "vfio-pci unloaded and reloaded: probes detached, re-attached on the module uevent".into(),
        "the next release was seen and reset once, clean".into(),
    ])
}
