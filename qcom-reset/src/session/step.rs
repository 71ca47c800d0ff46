//! The steps of a reset session in one vocabulary: the real run records each step as it takes
//! it (the report's `steps`), the dry run lists the steps it would take (its `plan`), and
//! `safety::a_dry_run_plans_the_steps_the_real_run_takes` holds the two to the same list (the
//! plan's lock, unlock and register operations aside). A step of the restore is an attempt: what
//! failed is in the report's `restored.errors`.
use std::fmt;

use serde::Serialize;

use crate::bdf::Bdf;
use crate::device::Family;
use crate::device::regio::Op;
use crate::device::verdict;

use super::guard::HOLD_OVERRIDE;
use super::port::PortRecord;

/// One step of a reset session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The device's lock, taken before anything is read for the session.
    Lock(Bdf),
    /// Its VFIO group held open: no VM can open the card while the session writes.
    HoldGroup,
    /// A killed session's crash record put back first.
    Recover,
    /// The crash record written, before the first write.
    SaveRecord,
    /// `driver_override` set to [`HOLD_OVERRIDE`]: nothing binds the card meanwhile.
    HoldOffDrivers,
    /// `power/control` set to `on` (vfio-pci lets an unused card idle in D3hot).
    PowerOn,
    /// The upstream port's lock: two cards below one port never record each other's masks.
    LockPort(Bdf),
    /// The upstream port's reports of the coming link drop masked (recorded first).
    MaskPort {
        /// The port.
        port: Bdf,
        /// Its hotplug events are masked.
        hotplug: bool,
        /// Its AER Surprise Down is masked.
        surprise_down: bool,
    },
    /// `reset_method` made `device_specific` alone for one kernel reset (the list recorded).
    OnlyDeviceSpecific,
    /// The kernel's `device_specific` reset through sysfs `reset`.
    KernelReset,
    /// `reset_method` put back to the recorded list.
    PutBackMethods(String),
    /// Config space's IDs read through this access: all-ones ends the session's look with
    /// link-down, no BAR access.
    ReadIds(&'static str),
    /// PCI_COMMAND's memory decoding turned on through this access (vfio-pci leaves it off
    /// after a release).
    EnableMemory(&'static str),
    /// The BAR mapped through this access (and checked to be long enough for the sequence).
    MapBar {
        /// The BAR.
        bar: u8,
        /// The access path.
        via: &'static str,
    },
    /// One register operation of the sequence (the plan's; a real run's are the report's `ops`).
    Register(Op),
    /// The verification's reads, on the family's schedule.
    Verify(Family),
    /// The BAR unmapped.
    Unmap(u8),
    /// PCI_COMMAND put back through this access, and after a link drop every saved config word
    /// that reads otherwise.
    RestoreConfig(&'static str),
    /// The upstream port's masks put back, by its recorded address.
    RestorePort(Bdf),
    /// `power/control` put back.
    RestorePower(String),
    /// The `driver_override` the session replaced put back (unless someone set another).
    ReleaseDrivers,
    /// The device's lock let go.
    Unlock(Bdf),
    /// A dry run's note: the upstream port could not be read (a user other than root sees only
    /// its first 64 bytes), so what the reset would mask, or refuse, is unknown.
    PortUnread(String),
    /// A dry run's note: the crash record could not be read (it is root's), so whether a killed
    /// session's record is put back first is unknown.
    RecordUnread(String),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Lock(b) => write!(f, "lock {b}"),
            Step::HoldGroup => write!(f, "hold the VFIO group open (no VM can open the card)"),
            Step::Recover => write!(f, "put back what a killed session's record left"),
            Step::SaveRecord => write!(
                f,
                "record PCI_COMMAND, power/control, driver_override and config space on disk"
            ),
            Step::HoldOffDrivers => write!(f, "sysfs driver_override <- {HOLD_OVERRIDE}"),
            Step::PowerOn => write!(f, "sysfs power/control <- on"),
            Step::LockPort(p) => write!(f, "lock upstream port {p}"),
            Step::MaskPort {
                port,
                hotplug,
                surprise_down,
            } => write!(
                f,
                "upstream port {port}: mask hotplug events {hotplug} / AER Surprise Down {surprise_down} (restored at post)"
            ),
            Step::OnlyDeviceSpecific => write!(f, "sysfs reset_method <- device_specific"),
            Step::KernelReset => write!(f, "sysfs reset <- 1"),
            Step::PutBackMethods(m) => write!(f, "sysfs reset_method <- {m}"),
            Step::ReadIds(via) => write!(
                f,
                "config ({via}) read vendor; stop with link-down if 0xffff"
            ),
            Step::EnableMemory(via) => write!(f, "config ({via}) PCI_COMMAND <- saved | MEMORY"),
            Step::MapBar { bar, via } => write!(f, "map BAR{bar} via {via}"),
            Step::Register(op) => write!(f, "{op}"),
            Step::Verify(family) => write!(
                f,
                "verify: poll MHISTATUS/MHICTRL/EE ({})",
                verdict::verify_schedule(*family)
            ),
            Step::Unmap(bar) => write!(f, "unmap BAR{bar}"),
            Step::RestoreConfig(via) => write!(
                f,
                "config ({via}) PCI_COMMAND <- saved (after a link drop, every saved word that differs)"
            ),
            Step::RestorePort(p) => write!(f, "upstream port {p}: masks put back"),
            Step::RestorePower(c) => write!(f, "sysfs power/control <- {c}"),
            Step::ReleaseDrivers => write!(
                f,
                "sysfs driver_override <- as recorded (unless another was set since)"
            ),
            Step::Unlock(b) => write!(f, "unlock {b}"),
            Step::PortUnread(why) => write!(
                f,
                "upstream port unreadable ({why}): what it would mask is unknown"
            ),
            Step::RecordUnread(why) => write!(
                f,
                "crash record unreadable ({why}): whether a killed session's is put back first is unknown"
            ),
        }
    }
}

impl Step {
    /// The masking a port record stands for.
    pub fn mask(rec: &PortRecord) -> Step {
        Step::MaskPort {
            port: rec.port,
            hotplug: rec.slot_control.is_some(),
            surprise_down: rec.aer_mask.is_some(),
        }
    }
}

/// In JSON a step is its sentence, as the dry run's `plan` has always been.
impl Serialize for Step {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_its_sentence_in_json() {
        let bdf: Bdf = "0000:03:00.0".parse().unwrap();
        let steps = [
            Step::Lock(bdf),
            Step::Register(Op::Write {
                offset: 0x3008,
                value: 1,
            }),
        ];
        assert_eq!(
            serde_json::to_value(steps).unwrap(),
            serde_json::json!(["lock 0000:03:00.0", "write 0x3008 <- 0x00000001"])
        );
    }
}
