//! What is PCI and not product: config-space offsets and bits, the one config-space accessor
//! (16- and 32-bit little-endian; sysfs `config` here, every [`crate::access::Backend`] too),
//! and the capability walks.
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// PCI config space.
pub const PCI_VENDOR_ID: u16 = 0x00;
/// Device ID (16 bits).
pub const PCI_DEVICE_ID: u16 = 0x02;
/// Command register (16 bits).
pub const PCI_COMMAND: u16 = 0x04;
/// Status register (16 bits).
pub const PCI_STATUS: u16 = 0x06;
/// The class code's upper word (base class, subclass).
pub const PCI_CLASS_DEVICE: u16 = 0x0a;
/// Command: memory space decoding.
pub const PCI_COMMAND_MEMORY: u16 = 0x0002;
/// Command: bus mastering.
pub const PCI_COMMAND_MASTER: u16 = 0x0004;
/// Status: a capability list is present.
pub const PCI_STATUS_CAP_LIST: u16 = 0x10;
/// The first capability's offset (8 bits).
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
/// Capability ID of the PCI Express capability.
pub const PCI_CAP_ID_EXP: u8 = 0x10;
/// PCIe capability: its flags (16 bits).
pub const PCI_EXP_FLAGS: u16 = 0x02;
/// PCIe flags: a slot is implemented.
pub const PCI_EXP_FLAGS_SLOT: u16 = 0x0100;
/// PCIe capability: Slot Capabilities (32 bits).
pub const PCI_EXP_SLTCAP: u16 = 0x14;
/// Slot Capabilities: hot-plug capable.
pub const PCI_EXP_SLTCAP_HPC: u32 = 0x40;
/// No Command Completed Support: the slot does not report completion of Slot Control writes.
pub const PCI_EXP_SLTCAP_NCCS: u32 = 0x0004_0000;
/// Slot Status: Command Completed.
pub const PCI_EXP_SLTSTA_CC: u16 = 0x0010;
/// Slot Control: Command Completed interrupt enable.
pub const PCI_EXP_SLTCTL_CCIE: u16 = 0x0010;
/// PCIe capability: Slot Control (16 bits).
pub const PCI_EXP_SLTCTL: u16 = 0x18;
/// Presence Detect Changed and Data Link Layer State Changed event enables.
pub const PCI_EXP_SLTCTL_PDCE: u16 = 0x0008;
/// Slot Control: Data Link Layer State Changed enable.
pub const PCI_EXP_SLTCTL_DLLSCE: u16 = 0x1000;
/// PCIe capability: Slot Status (16 bits).
pub const PCI_EXP_SLTSTA: u16 = 0x1a;
/// Slot Status: Presence Detect Changed.
pub const PCI_EXP_SLTSTA_PDC: u16 = 0x0008;
/// Slot Status: Data Link Layer State Changed.
pub const PCI_EXP_SLTSTA_DLLSC: u16 = 0x0100;
/// Where extended capabilities begin.
pub const EXT_CAP_START: u16 = 0x100;
/// Extended capability ID of AER.
pub const PCI_EXT_CAP_ID_ERR: u16 = 0x0001;
/// Extended capability ID of DPC.
pub const PCI_EXT_CAP_ID_DPC: u16 = 0x001d;
/// AER: Uncorrectable Error Status (32 bits).
pub const PCI_ERR_UNCOR_STATUS: u16 = 0x04;
/// AER: Uncorrectable Error Mask (32 bits).
pub const PCI_ERR_UNCOR_MASK: u16 = 0x08;
/// AER uncorrectable error: Surprise Down.
pub const PCI_ERR_UNC_SURPDN: u32 = 0x20;
/// DPC capability: DPC Control (16 bits).
pub const PCI_EXP_DPC_CTL: u16 = 0x06;
/// DPC Control: the trigger enable field.
pub const PCI_EXP_DPC_CTL_EN_MASK: u16 = 0x0003;

/// PCIe capability: Link Control (16 bits).
pub const PCI_EXP_LNKCTL: u16 = 0x10;
/// Link Control's ASPM enables: saved cleared, so a restore never turns ASPM on before L1
/// substates are configured (the kernel restores them last); the next driver sets them.
pub const PCI_EXP_LNKCTL_ASPMC: u16 = 0x0003;

/// Config space of the port, 16- and 32-bit little-endian accesses.
pub trait ConfigSpace {
    /// A 16-bit register at `off`.
    fn read16(&mut self, off: u16) -> std::io::Result<u16>;
    /// A 32-bit register at `off`.
    fn read32(&mut self, off: u16) -> std::io::Result<u32>;
    /// Writes a 16-bit register at `off`.
    fn write16(&mut self, off: u16, v: u16) -> std::io::Result<()>;
    /// Writes a 32-bit register at `off`.
    fn write32(&mut self, off: u16, v: u32) -> std::io::Result<()>;
}

/// sysfs `config` of the port (the kernel serialises these accesses with its own).
pub struct SysfsConfig(File);

impl SysfsConfig {
    /// Opens a `config` file, for writing too when `write`.
    pub fn open(path: &Path, write: bool) -> std::io::Result<SysfsConfig> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map(SysfsConfig)
    }
}

impl ConfigSpace for SysfsConfig {
    fn read16(&mut self, off: u16) -> std::io::Result<u16> {
        let mut b = [0u8; 2];
        self.0.read_exact_at(&mut b, u64::from(off))?;
        Ok(u16::from_le_bytes(b))
    }
    fn read32(&mut self, off: u16) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.0.read_exact_at(&mut b, u64::from(off))?;
        Ok(u32::from_le_bytes(b))
    }
    fn write16(&mut self, off: u16, v: u16) -> std::io::Result<()> {
        self.0.write_all_at(&v.to_le_bytes(), u64::from(off))
    }
    fn write32(&mut self, off: u16, v: u32) -> std::io::Result<()> {
        self.0.write_all_at(&v.to_le_bytes(), u64::from(off))
    }
}

/// Offset of the PCI Express capability (at most 48 list entries), through any config-space
/// reader: the port's sysfs config here, the target's backend for the crash record.
pub fn pcie_capability(
    read16: &mut dyn FnMut(u16) -> std::io::Result<u16>,
) -> std::io::Result<Option<u16>> {
    let status = read16(PCI_STATUS)?;
    if status == 0xffff || status & PCI_STATUS_CAP_LIST == 0 {
        return Ok(None);
    }
    let mut pos = read16(PCI_CAPABILITY_LIST)? & 0xfc;
    for _ in 0..48 {
        if pos < 0x40 {
            return Ok(None);
        }
        let hdr = read16(pos)?;
        if hdr as u8 == PCI_CAP_ID_EXP {
            return Ok(Some(pos));
        }
        pos = (hdr >> 8) & 0xfc;
    }
    Ok(None)
}

/// The offset of the PCI Express capability, if the device has one.
pub fn capability(cfg: &mut dyn ConfigSpace) -> std::io::Result<Option<u16>> {
    pcie_capability(&mut |off| cfg.read16(off))
}

/// Offset of extended capability `id` (at most 96 entries); None where there is none. A PCI
/// Express function has 4 KiB of config space, so a short read there is an error (sysfs gives
/// unprivileged readers only the header), not "no such capability".
pub fn ext_capability(cfg: &mut dyn ConfigSpace, id: u16) -> std::io::Result<Option<u16>> {
    let mut pos = EXT_CAP_START;
    for _ in 0..96 {
        let hdr = cfg.read32(pos)?;
        if hdr == 0 || hdr == u32::MAX {
            return Ok(None);
        }
        if hdr as u16 == id {
            return Ok(Some(pos));
        }
        pos = (hdr >> 20) as u16 & 0xffc;
        if pos < EXT_CAP_START {
            return Ok(None);
        }
    }
    Ok(None)
}
