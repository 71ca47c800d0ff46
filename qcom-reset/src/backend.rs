//! How config space and the register BAR are reached: sysfs (`config`, `resourceN` mmap) or the
//! VFIO device fd. Under kernel lockdown sysfs config writes and BAR mmaps are refused
//! (LOCKDOWN_PCI_ACCESS), while the VFIO regions are not, so `auto` picks VFIO there.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::io::{MmioBar, RegisterIo};
use crate::session::own::Ownership;
use crate::sysfs::SysfsDevice;
use crate::{Error, bdf::Bdf};

/// Config space plus the register BAR of one PCI function.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn config_read16(&mut self, offset: u64) -> io::Result<u16>;
    fn config_write16(&mut self, offset: u64, value: u16) -> io::Result<()>;
    /// Maps BAR `bar`; returns the accessor and the BAR's length.
    fn map_bar(&mut self, bar: u8) -> Result<(Box<dyn RegisterIo>, u64), Error>;
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// sysfs unless the kernel is locked down, then VFIO.
    #[default]
    Auto,
    /// sysfs `config` and `resourceN` mmap (refused under lockdown).
    Sysfs,
    /// The VFIO device fd (needs vfio-pci and no other holder; works under lockdown).
    Vfio,
}

impl Access {
    pub const fn name(self) -> &'static str {
        match self {
            Access::Auto => "auto",
            Access::Sysfs => "sysfs",
            Access::Vfio => "vfio",
        }
    }
}

/// The kernel lockdown mode ("none", "integrity", "confidentiality"), if securityfs shows it.
pub fn lockdown_mode(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let start = s.find('[')? + 1;
    let end = s[start..].find(']')? + start;
    Some(s[start..end].to_string())
}

pub const LOCKDOWN_PATH: &str = "/sys/kernel/security/lockdown";

/// Whether `access` reaches the device through its VFIO device fd. That open is not passive:
/// the kernel runs vfio_pci_core_enable, which resets the device (an SBR up to 7.1, the quirk
/// from 7.4), and the close runs the release path again.
pub fn opens_device(access: Access) -> bool {
    let locked = lockdown_mode(Path::new(LOCKDOWN_PATH)).is_some_and(|m| m != "none");
    matches!((access, locked), (Access::Vfio, _) | (Access::Auto, true))
}

/// Why registers are not read through VFIO where reading must not change the device.
pub const VFIO_OPEN_RESETS: &str = "reading the registers through VFIO (--access vfio, or auto under lockdown) opens the device, and the kernel resets it at every open and close";

/// Opens the device a session owns; the VFIO path goes through the group the session holds.
pub fn open(dev: &SysfsDevice, access: Access, own: &Ownership) -> Result<Box<dyn Backend>, Error> {
    if !opens_device(access) {
        return Ok(Box::new(SysfsBackend::open(dev)?));
    }
    let fail = vfio_fail(dev.bdf);
    let group = own
        .group_fd()
        .ok_or_else(|| fail("the device must be bound to vfio-pci for VFIO access".into()))?
        .map_err(|e| fail(format!("duplicating the held group: {e}")))?;
    Ok(Box::new(VfioBackend::with_group(dev, group)?))
}

pub struct SysfsBackend {
    dev: SysfsDevice,
    config: File,
}

impl SysfsBackend {
    pub fn open(dev: &SysfsDevice) -> Result<Self, Error> {
        let path = dev.path("config");
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| Error::SysfsWrite { path, err: source })?;
        Ok(SysfsBackend {
            dev: dev.clone(),
            config,
        })
    }
}

fn read16_at(f: &File, off: u64) -> io::Result<u16> {
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, off)?;
    Ok(u16::from_le_bytes(b))
}

impl Backend for SysfsBackend {
    fn name(&self) -> &'static str {
        "sysfs"
    }
    fn config_read16(&mut self, offset: u64) -> io::Result<u16> {
        read16_at(&self.config, offset)
    }
    fn config_write16(&mut self, offset: u64, value: u16) -> io::Result<()> {
        self.config.write_all_at(&value.to_le_bytes(), offset)
    }
    fn map_bar(&mut self, bar: u8) -> Result<(Box<dyn RegisterIo>, u64), Error> {
        let bdf = self.dev.bdf;
        let map_err = |why: String| Error::Map {
            bdf,
            bar,
            via: "sysfs",
            why,
        };
        let len = self.dev.bar_len(bar)?;
        if len == 0 {
            return Err(map_err(format!(
                "BAR{bar} is not assigned (resource table)"
            )));
        }
        let path = self.dev.path(&format!("resource{bar}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| map_err(format!("open {}: {e}", path.display())))?;
        let map = memmap2::MmapOptions::new().len(len as usize).map_raw(&file).map_err(|e| {
            map_err(match e.raw_os_error() {
                Some(libc::EPERM) => "refused by kernel lockdown (LOCKDOWN_PCI_ACCESS); use --access vfio".into(),
                Some(libc::EINVAL) => format!(
                    "mmap of {len} bytes refused (EINVAL): a driver claimed the region exclusively (iomem=strict) or the size does not fit the BAR; bind the device to vfio-pci with no VM holding it, or use --access vfio"
                ),
                _ => format!("mmap {}: {e}", path.display()),
            })
        })?;
        Ok((Box::new(MmioBar::new(map)), len))
    }
}

// VFIO uAPI (include/uapi/linux/vfio.h): _IO(';', 100 + n).
const VFIO_GET_API_VERSION: u64 = 0x3b64;
const VFIO_CHECK_EXTENSION: u64 = 0x3b65;
const VFIO_SET_IOMMU: u64 = 0x3b66;
const VFIO_GROUP_GET_STATUS: u64 = 0x3b67;
const VFIO_GROUP_SET_CONTAINER: u64 = 0x3b68;
const VFIO_GROUP_GET_DEVICE_FD: u64 = 0x3b6a;
const VFIO_DEVICE_GET_REGION_INFO: u64 = 0x3b6c;
const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1_IOMMU: u64 = 1;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

/// The device opened through its VFIO group, the way QEMU opens it. Opening runs the kernel's
/// `vfio_pci_core_enable` (and its reset attempt); the agent's probes ignore its own TGID.
pub struct VfioBackend {
    bdf: Bdf,
    _container: OwnedFd,
    _group: OwnedFd,
    device: File,
    config_offset: u64,
}

fn ioctl(fd: &impl AsRawFd, req: u64, arg: u64) -> io::Result<i32> {
    // SAFETY: every request passes either an integer or a pointer to a live, correctly sized
    // #[repr(C)] struct (or NUL-terminated string), as the VFIO uAPI defines for it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl VfioBackend {
    /// Opens the device through its group, as QEMU does (the VM lab's stand-in for a VM).
    pub fn open(dev: &SysfsDevice) -> Result<Self, Error> {
        let fail = vfio_fail(dev.bdf);
        let group = dev
            .iommu_group()?
            .ok_or_else(|| fail("the device has no IOMMU group; VFIO needs an IOMMU".into()))?;
        let gpath = format!("/dev/vfio/{group}");
        let groupf = File::options()
            .read(true)
            .write(true)
            .open(&gpath)
            .map_err(|e| {
                fail(format!(
                    "open {gpath}: {e} (EBUSY: someone else holds the group)"
                ))
            })?;
        Self::with_group(dev, groupf.into())
    }

    /// Opens the device fd through an already open group (a session's owned group).
    pub fn with_group(dev: &SysfsDevice, group: OwnedFd) -> Result<Self, Error> {
        let bdf = dev.bdf;
        let fail = vfio_fail(bdf);
        if dev.driver()?.as_deref() != Some("vfio-pci") {
            return Err(fail(
                "the device must be bound to vfio-pci for VFIO access".into(),
            ));
        }
        let groupf = File::from(group);
        let container = File::options()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(|e| {
                fail(format!(
                    "open /dev/vfio/vfio: {e} (is the vfio module loaded?)"
                ))
            })?;
        if ioctl(&container, VFIO_GET_API_VERSION, 0).map_err(|e| fail(e.to_string()))?
            != VFIO_API_VERSION
        {
            return Err(fail("unknown VFIO API version".into()));
        }
        if ioctl(&container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)
            .map_err(|e| fail(e.to_string()))?
            == 0
        {
            return Err(fail(
                "no type1 IOMMU backend; modprobe vfio_iommu_type1".into(),
            ));
        }
        let mut st = GroupStatus {
            argsz: size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        ioctl(&groupf, VFIO_GROUP_GET_STATUS, &raw mut st as u64)
            .map_err(|e| fail(e.to_string()))?;
        if st.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(fail(
                "its IOMMU group is not viable: bind every device in it to vfio-pci".into(),
            ));
        }
        let cfd = container.as_raw_fd();
        ioctl(&groupf, VFIO_GROUP_SET_CONTAINER, &raw const cfd as u64)
            .map_err(|e| fail(e.to_string()))?;
        ioctl(&container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU).map_err(|e| fail(e.to_string()))?;
        let name = std::ffi::CString::new(bdf.to_string()).expect("no NUL in a BDF");
        let dfd = ioctl(&groupf, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr() as u64)
            .map_err(|e| fail(format!("get device fd: {e}")))?;
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let device = unsafe { File::from_raw_fd(dfd) };
        let config =
            region_info(&device, VFIO_PCI_CONFIG_REGION_INDEX).map_err(|e| fail(e.to_string()))?;
        Ok(VfioBackend {
            bdf,
            _container: container.into(),
            _group: groupf.into(),
            device,
            config_offset: config.offset,
        })
    }
}

/// The container and group of a VFIO user whose device fd is closed.
pub struct VfioGroupHold {
    _container: OwnedFd,
    _group: OwnedFd,
}

impl VfioBackend {
    /// Closes the device (the kernel's release path runs) but keeps the group open, as QEMU
    /// does for a while during a graceful shutdown.
    pub fn close_device(self) -> VfioGroupHold {
        drop(self.device);
        VfioGroupHold {
            _container: self._container,
            _group: self._group,
        }
    }
}

fn vfio_fail(bdf: Bdf) -> impl Fn(String) -> Error {
    move |why| Error::Map {
        bdf,
        bar: 0,
        via: "vfio",
        why,
    }
}

fn region_info(device: &File, index: u32) -> io::Result<RegionInfo> {
    let mut info = RegionInfo {
        argsz: size_of::<RegionInfo>() as u32,
        index,
        ..Default::default()
    };
    ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &raw mut info as u64)?;
    Ok(info)
}

impl Backend for VfioBackend {
    fn name(&self) -> &'static str {
        "vfio"
    }
    fn config_read16(&mut self, offset: u64) -> io::Result<u16> {
        read16_at(&self.device, self.config_offset + offset)
    }
    fn config_write16(&mut self, offset: u64, value: u16) -> io::Result<()> {
        self.device
            .write_all_at(&value.to_le_bytes(), self.config_offset + offset)
    }
    fn map_bar(&mut self, bar: u8) -> Result<(Box<dyn RegisterIo>, u64), Error> {
        let map_err = |why: String| Error::Map {
            bdf: self.bdf,
            bar,
            via: "vfio",
            why,
        };
        let info = region_info(&self.device, bar as u32).map_err(|e| map_err(e.to_string()))?;
        if info.size == 0 || info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(map_err("the region is empty or not mappable".into()));
        }
        let map = memmap2::MmapOptions::new()
            .offset(info.offset)
            .len(info.size as usize)
            .map_raw(&self.device)
            .map_err(|e| map_err(format!("mmap: {e}")))?;
        Ok((Box::new(MmioBar::new(map)), info.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bracketed_lockdown_mode() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lockdown");
        std::fs::write(&p, "none [integrity] confidentiality\n").unwrap();
        assert_eq!(lockdown_mode(&p).as_deref(), Some("integrity"));
        std::fs::write(&p, "[none] integrity confidentiality\n").unwrap();
        assert_eq!(lockdown_mode(&p).as_deref(), Some("none"));
        assert_eq!(lockdown_mode(&t.path().join("missing")), None);
    }
}
