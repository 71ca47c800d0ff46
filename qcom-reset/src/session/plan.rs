//! The dry run: the steps a reset would take, in the order and the words of the steps the real
//! run records ([`Step`]), each decided by the condition the real run decides it by; the
//! register operations come from the same sequence code run against a card that answers as a
//! healthy one would. It reads what the real run reads first and refuses what that shows the
//! reset would refuse (DPC, pciehp polling, a corrupt crash record). What it cannot read (as a
//! user other than root: the port's capabilities, the crash record) it names as unknown.
use crate::bdf::Bdf;
use crate::device::regio::{DryRun, Recorder};
use crate::device::regs::*;
use crate::device::sequence;
use crate::host::Host;
use crate::{Error, Result, session::record};

use super::kernel::method_swap;
use super::port::{PortRecord, PortState};
use super::report::{Ran, Report};
use super::reset::{Request, port_refusal, uses_kernel_reset};
use super::step::Step;
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

/// What a reset of `t` through `via` would do, writing nothing.
pub(super) fn dry_run(host: &Host, req: &Request, t: &Target, via: &'static str) -> Result<Report> {
    let p = &t.profile;
    let mut plan = vec![Step::Lock(t.bdf)];
    let port = match upstream_port(t) {
        Ok(port) => Some(port),
        Err(e) => {
            plan.push(Step::PortUnread(e.to_string()));
            None
        }
    };
    if let Some(port) = &port {
        port_refusal(host, req, t, port)?;
    }
    let kernel = uses_kernel_reset(t, req);
    let (outcome, ops) = if kernel {
        (None, Vec::new())
    } else {
        let mut io = Recorder::new(DryRun {
            assumed: healthy_read,
        });
        (Some(sequence::run(p.family, &mut io, &mut |_| {})), io.ops)
    };
    let left = match record::load(&host.run_dir, t.bdf) {
        Ok(left) => left,
        Err(e @ Error::BadRecord { .. }) => return Err(e),
        Err(e) => {
            plan.push(Step::RecordUnread(e.to_string()));
            None
        }
    };
    let power = woken_from(t, left.as_ref());
    let recovered_port = left.as_ref().and_then(|r| r.port.as_ref()).map(|p| p.port);
    plan.extend(own(t, left.is_some(), recovered_port, power.is_some())?);
    plan.extend(port.iter().flat_map(|p| guard(p, recovered_port)));
    if kernel {
        plan.extend(kernel_reset(t));
    }
    plan.extend([
        Step::ReadIds(via),
        Step::EnableMemory(via),
        Step::MapBar { bar: p.bar, via },
    ]);
    plan.extend(ops.iter().copied().map(Step::Register));
    plan.extend([Step::Verify(p.family), Step::Unmap(p.bar)]);
    plan.extend(restore(t, port.as_ref(), via, power)?);
    plan.push(Step::Unlock(t.bdf));
    Ok(Report {
        bdf: t.bdf,
        profile: p.name,
        family: p.family,
        sequence_version: p.family.sequence_version(),
        access: "none",
        ops,
        port,
        ran: Ran::DryRun { outcome, plan },
    })
}

/// [`Session::begin`](super::guard::Session::begin)'s steps: the group held (a card on
/// vfio-pci), a killed session's record put back, the baseline recorded, drivers held off (a
/// kernel with `driver_override`), the card woken (unless runtime PM is off already).
fn own(t: &Target, recover: bool, recovered_port: Option<Bdf>, wake: bool) -> Result<Vec<Step>> {
    let hold = t.dev.driver_override()?.is_some();
    Ok([
        (t.driver.as_deref() == Some("vfio-pci")).then_some(Step::HoldGroup),
        recovered_port.map(Step::LockPort),
        recover.then_some(Step::Recover),
        Some(Step::SaveRecord),
        hold.then_some(Step::HoldOffDrivers),
        wake.then_some(Step::PowerOn),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// The `power/control` the session finds, when it sets it to `on` (and puts it back at post):
/// the card's, or the one a killed session's record puts back first.
fn woken_from(t: &Target, left: Option<&record::Record>) -> Option<String> {
    left.and_then(|r| r.power_control.clone())
        .or_else(|| t.power_control.clone())
        .filter(|c| c != "on")
}

/// The upstream port's lock, and its link-drop reports masked when they are on.
/// A port whose lock the recovery took is not locked again.
fn guard(port: &PortState, locked: Option<Bdf>) -> impl Iterator<Item = Step> {
    let lock = port.port.filter(|p| Some(*p) != locked).map(Step::LockPort);
    let mask = PortRecord::plan(port).map(|rec| Step::mask(&rec));
    lock.into_iter().chain(mask)
}

/// The kernel's reset, `device_specific` made the only method around it when it is not first.
fn kernel_reset(t: &Target) -> Vec<Step> {
    let swap = method_swap(t.reset_methods.as_deref().unwrap_or_default());
    let mut steps = Vec::new();
    if swap.is_some() {
        steps.push(Step::OnlyDeviceSpecific);
    }
    steps.push(Step::KernelReset);
    steps.extend(swap.map(Step::PutBackMethods));
    steps
}

/// Post: config space, the port's masks, `power/control`, the `driver_override`.
fn restore(
    t: &Target,
    port: Option<&PortState>,
    via: &'static str,
    power: Option<String>,
) -> Result<Vec<Step>> {
    let masked = port
        .and_then(PortRecord::plan)
        .map(|rec| Step::RestorePort(rec.port));
    let release = t.dev.driver_override()?.is_some();
    Ok([
        Some(Step::RestoreConfig(via)),
        masked,
        power.map(Step::RestorePower),
        release.then_some(Step::ReleaseDrivers),
    ]
    .into_iter()
    .flatten()
    .collect())
}
