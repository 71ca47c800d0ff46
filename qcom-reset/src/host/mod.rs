//! Facts about this machine and claims on it: sysfs, who holds a device, the per-device lock and
//! the VFIO group hold a session owns the card by.
pub mod holders;
pub mod lock;
pub mod own;
pub mod sysfs;
