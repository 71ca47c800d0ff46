//! The PCI device's sysfs directory. The root is a parameter so tests run against a tree they
//! build themselves, never against this machine's own devices.
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::bdf::Bdf;

/// Where sysfs lists PCI devices.
pub const DEFAULT_ROOT: &str = "/sys/bus/pci/devices";

/// The PCI devices' sysfs directory (a fake one in tests).
#[derive(Clone, Debug)]
pub struct PciSysfs {
    /// `/sys/bus/pci/devices`, or a test's stand-in.
    pub root: PathBuf,
}

impl Default for PciSysfs {
    fn default() -> Self {
        PciSysfs {
            root: PathBuf::from(DEFAULT_ROOT),
        }
    }
}

impl PciSysfs {
    /// The device at `bdf`; an error when it is not there.
    pub fn device(&self, bdf: Bdf) -> Result<SysfsDevice, Error> {
        let dir = self.root.join(bdf.to_string());
        match fs::metadata(&dir) {
            Ok(_) => Ok(SysfsDevice { bdf, dir }),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::NoSuchDevice(bdf, dir)),
            Err(source) => Err(Error::SysfsRead {
                path: dir,
                err: source,
            }),
        }
    }

    /// The sysfs mount this tree belongs to (`/sys` for `/sys/bus/pci/devices`).
    pub fn sys_root(&self) -> PathBuf {
        self.root
            .ancestors()
            .nth(3)
            .unwrap_or(&self.root)
            .to_path_buf()
    }

    /// Every PCI function present with its (vendor, device), for `[[device]]` rules; unreadable
    /// ones are skipped.
    pub fn present_ids(&self) -> Vec<(Bdf, (u16, u16))> {
        self.list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| Some((d.bdf, d.ids().ok()?)))
            .collect()
    }

    /// Every PCI function present, in address order; entries that are not addresses are skipped.
    pub fn list(&self) -> Result<Vec<SysfsDevice>, Error> {
        let rd = fs::read_dir(&self.root).map_err(|source| Error::SysfsRead {
            path: self.root.clone(),
            err: source,
        })?;
        let mut out: Vec<SysfsDevice> = rd
            .filter_map(std::result::Result::ok)
            .filter_map(|e| {
                let bdf = e.file_name().to_str()?.parse().ok()?;
                Some(SysfsDevice { bdf, dir: e.path() })
            })
            .collect();
        out.sort_by_key(|d| d.bdf);
        Ok(out)
    }
}

/// A device's `driver_override`: which driver alone may bind it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Override {
    /// "(null)": any matching driver may bind.
    Unset,
    /// Only this driver may bind.
    Driver(String),
}

impl Override {
    fn parse(s: &str) -> Override {
        match s {
            "(null)" | "" => Override::Unset,
            d => Override::Driver(d.to_string()),
        }
    }

    /// What to write to `driver_override` to set this value ("\n" clears it).
    pub fn sysfs_value(&self) -> &str {
        match self {
            Override::Unset => "\n",
            Override::Driver(d) => d,
        }
    }
}

/// One PCI function's sysfs directory.
#[derive(Clone, Debug)]
pub struct SysfsDevice {
    /// Its address.
    pub bdf: Bdf,
    /// Its directory.
    pub dir: PathBuf,
}

fn read_trim(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| Error::SysfsRead {
            path: path.to_path_buf(),
            err: source,
        })
}

fn read_opt(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::SysfsRead {
            path: path.to_path_buf(),
            err: source,
        }),
    }
}

fn link_name(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_link(path) {
        Ok(t) => Ok(t.file_name().and_then(|n| n.to_str()).map(str::to_string)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::SysfsRead {
            path: path.to_path_buf(),
            err: source,
        }),
    }
}

fn parse_hex16(path: &Path, s: &str) -> Result<u16, Error> {
    u16::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| Error::SysfsRead {
        path: path.to_path_buf(),
        err: std::io::Error::new(ErrorKind::InvalidData, format!("not a hex ID: {s:?}")),
    })
}

impl SysfsDevice {
    /// The path of one of its attributes.
    pub fn path(&self, attr: &str) -> PathBuf {
        self.dir.join(attr)
    }

    /// (vendor, device) from the cached IDs, readable even when the link is down.
    pub fn ids(&self) -> Result<(u16, u16), Error> {
        let vp = self.path("vendor");
        let dp = self.path("device");
        Ok((
            parse_hex16(&vp, &read_trim(&vp)?)?,
            parse_hex16(&dp, &read_trim(&dp)?)?,
        ))
    }

    /// The bound driver's name.
    pub fn driver(&self) -> Result<Option<String>, Error> {
        link_name(&self.path("driver"))
    }

    /// Its IOMMU group's number.
    pub fn iommu_group(&self) -> Result<Option<String>, Error> {
        link_name(&self.path("iommu_group"))
    }

    /// `reset_method` (None when the kernel offers no reset method or predates 5.15).
    pub fn reset_methods(&self) -> Result<Option<Vec<String>>, Error> {
        Ok(read_opt(&self.path("reset_method"))?
            .map(|s| s.split_whitespace().map(str::to_string).collect()))
    }

    /// `power/control`: `on` or `auto`.
    pub fn power_control(&self) -> Result<Option<String>, Error> {
        read_opt(&self.path("power/control"))
    }

    /// `power_state` (D0, D3hot, D3cold, unknown).
    pub fn power_state(&self) -> Result<Option<String>, Error> {
        read_opt(&self.path("power_state"))
    }

    /// VFIO character devices of this function (`vfio-dev/vfioN`), for the cdev holder check.
    pub fn vfio_cdevs(&self) -> Vec<String> {
        fs::read_dir(self.path("vfio-dev"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Size of BAR `bar` from the `resource` table (0 when unassigned).
    pub fn bar_len(&self, bar: u8) -> Result<u64, Error> {
        let p = self.path("resource");
        let table = read_trim(&p)?;
        let line = table.lines().nth(bar as usize).unwrap_or("");
        let nums: Vec<u64> = line
            .split_whitespace()
            .filter_map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
            .collect();
        Ok(match nums.as_slice() {
            [start, end, ..] if *end > *start => end - start + 1,
            _ => 0,
        })
    }

    /// `driver_override`: Ok(None) where the kernel has no such file (before 3.16).
    pub fn driver_override(&self) -> Result<Option<Override>, Error> {
        Ok(read_opt(&self.path("driver_override"))?.map(|s| Override::parse(&s)))
    }

    /// `class` (base class, subclass, programming interface).
    pub fn class(&self) -> Result<u32, Error> {
        let p = self.path("class");
        let s = read_trim(&p)?;
        u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| Error::SysfsRead {
            path: p,
            err: std::io::Error::new(ErrorKind::InvalidData, format!("not a hex class: {s:?}")),
        })
    }

    /// Start addresses of the six BARs in the kernel's `resource` table (0: unassigned): what
    /// the kernel believes the BARs hold, to check a record's BAR words against.
    pub fn bar_starts(&self) -> Result<Vec<u64>, Error> {
        Ok(self.bar_resources()?.iter().map(|r| r.0).collect())
    }

    /// (start, flags) of the six BARs in the kernel's `resource` table.
    pub fn bar_resources(&self) -> Result<Vec<(u64, u64)>, Error> {
        let table = read_trim(&self.path("resource"))?;
        let hex = |f: Option<&str>| {
            f.and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0)
        };
        Ok(table
            .lines()
            .take(6)
            .map(|l| {
                let mut f = l.split_whitespace();
                let start = hex(f.next());
                let _end = f.next();
                (start, hex(f.next()))
            })
            .collect())
    }

    /// Another function in the same sysfs directory, by address (the port of a record, which
    /// must be reachable when the target itself is gone).
    pub fn sibling(&self, bdf: Bdf) -> SysfsDevice {
        SysfsDevice {
            bdf,
            dir: self.dir.with_file_name(bdf.to_string()),
        }
    }

    /// Whether the function is still on the bus.
    pub fn present(&self) -> bool {
        self.dir.exists()
    }

    /// Writes one of its attributes.
    pub fn write(&self, attr: &str, value: &str) -> Result<(), Error> {
        let p = self.path(attr);
        fs::write(&p, value).map_err(|source| Error::SysfsWrite {
            path: p,
            err: source,
        })
    }
}
