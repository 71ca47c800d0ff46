//! A session on one card: own it (its lock, its VFIO group, drivers held off), save what it will
//! touch in a crash record, guard the upstream port, reset, verify and restore what it touched
//! on every path. The public entry points are here; each step has its file.
mod check;
pub mod guard;
mod kernel;
mod owner;
mod plan;
pub mod port;
pub mod power;
pub mod record;
mod report;
mod reset;
mod restore;
mod status;
pub mod step;
mod target;

use crate::access::Backend;
use crate::bdf::Bdf;
use crate::host::Host;
use crate::host::lock::DeviceLock;
use crate::host::own::Ownership;
use crate::host::sysfs::SysfsDevice;
use crate::{Error, Result};

pub use check::{Checked, check_then_reset};
pub use guard::{HOLD_OVERRIDE, Restored};
use guard::{Session, Writes};
pub use owner::Lost;
pub use report::{Method, Phases, Ran, Report, Reset};
pub use reset::{Request, reset, upstream_port};
pub use status::{ReadMode, Reading, Status, Unread, status, unread_status};
pub use step::Step;
pub use target::{Regime, Target, inspect, targets};

/// Opens config space and the BAR of a device the session owns (sysfs or VFIO through the held
/// group in production, the simulator in tests).
pub type Opener<'a> = dyn FnMut(&SysfsDevice, &Ownership) -> Result<Box<dyn Backend>> + 'a;

/// Puts back what killed qcom-reset sessions left on devices (their records in the run
/// directory): each under its lock and ownership, like any session. Returns what was restored.
pub fn recover_pending(host: &Host, open: &mut Opener<'_>) -> Vec<(Bdf, Result<Restored>)> {
    crate::session::record::pending(&host.run_dir)
        .into_iter()
        .map(|bdf| (bdf, recover_one(host, bdf, open)))
        .collect()
}

fn recover_one(host: &Host, bdf: Bdf, open: &mut Opener<'_>) -> Result<Restored> {
    let _lock = DeviceLock::acquire(&host.run_dir, bdf, host.lock_wait)?;
    let dev = match host.sysfs.device(bdf) {
        Ok(d) => d,
        Err(Error::NoSuchDevice(..)) => {
            return restore::recover_absent(&host.run_dir, &host.sysfs, bdf);
        }
        Err(e) => return Err(e),
    };
    let (mut session, recovered) = begin_session(host, &dev, open, Writes::Allowed)?;
    session.restore();
    Ok(recovered.unwrap_or_default())
}

/// Own the device, open it through what the session holds, and begin the session (recovering
/// a killed one's record first). The caller holds the device's lock.
fn begin_session(
    host: &Host,
    dev: &SysfsDevice,
    open: &mut Opener<'_>,
    writes: Writes,
) -> Result<(Session, Option<Restored>)> {
    let own = Ownership::take(&host.dev_vfio, &host.proc_root, dev, &host.open_group)?;
    let backend = open(dev, &own)?;
    Session::begin(
        dev,
        host.run_dir.clone(),
        host.lock_wait,
        own,
        backend,
        writes,
    )
}
