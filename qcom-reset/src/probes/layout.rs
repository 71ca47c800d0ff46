//! Kernel struct member offsets from BTF. Rust eBPF has no CO-RE relocations yet, so these are
//! resolved here at load time and handed to the programs, never compiled in for one kernel.
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use qcom_reset_ebpf::{OFFSET_MISSING, VfioLayout};

/// vmlinux's BTF, as sysfs exposes it.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The module whose struct layout the VFIO probes read.
pub const VFIO_MODULE: &str = "vfio_pci_core";

/// Why a kernel struct's layout cannot be known.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the kernel exposes no BTF ({} missing); qcom-reset needs CONFIG_DEBUG_INFO_BTF=y (every current distro kernel has it)", .0.display()
    )]
    /// The kernel exposes no BTF.
    NoBtf(PathBuf),
    /// A BTF file that does not parse.
    #[error("cannot parse BTF {}: {err}", path.display())]
    Parse {
        /// The BTF file.
        path: PathBuf,
        /// The parser's error.
        err: btf_rs::Error,
    },
    /// A BTF file that cannot be mapped or copied.
    #[error("cannot copy BTF {} to memory to map it: {err}", path.display())]
    Copy {
        /// The BTF file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// The struct or member, as `struct name.member`.
    #[error(
        "BTF has no {0}; this kernel's layout is not supported, please report it with `uname -r`"
    )]
    Missing(String),
}

/// Where `struct pci_dev`'s fields the probes read sit, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciDevLayout {
    /// `vendor`.
    pub vendor: u32,
    /// `device`.
    pub device: u32,
    /// `dev.kobj.name`
    pub name: u32,
}

/// vmlinux BTF, parsed lazily from a mapping: a few lookups need a few ms, where parsing all of
/// it up front (btf-rs's cache backend) takes ~120 ms natively and tens of MB (`cargo bench
/// startup`). Kernels whose sysfs BTF cannot be mapped get an in-memory copy mapped instead.
pub fn load_vmlinux(path: &Path) -> Result<Btf, LayoutError> {
    if !path.exists() {
        return Err(LayoutError::NoBtf(path.to_path_buf()));
    }
    if let Ok(btf) = Btf::from_file_with_backend(path, btf_rs::Backend::Mmap) {
        return Ok(btf);
    }
    let copy = mapped_copy(path).map_err(|err| LayoutError::Copy {
        path: path.to_path_buf(),
        err,
    })?;
    Btf::from_file_with_backend(&copy.1, btf_rs::Backend::Mmap).map_err(|err| LayoutError::Parse {
        path: path.to_path_buf(),
        err,
    })
}

/// The file's bytes in a memfd (its fd kept open alongside the /proc path that maps it).
fn mapped_copy(path: &Path) -> std::io::Result<(std::fs::File, std::path::PathBuf)> {
    use std::io::Write as _;
    let fd = rustix::fs::memfd_create("qcom-reset-btf", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&std::fs::read(path)?)?;
    let proc_path = std::path::PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&f)
    ));
    Ok((f, proc_path))
}

/// Module BTF is split BTF on top of vmlinux's.
pub fn load_module(path: &Path, base: &Btf) -> Result<Btf, LayoutError> {
    Btf::from_split_file(path, base).map_err(|err| LayoutError::Parse {
        path: path.to_path_buf(),
        err,
    })
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct, LayoutError> {
    btf.resolve_types_by_name(name)
        .unwrap_or_default()
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| LayoutError::Missing(format!("struct {name}")))
}

/// Strips typedefs and qualifiers down to the struct a member is.
fn as_struct(btf: &Btf, mut t: Type) -> Option<btf_rs::Struct> {
    for _ in 0..16 {
        match t {
            Type::Struct(s) => return Some(s),
            Type::Typedef(_)
            | Type::Const(_)
            | Type::Volatile(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => {
                t = btf.resolve_chained_type(t.as_btf_type()?).ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// Where a member sits: its bit offset inside `struct root` and, for a bitfield, its width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberBits {
    /// Bits from the start of the struct.
    pub bit_offset: u32,
    /// A bitfield's width in bits.
    pub bitfield: Option<u32>,
}

impl MemberBits {
    /// The byte the member starts in.
    pub fn byte(self) -> u32 {
        self.bit_offset / 8
    }

    fn byte_aligned(self) -> bool {
        self.bitfield.is_none() && self.bit_offset.is_multiple_of(8)
    }
}

/// The bit position of `path` (e.g. ["dev", "kobj", "name"]) inside `struct root`.
pub fn member_bits(btf: &Btf, root: &str, path: &[&str]) -> Result<MemberBits, LayoutError> {
    let missing = || LayoutError::Missing(format!("struct {root}.{}", path.join(".")));
    let mut s = find_struct(btf, root)?;
    let mut bits = 0u32;
    for (i, name) in path.iter().enumerate() {
        let m = s
            .members
            .iter()
            .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == *name))
            .ok_or_else(missing)?;
        bits += m.bit_offset();
        if i + 1 == path.len() {
            return Ok(MemberBits {
                bit_offset: bits,
                bitfield: m.bitfield_size().filter(|b| *b != 0),
            });
        }
        let t = btf.resolve_chained_type(m).map_err(|_| missing())?;
        s = as_struct(btf, t).ok_or_else(missing)?;
    }
    Err(missing())
}

/// Byte offset of a byte-aligned, non-bitfield member (pointers, integers, strings).
pub fn member_offset(btf: &Btf, root: &str, path: &[&str]) -> Result<u32, LayoutError> {
    let m = member_bits(btf, root, path)?;
    if !m.byte_aligned() {
        return Err(LayoutError::Missing(format!(
            "struct {root}.{} as a whole byte (it is a bitfield)",
            path.join(".")
        )));
    }
    Ok(m.byte())
}

/// `struct pci_dev`'s offsets from `btf`.
pub fn pci_dev(btf: &Btf) -> Result<PciDevLayout, LayoutError> {
    Ok(PciDevLayout {
        vendor: member_offset(btf, "pci_dev", &["vendor"])?,
        device: member_offset(btf, "pci_dev", &["device"])?,
        name: member_offset(btf, "pci_dev", &["dev", "kobj", "name"])?,
    })
}

/// How this kernel stores `vfio_pci_core_device.needs_reset`, which the release summary reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeedsReset {
    /// A plain `bool` (≤6.4, and kernels with the June 2026 stable fix).
    Bool {
        /// The byte offset.
        byte: u32,
    },
    /// A 1-bit bitfield (≈6.5 to 7.0/7.1 without the fix: Ubuntu 24.04, Proxmox 8/9).
    Bit {
        /// The byte offset.
        byte: u32,
        /// The bit in that byte.
        bit: u8,
    },
    /// Not in the BTF, or a shape no kernel has had: reported as unknown.
    Unreadable,
}

impl NeedsReset {
    fn from_bits(m: MemberBits) -> NeedsReset {
        match m.bitfield {
            None if m.byte_aligned() => NeedsReset::Bool { byte: m.byte() },
            Some(1) => NeedsReset::Bit {
                byte: m.byte(),
                bit: (m.bit_offset % 8) as u8,
            },
            _ => NeedsReset::Unreadable,
        }
    }

    /// (byte offset, mask) as the eBPF programs apply them.
    fn offset_mask(self) -> (u32, u32) {
        match self {
            NeedsReset::Bool { byte } => (byte, 0xff),
            NeedsReset::Bit { byte, bit } => (byte, 1 << bit),
            NeedsReset::Unreadable => (OFFSET_MISSING, 0),
        }
    }

    /// How a layout the programs were given stores it.
    pub fn of(l: &VfioLayout) -> NeedsReset {
        match (l.needs_reset, l.needs_reset_mask) {
            (OFFSET_MISSING, _) | (_, 0) => NeedsReset::Unreadable,
            (byte, 0xff) => NeedsReset::Bool { byte },
            (byte, mask) => NeedsReset::Bit {
                byte,
                bit: mask.trailing_zeros() as u8,
            },
        }
    }
}

impl std::fmt::Display for NeedsReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NeedsReset::Bool { byte } => write!(f, "a bool at byte {byte}"),
            NeedsReset::Bit { byte, bit } => {
                write!(f, "a 1-bit bitfield, bit {bit} of byte {byte}")
            }
            NeedsReset::Unreadable => f.write_str("not readable from BTF (reported as unknown)"),
        }
    }
}

/// `pdev` is required; `needs_reset` is optional: the release decision never uses it, the
/// summary reports it.
pub fn vfio(btf: &Btf) -> Result<VfioLayout, LayoutError> {
    let pdev = member_offset(btf, "vfio_pci_core_device", &["pdev"])?;
    let needs_reset = member_bits(btf, "vfio_pci_core_device", &["needs_reset"])
        .map_or(NeedsReset::Unreadable, NeedsReset::from_bits);
    let (needs_reset, needs_reset_mask) = needs_reset.offset_mask();
    Ok(VfioLayout {
        valid: 1,
        pdev,
        needs_reset,
        needs_reset_mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Btf {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/pci_dev.btf");
        Btf::from_file(p).expect("fixture parses")
    }

    #[test]
    fn reads_a_bitfield_needs_reset_through_its_bit_offset() {
        // Generated by make_btf.py --bitfield: reset_works:1 .. needs_reset:1 from byte 1100.
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/vfio_bitfield.btf"
        );
        let btf = Btf::from_file(p).expect("fixture parses");
        let v = vfio(&btf).unwrap();
        assert_eq!(v.pdev, 1024);
        assert_eq!((v.needs_reset, v.needs_reset_mask), (1100, 0x10));
        assert_eq!(NeedsReset::of(&v), NeedsReset::Bit { byte: 1100, bit: 4 });
        assert_eq!(
            NeedsReset::of(&v).to_string(),
            "a 1-bit bitfield, bit 4 of byte 1100"
        );
        // A bitfield is no whole byte: reading it as one would mix in reset_works and friends.
        assert!(member_offset(&btf, "vfio_pci_core_device", &["needs_reset"]).is_err());
    }

    #[test]
    fn needs_reset_shapes_map_to_offset_and_mask() {
        let at = |bit_offset, bitfield| {
            NeedsReset::from_bits(MemberBits {
                bit_offset,
                bitfield,
            })
        };
        assert_eq!(at(800, None), NeedsReset::Bool { byte: 100 });
        assert_eq!(at(807, Some(1)), NeedsReset::Bit { byte: 100, bit: 7 });
        assert_eq!(at(800, Some(3)), NeedsReset::Unreadable);
        assert_eq!(at(803, None), NeedsReset::Unreadable);
        for n in [
            NeedsReset::Bool { byte: 100 },
            NeedsReset::Bit { byte: 100, bit: 0 },
            NeedsReset::Bit { byte: 100, bit: 7 },
            NeedsReset::Unreadable,
        ] {
            let (needs_reset, needs_reset_mask) = n.offset_mask();
            let l = VfioLayout {
                valid: 1,
                pdev: 0,
                needs_reset,
                needs_reset_mask,
            };
            assert_eq!(NeedsReset::of(&l), n, "round trip through the map value");
        }
        assert_eq!(NeedsReset::Unreadable.offset_mask().0, OFFSET_MISSING);
    }

    #[test]
    fn resolves_offsets_from_the_fixture() {
        let btf = fixture();
        assert_eq!(
            pci_dev(&btf).unwrap(),
            PciDevLayout {
                vendor: 60,
                device: 62,
                name: 192 + 16
            }
        );
        let v = vfio(&btf).unwrap();
        assert_eq!((v.valid, v.pdev), (1, 1024));
        assert_eq!(NeedsReset::of(&v), NeedsReset::Bool { byte: 1100 });
        assert_eq!((v.needs_reset, v.needs_reset_mask), (1100, 0xff));
        assert!(matches!(
            member_offset(&btf, "pci_dev", &["nope"]),
            Err(LayoutError::Missing(_))
        ));
        assert!(matches!(
            member_offset(&btf, "no_such", &["x"]),
            Err(LayoutError::Missing(_))
        ));
    }

    #[test]
    fn resolves_offsets_from_the_running_kernel() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} not present on this kernel");
            return;
        }
        let btf = load_vmlinux(path).unwrap();
        let l = pci_dev(&btf).unwrap();
        // vendor and device are adjacent u16s in every kernel since 2.6; dev embeds kobj.
        assert_eq!(l.device, l.vendor + 2);
        let dev = member_offset(&btf, "pci_dev", &["dev"]).unwrap();
        assert!(l.name >= dev && l.name < dev + 256, "{l:?}");
    }

    #[test]
    fn the_mapped_copy_resolves_like_the_file() {
        // What kernels whose sysfs BTF cannot be mapped get: the bytes in a memfd, mapped.
        let p = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/pci_dev.btf"
        ));
        let copy = mapped_copy(p).unwrap();
        let btf = Btf::from_file_with_backend(&copy.1, btf_rs::Backend::Mmap).unwrap();
        assert_eq!(pci_dev(&btf).unwrap(), pci_dev(&fixture()).unwrap());
        assert_eq!(vfio(&btf).unwrap(), vfio(&fixture()).unwrap());
        assert_eq!(
            pci_dev(&load_vmlinux(p).unwrap()).unwrap(),
            pci_dev(&btf).unwrap()
        );
    }

    #[test]
    fn missing_btf_names_the_fix() {
        let Err(e) = load_vmlinux(Path::new("/nonexistent/vmlinux")) else {
            panic!("loaded a missing file")
        };
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF=y"));
    }
}
