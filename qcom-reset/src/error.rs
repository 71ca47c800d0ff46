//! Every refusal the tool can give, each one line that names the cause and the fix.
use std::path::PathBuf;

use crate::bdf::{Bdf, BdfError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bdf(#[from] BdfError),
    #[error("no PCI device {0} (no {1}); list devices with `lspci -D` or `qcom-reset status`")]
    NoSuchDevice(Bdf, PathBuf),
    #[error(
        "device {vendor:04x}:{device:04x} is not a qcom-reset target (supported: {}); pass --profile NAME to treat it as one",
        crate::devices::profile_names()
    )]
    NotTarget { vendor: u16, device: u16 },
    #[error("unknown profile {0:?}; known profiles: {known}", known = crate::devices::profile_names())]
    UnknownProfile(String),
    #[error("cannot read {path}: {source}; run as root on a host with sysfs mounted at /sys")]
    SysfsRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot write {path}: {source}; run as root (and check `qcom-reset check` for lockdown)"
    )]
    SysfsWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{bdf} is held by {holder}; stop or detach the VM first, the device must be released before a reset"
    )]
    Held { bdf: Bdf, holder: String },
    #[error(
        "{bdf} is bound to driver {driver}; bind it to vfio-pci (or unbind it) first, or pass --force to reset under that driver"
    )]
    WrongDriver { bdf: Bdf, driver: String },
    #[error("{bdf} cannot be owned for a reset: {why}; not written")]
    NotOwned { bdf: Bdf, why: String },
    #[error(
        "the crash record {path} is unreadable ({why}); check the device by hand, then remove the file"
    )]
    BadRecord { path: PathBuf, why: String },
    #[error("another qcom-reset holds the lock on {bdf} ({path}); wait for it to finish")]
    Busy { bdf: Bdf, path: PathBuf },
    #[error(
        "cannot create the lock {path}: {source}; run as root or point --run-dir at a writable directory"
    )]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{bdf} stays in power state {state} with power/control=on; it must be in D0 for register access"
    )]
    NotD0 { bdf: Bdf, state: String },
    #[error(
        "BAR{bar} of {bdf} is {len} bytes but the {family} sequence needs {need}; wrong --profile or --bar?"
    )]
    BarTooSmall {
        bdf: Bdf,
        bar: u8,
        len: u64,
        need: u64,
        family: &'static str,
    },
    #[error("cannot map BAR{bar} of {bdf} through {via}: {why}")]
    Map {
        bdf: Bdf,
        bar: u8,
        via: &'static str,
        why: String,
    },
    #[error(
        "this command needs root (CAP_SYS_ADMIN for config space and BAR access); run it with sudo"
    )]
    NotRoot,
    #[error("the kernel's own reset of {bdf} failed: {source}")]
    KernelReset { bdf: Bdf, source: std::io::Error },
}
