//! Facts about this machine and claims on it: sysfs, who holds a device, the per-device lock and
//! the VFIO group hold a session owns the card by.
pub mod holders;
pub mod lock;
pub mod own;
pub mod sysfs;

use std::path::PathBuf;
use std::time::Duration;

use sysfs::PciSysfs;

/// Where sessions find the host's state; tests point every path at a tree of their own.
#[derive(Clone, Debug)]
pub struct Host {
    /// The PCI devices' sysfs.
    pub sysfs: PciSysfs,
    /// Where the VFIO group nodes are (`/dev/vfio`).
    pub dev_vfio: PathBuf,
    /// Where processes are named from (`/proc`).
    pub proc_root: PathBuf,
    /// Where locks and crash records live (`/run/qcom-reset`).
    pub run_dir: PathBuf,
    /// How long a session waits for a device's lock.
    pub lock_wait: Duration,
    /// Opens VFIO group nodes (the real open outside tests).
    pub open_group: crate::host::own::GroupOpener,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            sysfs: PciSysfs::default(),
            dev_vfio: PathBuf::from("/dev/vfio"),
            proc_root: PathBuf::from("/proc"),
            run_dir: PathBuf::from(crate::host::lock::DEFAULT_RUN_DIR),
            lock_wait: Duration::from_secs(30),
            open_group: Default::default(),
        }
    }
}
