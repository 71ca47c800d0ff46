//! The dry run: the steps a reset would take, the register operations from the same sequence
//! code run against a card that answers as a healthy one would.
use crate::device::regio::{DryRun, Recorder};
use crate::device::regs::*;
use crate::device::{sequence, verdict};

use super::port::PortRecord;
use super::report::{Ran, Report};
use super::{Target, upstream_port};

/// Values a healthy device would return, so a dry run follows the success path.
fn healthy_read(offset: u32) -> u32 {
    match offset {
        MHISTATUS => READY_STATUS,
        _ => 0,
    }
}

/// MHISTATUS of a device in MHI READY with the READY bit set.
const READY_STATUS: u32 = (MHI_STATE_READY as u32) << 8 | MHISTATUS_READY;

pub(super) fn dry_run(t: &Target, access: &str) -> Report {
    let p = &t.profile;
    let mut plan = vec![format!("lock {}", t.bdf)];
    if t.kernel_has_device_specific() {
        plan.push(
            "kernel has device_specific: sysfs reset_method <- device_specific (if not first)"
                .into(),
        );
        plan.push("sysfs reset <- 1".into());
    } else {
        if t.power_control.as_deref().is_some_and(|c| c != "on") {
            plan.push("sysfs power/control <- on".into());
        }
        plan.push(format!(
            "config ({access}) read vendor; stop with link-down if 0xffff"
        ));
        plan.push(format!("config ({access}) PCI_COMMAND <- saved | MEMORY"));
        plan.push(format!("map BAR{} via {access}", p.bar));
    }
    let mut io = Recorder::new(DryRun {
        assumed: healthy_read,
    });
    let outcome = sequence::run(p.family, &mut io, &mut |_| {});
    let ops = io.ops;
    if !t.kernel_has_device_specific() {
        plan.extend(ops.iter().map(std::string::ToString::to_string));
        plan.push(format!(
            "verify: poll MHISTATUS/MHICTRL/EE ({})",
            verdict::verify_schedule(p.family)
        ));
        plan.push(format!("unmap BAR{}", p.bar));
        plan.push(format!("config ({access}) PCI_COMMAND <- saved"));
        if let Some(c) = t.power_control.as_deref().filter(|c| *c != "on") {
            plan.push(format!("sysfs power/control <- {c}"));
        }
    }
    let port = match upstream_port(t) {
        Ok(p) => Some(p),
        Err(e) => {
            plan.insert(
                0,
                format!("upstream port unreadable ({e}): what it would mask is unknown"),
            );
            None
        }
    };
    if let Some(rec) = port.as_ref().and_then(PortRecord::plan) {
        plan.insert(
            0,
            format!(
                "upstream port {}: mask hotplug events {} / AER Surprise Down {} (restored at post)",
                rec.port,
                rec.slot_control.is_some(),
                rec.aer_mask.is_some()
            ),
        );
    }
    plan.push(format!("unlock {}", t.bdf));
    Report {
        bdf: t.bdf,
        profile: p.name,
        family: p.family,
        sequence_version: p.family.sequence_version(),
        access: "none",
        ops,
        port,
        ran: Ran::DryRun { outcome, plan },
    }
}
