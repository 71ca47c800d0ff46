//! Kernel struct member offsets from BTF. Rust eBPF has no CO-RE relocations yet, so these are
//! resolved here at load time and handed to the programs, never compiled in for one kernel.
use std::path::Path;

use btf_rs::{Btf, Type};
use qcom_reset_ebpf::{OFFSET_MISSING, VfioLayout};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
pub const VFIO_MODULE: &str = "vfio_pci_core";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the kernel exposes no BTF ({0} missing); qcom-reset needs CONFIG_DEBUG_INFO_BTF=y (every current distro kernel has it)"
    )]
    NoBtf(String),
    #[error("cannot parse BTF {path}: {why}")]
    Parse { path: String, why: String },
    #[error(
        "BTF has no {0}; this kernel's layout is not supported, please report it with `uname -r`"
    )]
    Missing(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciDevLayout {
    pub vendor: u32,
    pub device: u32,
    /// `dev.kobj.name`
    pub name: u32,
}

pub fn load_vmlinux(path: &Path) -> Result<Btf, LayoutError> {
    if !path.exists() {
        return Err(LayoutError::NoBtf(path.display().to_string()));
    }
    Btf::from_file(path).map_err(|e| LayoutError::Parse {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Module BTF is split BTF on top of vmlinux's.
pub fn load_module(path: &Path, base: &Btf) -> Result<Btf, LayoutError> {
    Btf::from_split_file(path, base).map_err(|e| LayoutError::Parse {
        path: path.display().to_string(),
        why: e.to_string(),
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

/// Byte offset of `path` (e.g. ["dev", "kobj", "name"]) inside `struct root`, and whether the
/// final member is a bitfield (unreadable as a byte).
pub fn member_offset(btf: &Btf, root: &str, path: &[&str]) -> Result<(u32, bool), LayoutError> {
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
            let bitfield = m.bitfield_size().is_some_and(|b| b != 0) || !bits.is_multiple_of(8);
            return Ok((bits / 8, bitfield));
        }
        let t = btf.resolve_chained_type(m).map_err(|_| missing())?;
        s = as_struct(btf, t).ok_or_else(missing)?;
    }
    Err(missing())
}

pub fn pci_dev(btf: &Btf) -> Result<PciDevLayout, LayoutError> {
    Ok(PciDevLayout {
        vendor: member_offset(btf, "pci_dev", &["vendor"])?.0,
        device: member_offset(btf, "pci_dev", &["device"])?.0,
        name: member_offset(btf, "pci_dev", &["dev", "kobj", "name"])?.0,
    })
}

/// `pdev` is required; `needs_reset` is optional (a bitfield or absent means the release
/// summary derives "left unreset" from the attempts instead).
pub fn vfio(btf: &Btf) -> Result<VfioLayout, LayoutError> {
    let pdev = member_offset(btf, "vfio_pci_core_device", &["pdev"])?.0;
    let needs_reset = match member_offset(btf, "vfio_pci_core_device", &["needs_reset"]) {
        Ok((off, false)) => off,
        _ => OFFSET_MISSING,
    };
    Ok(VfioLayout {
        valid: 1,
        pdev,
        needs_reset,
        _pad: 0,
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
        assert_eq!((v.valid, v.pdev, v.needs_reset), (1, 1024, 1100));
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
        let (dev, _) = member_offset(&btf, "pci_dev", &["dev"]).unwrap();
        assert!(l.name >= dev && l.name < dev + 256, "{l:?}");
    }

    #[test]
    fn missing_btf_names_the_fix() {
        let Err(e) = load_vmlinux(Path::new("/nonexistent/vmlinux")) else {
            panic!("loaded a missing file")
        };
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF=y"));
    }
}
