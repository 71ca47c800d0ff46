//! How config space and the register BAR are reached: sysfs (`config`, `resourceN` mmap) or the
//! VFIO device fd. Under kernel lockdown sysfs config writes and BAR mmaps are refused
//! (LOCKDOWN_PCI_ACCESS), while the VFIO regions are not, so `auto` picks VFIO there.
pub mod failure;
pub mod mmio;
pub mod revoke;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};
use serde::Serialize;
use vfio_bindings::bindings::vfio as uapi;

use crate::device::regio::RegisterIo;
use crate::host::own::Ownership;
use crate::host::sysfs::SysfsDevice;
use crate::pci::{ConfigSpace as _, SysfsConfig};
use crate::{Error, bdf::Bdf};
use failure::{MapFailure, MapStep};
use mmio::MmioBar;

/// Config space plus the register BAR of one PCI function.
pub trait Backend: Send {
    /// The path's name, for reports (`sysfs`, `vfio`).
    fn name(&self) -> &'static str;
    /// Reads a 16-bit config register.
    fn config_read16(&mut self, offset: u16) -> io::Result<u16>;
    /// Writes a 16-bit config register.
    fn config_write16(&mut self, offset: u16, value: u16) -> io::Result<()>;
    /// Maps BAR `bar`; returns the accessor and the BAR's length.
    fn map_bar(&mut self, bar: u8) -> Result<(Box<dyn RegisterIo>, u64), Error>;
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
/// How registers are reached (`--access`).
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
    /// Its name, as `--access` takes it.
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

/// Where the kernel shows its lockdown mode.
pub const LOCKDOWN_PATH: &str = "/sys/kernel/security/lockdown";

/// Whether `access` reaches the device through its VFIO device fd. That open is not passive:
/// the kernel runs vfio_pci_core_enable, which resets the device (an SBR up to 7.1, the quirk
/// from 7.4), and the close runs the release path again.
pub fn opens_device(access: Access) -> bool {
    let locked = lockdown_mode(Path::new(LOCKDOWN_PATH)).is_some_and(|m| m != "none");
    matches!((access, locked), (Access::Vfio, _) | (Access::Auto, true))
}

/// The name of the backend [`open`] picks for `access` on this host ("sysfs" or "vfio"), as a
/// session's steps and report name it: a dry run plans in the words the reset will report.
pub fn backend_name(access: Access) -> &'static str {
    if opens_device(access) {
        "vfio"
    } else {
        "sysfs"
    }
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
        .ok_or_else(|| fail(MapFailure::NotVfioPci))?
        .map_err(|err| fail(os(MapStep::DupGroup, err)))?;
    Ok(Box::new(VfioBackend::with_group(dev, group)?))
}

/// Config space and BARs through sysfs (`config`, `resourceN`).
pub struct SysfsBackend {
    dev: SysfsDevice,
    config: SysfsConfig,
}

impl SysfsBackend {
    /// Opens the device's `config` for reading and writing.
    pub fn open(dev: &SysfsDevice) -> Result<Self, Error> {
        let path = dev.path("config");
        let config = SysfsConfig::open(&path, true)
            .map_err(|source| Error::SysfsWrite { path, err: source })?;
        Ok(SysfsBackend {
            dev: dev.clone(),
            config,
        })
    }
}

impl Backend for SysfsBackend {
    fn name(&self) -> &'static str {
        "sysfs"
    }
    fn config_read16(&mut self, offset: u16) -> io::Result<u16> {
        self.config.read16(offset)
    }
    fn config_write16(&mut self, offset: u16, value: u16) -> io::Result<()> {
        self.config.write16(offset, value)
    }
    fn map_bar(&mut self, bar: u8) -> Result<(Box<dyn RegisterIo>, u64), Error> {
        let bdf = self.dev.bdf;
        let map_err = |why| Error::Map {
            bdf,
            bar,
            via: "sysfs",
            why,
        };
        let len = self.dev.bar_len(bar)?;
        if len == 0 {
            return Err(map_err(MapFailure::Unassigned));
        }
        let path = self.dev.path(&format!("resource{bar}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|err| map_err(os(MapStep::OpenResource(path.clone()), err)))?;
        let map = memmap2::MmapOptions::new()
            .len(len as usize)
            .map_raw(&file)
            .map_err(|err| map_err(os(MapStep::MmapResource { path, len }, err)))?;
        let bar = MmioBar::new(map).ok_or_else(|| map_err(MapFailure::TooManyMaps))?;
        Ok((Box::new(bar), len))
    }
}

// The VFIO uAPI (include/uapi/linux/vfio.h) from rust-vmm's bindings. Every request is
// `_IO(VFIO_TYPE, VFIO_BASE + n)` whatever it passes, and its return value is the answer (a
// version, a yes/no, a new fd).
const fn vfio_request(n: u32) -> Opcode {
    opcode::none(uapi::VFIO_TYPE, (uapi::VFIO_BASE + n) as u8)
}
const VFIO_GET_API_VERSION: Opcode = vfio_request(0);
const VFIO_CHECK_EXTENSION: Opcode = vfio_request(1);
const VFIO_SET_IOMMU: Opcode = vfio_request(2);
const VFIO_GROUP_GET_STATUS: Opcode = vfio_request(3);
const VFIO_GROUP_SET_CONTAINER: Opcode = vfio_request(4);
const VFIO_GROUP_GET_DEVICE_FD: Opcode = vfio_request(6);
const VFIO_DEVICE_GET_REGION_INFO: Opcode = vfio_request(8);

/// One VFIO request for rustix's `ioctl`: the argument as the kernel takes it, the return value
/// as the output.
struct Request {
    opcode: Opcode,
    arg: *mut std::ffi::c_void,
}

// SAFETY: `ioctl` below builds a Request only with an argument its opcode takes (an integer, or
// a pointer to a live, correctly sized uAPI struct or NUL-terminated string); the output is the
// return value alone, nothing is read back through the pointer here.
unsafe impl Ioctl for Request {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        self.opcode
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.arg
    }
    // SAFETY: (the trait's contract) the output is the return value; the pointer is not read.
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// An argument of a VFIO request.
enum Arg<'a, T> {
    Int(u32),
    Struct(&'a mut T),
    Name(&'a std::ffi::CStr),
}

fn ioctl<T>(fd: impl AsFd, opcode: Opcode, arg: Arg<'_, T>) -> io::Result<i32> {
    let arg = match arg {
        Arg::Int(n) => std::ptr::without_provenance_mut(n as usize),
        Arg::Struct(s) => (s as *mut T).cast(),
        Arg::Name(n) => n.as_ptr().cast_mut().cast(),
    };
    // SAFETY: the callers below pair each opcode with the argument include/uapi/linux/vfio.h
    // defines for it; the pointer outlives the call (borrowed for it).
    Ok(unsafe { rustix::ioctl::ioctl(fd, Request { opcode, arg }) }?)
}

fn int(fd: impl AsFd, opcode: Opcode, n: u32) -> io::Result<i32> {
    ioctl::<()>(fd, opcode, Arg::Int(n))
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

impl VfioBackend {
    /// Opens the device through its group, as QEMU does (the VM lab's stand-in for a VM).
    pub fn open(dev: &SysfsDevice) -> Result<Self, Error> {
        let fail = vfio_fail(dev.bdf);
        let group = dev
            .iommu_group()?
            .ok_or_else(|| fail(MapFailure::NoIommuGroup))?;
        let gpath = PathBuf::from(format!("/dev/vfio/{group}"));
        let groupf = File::options()
            .read(true)
            .write(true)
            .open(&gpath)
            .map_err(|err| fail(os(MapStep::OpenGroup(gpath.clone()), err)))?;
        Self::with_group(dev, groupf.into())
    }

    /// Opens the device fd through an already open group (a session's owned group).
    pub fn with_group(dev: &SysfsDevice, group: OwnedFd) -> Result<Self, Error> {
        let bdf = dev.bdf;
        let fail = vfio_fail(bdf);
        if dev.driver()?.as_deref() != Some("vfio-pci") {
            return Err(fail(MapFailure::NotVfioPci));
        }
        let groupf = File::from(group);
        let container = File::options()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(|err| fail(os(MapStep::OpenContainer, err)))?;
        let ioctl_fail = |name| move |err| fail(os(MapStep::Ioctl(name), err));
        if int(&container, VFIO_GET_API_VERSION, 0).map_err(ioctl_fail("VFIO_GET_API_VERSION"))?
            != uapi::VFIO_API_VERSION as i32
        {
            return Err(fail(MapFailure::UnknownApi));
        }
        if int(&container, VFIO_CHECK_EXTENSION, uapi::VFIO_TYPE1_IOMMU)
            .map_err(ioctl_fail("VFIO_CHECK_EXTENSION"))?
            == 0
        {
            return Err(fail(MapFailure::NoType1));
        }
        let mut st = uapi::vfio_group_status {
            argsz: size_of::<uapi::vfio_group_status>() as u32,
            flags: 0,
        };
        ioctl(&groupf, VFIO_GROUP_GET_STATUS, Arg::Struct(&mut st))
            .map_err(ioctl_fail("VFIO_GROUP_GET_STATUS"))?;
        if st.flags & uapi::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(fail(MapFailure::NotViable));
        }
        // The group takes a pointer to the container's fd.
        let mut cfd = container.as_raw_fd();
        ioctl(&groupf, VFIO_GROUP_SET_CONTAINER, Arg::Struct(&mut cfd))
            .map_err(ioctl_fail("VFIO_GROUP_SET_CONTAINER"))?;
        int(&container, VFIO_SET_IOMMU, uapi::VFIO_TYPE1_IOMMU)
            .map_err(ioctl_fail("VFIO_SET_IOMMU"))?;
        let name = std::ffi::CString::new(bdf.to_string()).expect("no NUL in a BDF");
        let dfd = ioctl::<()>(&groupf, VFIO_GROUP_GET_DEVICE_FD, Arg::Name(&name))
            .map_err(ioctl_fail("VFIO_GROUP_GET_DEVICE_FD"))?;
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let device = unsafe { File::from_raw_fd(dfd) };
        let config = region_info(&device, uapi::VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(ioctl_fail("VFIO_DEVICE_GET_REGION_INFO"))?;
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

fn os(step: MapStep, err: io::Error) -> MapFailure {
    MapFailure::Os { step, err }
}

fn vfio_fail(bdf: Bdf) -> impl Fn(MapFailure) -> Error + Copy {
    move |why| Error::Map {
        bdf,
        bar: 0,
        via: "vfio",
        why,
    }
}

fn region_info(device: &File, index: u32) -> io::Result<uapi::vfio_region_info> {
    let mut info = uapi::vfio_region_info {
        argsz: size_of::<uapi::vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    ioctl(device, VFIO_DEVICE_GET_REGION_INFO, Arg::Struct(&mut info))?;
    Ok(info)
}

impl Backend for VfioBackend {
    fn name(&self) -> &'static str {
        "vfio"
    }
    fn config_read16(&mut self, offset: u16) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, self.config_offset + u64::from(offset))?;
        Ok(u16::from_le_bytes(b))
    }
    fn config_write16(&mut self, offset: u16, value: u16) -> io::Result<()> {
        self.device
            .write_all_at(&value.to_le_bytes(), self.config_offset + u64::from(offset))
    }
    fn map_bar(&mut self, bar: u8) -> Result<(Box<dyn RegisterIo>, u64), Error> {
        let map_err = |why| Error::Map {
            bdf: self.bdf,
            bar,
            via: "vfio",
            why,
        };
        let info = region_info(&self.device, u32::from(bar))
            .map_err(|err| map_err(os(MapStep::Ioctl("VFIO_DEVICE_GET_REGION_INFO"), err)))?;
        if info.size == 0 || info.flags & uapi::VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(map_err(MapFailure::NotMappable));
        }
        let map = memmap2::MmapOptions::new()
            .offset(info.offset)
            .len(info.size as usize)
            .map_raw(&self.device)
            .map_err(|err| map_err(os(MapStep::MmapRegion, err)))?;
        let bar = MmioBar::new(map).ok_or_else(|| map_err(MapFailure::TooManyMaps))?;
        Ok((Box::new(bar), info.size))
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
