//! Exclusive ownership of a device for a whole session. A device bound to vfio-pci is owned by
//! holding its VFIO group open: the kernel makes that open exclusive (EBUSY while QEMU or any
//! process holds the group, or has bound the device's iommufd cdev), opening the group alone
//! runs no kernel reset, and a VM that tries to start meanwhile fails cleanly instead of sharing
//! a card mid-reset. The `/proc` scan only names who holds it (and sees a cdev opened but not
//! yet bound). What the group does not block is an unbind from vfio-pci: the session checks the
//! driver before its sequence and leaves config space alone if a new driver took the device.
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::holders;
use crate::sysfs::SysfsDevice;
use crate::{Error, Result};

/// What a session holds so nothing else can open the device while it writes.
#[derive(Debug)]
pub struct Ownership {
    /// The open VFIO group; None for a device on no driver (nothing can open it through VFIO)
    /// or, with `--force`, on another driver.
    group: Option<(PathBuf, File)>,
}

impl Ownership {
    /// Owns `dev`: opens its VFIO group when it is bound to vfio-pci. Fails closed: a group that
    /// cannot be opened, for any reason, means the device is not ours to write.
    pub fn take(dev_vfio: &Path, proc_root: &Path, dev: &SysfsDevice) -> Result<Ownership> {
        if dev.driver()?.as_deref() != Some("vfio-pci") {
            return Ok(Ownership { group: None });
        }
        let Some(group) = dev.iommu_group()? else {
            return Err(Error::NotOwned {
                bdf: dev.bdf,
                why: "it is bound to vfio-pci but has no IOMMU group".into(),
            });
        };
        let path = dev_vfio.join(&group);
        match File::options().read(true).write(true).open(&path) {
            Ok(f) => Ok(Ownership {
                group: Some((path, f)),
            }),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::Held {
                bdf: dev.bdf,
                holder: holder_name(proc_root, dev, &path),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::NotOwned {
                bdf: dev.bdf,
                why: format!(
                    "{} does not exist (is /dev mounted and vfio loaded?)",
                    path.display()
                ),
            }),
            Err(e) => Err(Error::NotOwned {
                bdf: dev.bdf,
                why: format!("cannot open {}: {e}", path.display()),
            }),
        }
    }

    /// A second descriptor of the held group, for the VFIO access path (the group stays owned
    /// by this session: exclusivity belongs to the open, not to one descriptor).
    pub fn group_fd(&self) -> Option<std::io::Result<OwnedFd>> {
        self.group
            .as_ref()
            .map(|(_, f)| f.try_clone().map(OwnedFd::from))
    }

    /// The held group's path, for logs.
    pub fn group_path(&self) -> Option<&Path> {
        self.group.as_ref().map(|(p, _)| p.as_path())
    }
}

/// Who holds the device, from `/proc`; the kernel's EBUSY is the proof, this only names it.
fn holder_name(proc_root: &Path, dev: &SysfsDevice, group: &Path) -> String {
    let paths = holders::device_paths(dev).unwrap_or_else(|_| vec![group.to_path_buf()]);
    match holders::find(proc_root, &paths, Some(std::process::id())).first() {
        Some(h) => h.to_string(),
        None => format!(
            "a process not visible in {} (another PID namespace?) through {}",
            proc_root.display(),
            group.display()
        ),
    }
}
