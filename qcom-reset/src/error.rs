//! Every refusal the tool can give, each one line that names the cause and the fix.
use std::path::{Path, PathBuf};

use crate::access::failure::MapFailure;
use crate::bdf::{Bdf, BdfError};
use crate::host::own::NotOwnable;
use crate::session::record::RecordDefect;

/// Why the upstream port's reports could not be masked; each has its own fix.
#[derive(Debug)]
pub enum GuardFailure {
    /// The port is not (or no longer) the bridge above the card.
    NotAbove,
    /// An OS error reading or writing the port's config space.
    Io(std::io::Error),
}

impl GuardFailure {
    fn fix(&self) -> &'static str {
        match self {
            GuardFailure::Io(e) if e.raw_os_error() == Some(libc::EPERM) && is_root() => {
                "boot without lockdown (LOCKDOWN_PCI_ACCESS refuses writes to the port's config space)"
            }
            GuardFailure::Io(e) if e.raw_os_error() == Some(libc::EPERM | libc::EACCES) => {
                "run as root"
            }
            GuardFailure::NotAbove => {
                "check the topology (`lspci -t`); the card moved or its port was re-enumerated"
            }
            GuardFailure::Io(_) => "check the port with `lspci -vv` and the kernel log",
        }
    }
}

impl std::fmt::Display for GuardFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuardFailure::NotAbove => f.write_str("it is no longer the bridge above the card"),
            GuardFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Every refusal and failure of the library; each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed PCI address.
    #[error(transparent)]
    Bdf(#[from] BdfError),
    /// No device at the address (its sysfs directory is missing).
    #[error("no PCI device {0} (no {1}); list devices with `lspci -D` or `qcom-reset status`")]
    NoSuchDevice(Bdf, PathBuf),
    /// A device no profile matches.
    #[error(
        "device {vendor:04x}:{device:04x} is not a qcom-reset target (supported: {}); pass --profile NAME to treat it as one",
        crate::device::profile_names()
    )]
    NotTarget {
        /// The PCI vendor ID.
        vendor: u16,
        /// The PCI device ID.
        device: u16,
    },
    /// A device whose profile is experimental and not opted in.
    #[error(
        "{bdf} ({vendor:04x}:{device:04x}) matches the experimental profile {profile}; opt in with experimental = [\"{profile}\"] in the config or --experimental"
    )]
    Experimental {
        /// The card.
        bdf: Bdf,
        /// The PCI vendor ID.
        vendor: u16,
        /// The PCI device ID.
        device: u16,
        /// The profile's name.
        profile: &'static str,
    },
    /// The upstream port's link-drop reports cannot be masked.
    #[error(
        "cannot mask the link-drop reports (hotplug events, AER Surprise Down) of the port {port} above {bdf}: {why}; the reset's link drop would look like a hot-unplug or a fatal error there. Fix: {}, or accept it with allow_unguarded_link_drop = true (--allow-unguarded-link-drop)",
        why.fix()
    )]
    PortGuard {
        /// The card.
        bdf: Bdf,
        /// The upstream port (the bridge above the card).
        port: Bdf,
        /// What went wrong.
        why: GuardFailure,
    },
    /// DPC on the upstream port would contain the reset as a fatal error.
    #[error(
        "DPC is enabled on the port {port} above {bdf}: the reset's link drop would be contained by disabling the link; accept that with allow_dpc = true (--allow-dpc)"
    )]
    Dpc {
        /// The card.
        bdf: Bdf,
        /// The upstream port (the bridge above the card).
        port: Bdf,
    },
    /// A power cycle that failed once it began.
    #[error(
        "power cycle of {bdf} failed: {why}; what took the card away was undone where it could be (slot power on, port awake, rescan). Fix: check `lspci -s {bdf}`; if the card is missing, `echo 1 > /sys/bus/pci/rescan`, else run the reset alone (`qcom-reset reset {bdf}`)"
    )]
    PowerCycle {
        /// The card.
        bdf: Bdf,
        /// What went wrong.
        why: Box<crate::session::power::CycleFailure>,
    },
    /// A power cycle this host or card cannot have; nothing was changed.
    #[error("{bdf} cannot be power-cycled: {why}")]
    NoPowerCycle {
        /// The card.
        bdf: Bdf,
        /// What went wrong.
        why: crate::session::power::NoCycle,
    },
    /// A `--profile` name that is not in the device table.
    #[error("unknown profile {0:?}; known profiles: {known}", known = crate::device::profile_names())]
    UnknownProfile(String),
    // The io::Error fields are not `source`: their text is already in the message, and a
    // source would print it a second time in the error chain.
    /// A sysfs (or run directory) file that cannot be read.
    #[error("cannot read {path}: {err}{}", read_fix(err))]
    SysfsRead {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// A sysfs file that cannot be written.
    #[error("cannot write {path}: {err}{}", write_fix(path, err))]
    SysfsWrite {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// Another process (a VM) holds the device.
    #[error(
        "{bdf} is held by {holder}; stop or detach the VM first, the device must be released before a reset"
    )]
    Held {
        /// The card.
        bdf: Bdf,
        /// Who holds it (pid and command).
        holder: String,
    },
    /// Another qcom-reset session holds the device.
    #[error("{bdf} is in use by another qcom-reset ({holder}); wait for it to finish")]
    HeldBySession {
        /// The card.
        bdf: Bdf,
        /// Who holds it (pid and command).
        holder: String,
    },
    /// A host driver is bound and `--force` was not given.
    #[error(
        "{bdf} is bound to driver {driver}; bind it to vfio-pci (or unbind it) first, or pass --force to reset under that driver"
    )]
    WrongDriver {
        /// The card.
        bdf: Bdf,
        /// The driver's name.
        driver: String,
    },
    /// The card stopped being ours during the reset.
    #[error(
        "{bdf} was taken by {by} during the reset: nothing more was written to it, its config space is the new owner's. Fix: once it is back on vfio-pci, `qcom-reset status {bdf}` says whether it needs a reset"
    )]
    Taken {
        /// The card.
        bdf: Bdf,
        /// Who took it.
        by: crate::session::Lost,
    },
    /// The VFIO group of a card on vfio-pci cannot be held.
    #[error("{bdf} cannot be owned for a reset: {why}; not written")]
    NotOwned {
        /// The card.
        bdf: Bdf,
        /// What went wrong.
        why: NotOwnable,
    },
    /// A crash record that does not parse or names impossible registers.
    #[error(
        "the crash record {path} is unreadable ({why}); check the device by hand, then remove the file"
    )]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: RecordDefect,
    },
    /// The agent's published status does not parse.
    #[error(
        "the agent's status {path} is unreadable ({why}); restart the agent (`systemctl restart qcom-reset`)"
    )]
    AgentStatus {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: RecordDefect,
    },
    /// The crash record cannot be written; nothing was written to the device.
    #[error(
        "cannot write the record {path}: {err}; free space or remount the run directory read-write (--run-dir points elsewhere); nothing was written to the device"
    )]
    RecordWrite {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// A killed session's record waits: a host driver has the card now.
    #[error(
        "a killed qcom-reset left state to restore on {bdf} ({path}), but it is bound to {driver} now and its state belongs to that driver; it is left for a later run. Fix: bind the card to vfio-pci (or unbind it), then run `qcom-reset reset {bdf}` or restart the agent"
    )]
    RecordWaits {
        /// The card.
        bdf: Bdf,
        /// The file.
        path: PathBuf,
        /// The host driver the card is bound to.
        driver: String,
    },
    /// A killed session's state could not all be put back.
    #[error(
        "a killed qcom-reset's state on {bdf} could not all be put back ({left}); nothing more is written. Fix: restore it by hand from {path}, then remove that file"
    )]
    RecoveryIncomplete {
        /// The card.
        bdf: Bdf,
        /// The file.
        path: PathBuf,
        /// What could not be put back.
        left: String,
    },
    /// pciehp polls the slot, so masks cannot hide the link drop.
    #[error(
        "pciehp polls the slot above {bdf} (pciehp_poll_mode=1): it acts on the reset's link drop whatever the masks say and would remove the card. Fix: boot without pciehp.pciehp_poll_mode, or accept it with allow_unguarded_link_drop = true"
    )]
    PciehpPolls {
        /// The card.
        bdf: Bdf,
    },
    /// Another qcom-reset holds the device's lock.
    #[error("another qcom-reset holds the lock on {bdf} ({path}); wait for it to finish")]
    Busy {
        /// The card.
        bdf: Bdf,
        /// The file.
        path: PathBuf,
    },
    /// The lock file cannot be created.
    #[error("cannot create the lock {path}: {err}{}", lock_fix(err))]
    Lock {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// The card does not reach D0 for register access.
    #[error(
        "{bdf} stays in power state {state} with power/control=on; it must be in D0 for register access. Fix: check the upstream port's power state (`lspci -vv`); a card stuck in D3cold needs `qcom-reset power-cycle {bdf}`"
    )]
    NotD0 {
        /// The card.
        bdf: Bdf,
        /// The power state sysfs reports.
        state: String,
    },
    /// The BAR is smaller than the sequence reaches.
    #[error(
        "BAR{bar} of {bdf} is {len} bytes but the {family} sequence needs {need}; wrong --profile or --bar?"
    )]
    BarTooSmall {
        /// The card.
        bdf: Bdf,
        /// The BAR's index.
        bar: u8,
        /// The BAR's size in bytes.
        len: u64,
        /// The bytes the sequence reaches.
        need: u64,
        /// The family's name.
        family: &'static str,
    },
    /// The BAR cannot be mapped.
    #[error("cannot map BAR{bar} of {bdf} through {via}: {why}")]
    Map {
        /// The card.
        bdf: Bdf,
        /// The BAR's index.
        bar: u8,
        /// The access path (sysfs, vfio).
        via: &'static str,
        /// What went wrong.
        why: MapFailure,
    },
    /// Config space and BAR access need root.
    #[error(
        "this command needs root (CAP_SYS_ADMIN for config space and BAR access); run it with sudo"
    )]
    NotRoot,
    /// The kernel's own `device_specific` reset failed.
    #[error(
        "the kernel's own reset of {bdf} failed: {err}; see the kernel log (`dmesg`), or use qcom-reset's register sequence instead with --ignore-kernel-reset"
    )]
    KernelReset {
        /// The card.
        bdf: Bdf,
        /// The OS error.
        err: std::io::Error,
    },
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The one fix that fits a lock that cannot be created in the run directory.
fn lock_fix(err: &std::io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) if !is_root() => "; run as root",
        Some(libc::EROFS | libc::ENOSPC | libc::EDQUOT | libc::EACCES) => {
            "; the run directory is not writable: free it or point --run-dir at a writable tmpfs"
        }
        _ => "",
    }
}

/// The one fix that fits a failed sysfs read.
fn read_fix(err: &std::io::Error) -> &'static str {
    match err.kind() {
        std::io::ErrorKind::PermissionDenied if !is_root() => "; run as root",
        std::io::ErrorKind::NotFound => "; is sysfs mounted at /sys and the device still present?",
        _ => "",
    }
}

/// The one fix that fits a failed sysfs write: root is needed; as root, an EPERM on a device's
/// config space or BARs is kernel lockdown (LOCKDOWN_PCI_ACCESS guards only those), and on any
/// other file (`remove`, slot `power`, `drivers_autoprobe`, `power/control`) a missing
/// capability.
fn write_fix(path: &Path, err: &std::io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) if !is_root() => "; run as root",
        Some(libc::EPERM) if lockdown_guards(path) => {
            "; refused by kernel lockdown (LOCKDOWN_PCI_ACCESS): use --access vfio (`qcom-reset check` shows the lockdown mode)"
        }
        Some(libc::EPERM) => "; needs CAP_SYS_ADMIN in the initial user namespace (a container?)",
        _ => "",
    }
}

/// A device's `config` or `resource*` file: what kernel lockdown refuses to write.
fn lockdown_guards(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "config" || n.starts_with("resource"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::failure::MapStep;

    #[test]
    fn one_cause_one_fix_and_no_repeated_os_error() {
        let e = Error::SysfsWrite {
            path: "/sys/bus/pci/devices/0000:03:00.0/config".into(),
            err: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let text = e.to_string();
        if is_root() {
            assert!(
                text.contains("lockdown") && !text.contains("run as root"),
                "{text}"
            );
        } else {
            assert!(
                text.contains("run as root") && !text.contains("lockdown"),
                "{text}"
            );
        }
        // anyhow's `{:#}` prints the source chain: the OS error must not come twice.
        assert!(std::error::Error::source(&e).is_none());
        let chained = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            chained.matches("Operation not permitted").count(),
            1,
            "{chained}"
        );
        let other = Error::SysfsWrite {
            path: "/x".into(),
            err: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(!other.to_string().contains("lockdown"), "{other}");
    }

    #[test]
    fn a_mapping_failure_keeps_its_os_error_and_names_the_fix_for_its_step() {
        let mmap = |errno| MapFailure::Os {
            step: MapStep::MmapResource {
                path: "/sys/bus/pci/devices/0000:03:00.0/resource0".into(),
                len: 0x20_0000,
            },
            err: std::io::Error::from_raw_os_error(errno),
        };
        let text = mmap(libc::EPERM).to_string();
        assert!(
            text.contains("lockdown") && text.contains("--access vfio"),
            "{text}"
        );
        let text = mmap(libc::EINVAL).to_string();
        assert!(
            text.contains("2097152 bytes") && text.contains("iomem=strict"),
            "{text}"
        );
        let text = mmap(libc::ENOMEM).to_string();
        assert!(
            text.contains("resource0") && !text.contains("lockdown"),
            "{text}"
        );
        let e = Error::Map {
            bdf: "0000:03:00.0".parse().unwrap(),
            bar: 0,
            via: "vfio",
            why: MapFailure::Os {
                step: MapStep::Ioctl("VFIO_GROUP_GET_DEVICE_FD"),
                err: std::io::Error::from_raw_os_error(libc::EBUSY),
            },
        };
        let text = e.to_string();
        assert!(text.contains("VFIO_GROUP_GET_DEVICE_FD"), "{text}");
        let Error::Map {
            why: MapFailure::Os { err, .. },
            ..
        } = e
        else {
            unreachable!()
        };
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
    }

    #[test]
    fn only_config_and_resource_writes_blame_lockdown() {
        let eperm = |path: &str| {
            Error::SysfsWrite {
                path: path.into(),
                err: std::io::Error::from_raw_os_error(libc::EPERM),
            }
            .to_string()
        };
        for path in [
            "/sys/bus/pci/devices/0000:03:00.0/resource0",
            "/sys/bus/pci/devices/0000:03:00.0/resource2_wc",
        ] {
            let text = eperm(path);
            assert_eq!(text.contains("lockdown"), is_root(), "{text}");
        }
        for path in [
            "/sys/bus/pci/devices/0000:03:00.0/remove",
            "/sys/bus/pci/slots/2/power",
            "/sys/bus/pci/drivers_autoprobe",
            "/sys/bus/pci/devices/0000:00:1c.0/power/control",
        ] {
            let text = eperm(path);
            assert!(!text.contains("lockdown"), "{text}");
            if is_root() {
                assert!(
                    text.contains("needs CAP_SYS_ADMIN in the initial user namespace"),
                    "{text}"
                );
            } else {
                assert!(text.contains("run as root"), "{text}");
            }
        }
    }
}
