//! The card's upstream port around a reset that drops the link. A WLAN global reset (and a
//! modem SoC reset) takes the link down by design; a port that reports that as a hotplug event
//! removes the device (and its vfio-pci binding), and one that reports it as an AER Surprise
//! Down error can take the host through error recovery. Like `pciehp_reset_slot`, the session
//! masks those reports for the duration, clears what latched, and restores the port's registers
//! on every path (the crash record carries them). A port with DPC enabled would contain the link
//! drop by disabling the link: refused unless allowed.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bdf::Bdf;
use crate::host::sysfs::SysfsDevice;
use crate::pci::*;

/// An upstream port's saved offsets that cannot be its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortDefect {
    /// Slot Control outside the PCIe capability's range.
    SlotControl(u16),
    /// The AER capability outside extended config space, or unaligned.
    Aer(u16),
}

impl std::fmt::Display for PortDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortDefect::SlotControl(at) => {
                write!(f, "Slot Control offset {at:#x} is outside a capability")
            }
            PortDefect::Aer(at) => {
                write!(
                    f,
                    "AER capability offset {at:#x} is not an extended capability"
                )
            }
        }
    }
}

/// The two event enables a link drop would fire, and their latched status bits.
const SLTCTL_LINK_EVENTS: u16 = PCI_EXP_SLTCTL_PDCE | PCI_EXP_SLTCTL_DLLSCE;
const SLTSTA_LINK_EVENTS: u16 = PCI_EXP_SLTSTA_PDC | PCI_EXP_SLTSTA_DLLSC;

/// The bridge directly above `dev` in the sysfs device tree, if it is a PCI device (a card on
/// the root bus has none).
pub fn upstream(dev: &SysfsDevice) -> Option<SysfsDevice> {
    let real = std::fs::canonicalize(&dev.dir).ok()?;
    let parent = real.parent()?;
    let bdf: Bdf = parent.file_name()?.to_str()?.parse().ok()?;
    Some(SysfsDevice {
        bdf,
        dir: parent.to_path_buf(),
    })
}

/// What the port would do with a link drop, read without writing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortState {
    /// The port above the card (none on the root bus).
    pub port: Option<Bdf>,
    /// Vendor, device and class (base and sub) of the port, to find it again by address.
    #[serde(skip)]
    pub ids: Option<PortIds>,
    /// The slot reports Command Completed for Slot Control writes.
    #[serde(skip)]
    pub command_completed: bool,
    /// Offset of Slot Control when the slot is hotplug capable.
    #[serde(skip)]
    pub slot_control_at: Option<u16>,
    /// Slot Control as read.
    pub slot_control: Option<u16>,
    /// Presence/link change events enabled: a link drop would be a hot-unplug.
    pub hotplug_events: bool,
    /// Offset of the AER capability.
    #[serde(skip)]
    pub aer_at: Option<u16>,
    /// AER's Uncorrectable Error Mask as read.
    pub aer_uncor_mask: Option<u32>,
    /// Surprise Down reported: a link drop would be an uncorrectable AER error.
    pub surprise_down_unmasked: bool,
    /// DPC triggers enabled: a link drop would be contained by disabling the link.
    pub dpc_enabled: bool,
}

impl PortState {
    /// Reads the port at `port` through `cfg`, writing nothing.
    pub fn read(port: Bdf, cfg: &mut dyn ConfigSpace) -> std::io::Result<PortState> {
        let mut s = PortState {
            port: Some(port),
            ids: Some(PortIds::read(cfg)?),
            ..Default::default()
        };
        if let Some(exp) = capability(cfg)? {
            let slot = cfg.read16(exp + PCI_EXP_FLAGS)? & PCI_EXP_FLAGS_SLOT != 0;
            let cap = if slot {
                cfg.read32(exp + PCI_EXP_SLTCAP)?
            } else {
                0
            };
            if cap & PCI_EXP_SLTCAP_HPC != 0 {
                let ctl = cfg.read16(exp + PCI_EXP_SLTCTL)?;
                // With CCIE set the completion interrupt is pciehp's to consume; without it
                // nobody else waits, so the guard polls for it like `pcie_poll_cmd`.
                s.command_completed =
                    cap & PCI_EXP_SLTCAP_NCCS == 0 && ctl & PCI_EXP_SLTCTL_CCIE == 0;
                s.slot_control_at = Some(exp + PCI_EXP_SLTCTL);
                s.slot_control = Some(ctl);
                s.hotplug_events = ctl & SLTCTL_LINK_EVENTS != 0;
            }
        }
        if s.ids.is_some_and(|i| i.vendor == 0xffff) {
            return Ok(s); // the port itself is gone: nothing to read
        }
        let express = capability(cfg)?.is_some();
        let ext = |cfg: &mut dyn ConfigSpace, id| match ext_capability(cfg, id) {
            // Conventional PCI: no extended config space at all.
            Err(_) if !express => Ok(None),
            r => r,
        };
        if let Some(aer) = ext(cfg, PCI_EXT_CAP_ID_ERR)? {
            let mask = cfg.read32(aer + PCI_ERR_UNCOR_MASK)?;
            s.aer_at = Some(aer);
            s.aer_uncor_mask = Some(mask);
            s.surprise_down_unmasked = mask & PCI_ERR_UNC_SURPDN == 0;
        }
        if let Some(dpc) = ext(cfg, PCI_EXT_CAP_ID_DPC)? {
            s.dpc_enabled = cfg.read16(dpc + PCI_EXP_DPC_CTL)? & PCI_EXP_DPC_CTL_EN_MASK != 0;
        }
        Ok(s)
    }

    /// Whether anything must be masked for the link drop.
    pub fn needs_guard(&self) -> bool {
        self.hotplug_events || self.surprise_down_unmasked
    }

    /// One line for `check` and `status`.
    pub fn summary(&self) -> String {
        let Some(port) = self.port else {
            return "on the root bus: no upstream port".into();
        };
        let hp = match (self.slot_control, self.hotplug_events) {
            (None, _) => "no hotplug slot".to_string(),
            (Some(c), true) => {
                format!("hotplug events on (SltCtl {c:#06x}): masked during a reset")
            }
            (Some(c), false) => format!("hotplug slot, events off (SltCtl {c:#06x})"),
        };
        let aer = match (self.aer_uncor_mask, self.surprise_down_unmasked) {
            (None, _) => "no AER".to_string(),
            (Some(_), true) => "AER Surprise Down reported: masked during a reset".to_string(),
            (Some(_), false) => "AER Surprise Down masked".to_string(),
        };
        let dpc = if self.dpc_enabled {
            "DPC enabled: a reset is refused unless allowed (allow_dpc)"
        } else {
            "no DPC"
        };
        format!("upstream port {port}: {hp}; {aer}; {dpc}")
    }
}

/// The port registers a guard changed, with their values before: restored at post and, after a
/// SIGKILL, from the crash record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    /// The port.
    pub port: Bdf,
    /// The port's identity when it was masked: a restore by address checks it is still the
    /// same bridge (a re-enumerated bus may put another one there).
    #[serde(default)]
    pub ids: Option<PortIds>,
    /// Wait for Command Completed after writing Slot Control, as pciehp does.
    #[serde(default)]
    pub command_completed: bool,
    /// (offset of Slot Control, value before).
    pub slot_control: Option<(u16, u16)>,
    /// (offset of the AER capability, Uncorrectable Error Mask before).
    pub aer_mask: Option<(u16, u32)>,
}

impl PortRecord {
    /// What a guard of `s` will change.
    pub fn plan(s: &PortState) -> Option<PortRecord> {
        let port = s.port?;
        let slot_control = s
            .hotplug_events
            .then(|| Some((s.slot_control_at?, s.slot_control?)))
            .flatten();
        let aer_mask = s
            .surprise_down_unmasked
            .then(|| Some((s.aer_at?, s.aer_uncor_mask?)))
            .flatten();
        (slot_control.is_some() || aer_mask.is_some()).then_some(PortRecord {
            port,
            ids: s.ids,
            command_completed: s.command_completed,
            slot_control,
            aer_mask,
        })
    }

    /// Masks the link-drop reports. On a failure the caller restores what this record names.
    pub fn apply(&self, cfg: &mut dyn ConfigSpace) -> std::io::Result<()> {
        if let Some((at, _)) = self.slot_control {
            let now = cfg.read16(at)?;
            self.write_slot_control(cfg, at, now & !SLTCTL_LINK_EVENTS)?;
        }
        if let Some((aer, _)) = self.aer_mask {
            let now = cfg.read32(aer + PCI_ERR_UNCOR_MASK)?;
            cfg.write32(aer + PCI_ERR_UNCOR_MASK, now | PCI_ERR_UNC_SURPDN)?;
        }
        Ok(())
    }

    /// Clears what the link drop latched (write-1-to-clear), then puts back the enables the
    /// guard changed, as `pciehp_reset_slot` does. Only those bits: the rest of Slot Control
    /// (power, indicators) and the AER mask may have been changed since by pciehp or the admin,
    /// and a record can be old. A register whose bits already read as recorded was never masked
    /// (the guard's write failed, as under lockdown) or was put back: it is left unwritten, so
    /// a port nobody can write does not hold its record forever. Returns one line per register.
    pub fn restore(&self, cfg: &mut dyn ConfigSpace) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        let mut errors = Vec::new();
        if let Some((at, ctl)) = self.slot_control {
            let sta = at - PCI_EXP_SLTCTL + PCI_EXP_SLTSTA;
            let r = cfg.read16(at).and_then(|now| {
                if now & SLTCTL_LINK_EVENTS == ctl & SLTCTL_LINK_EVENTS {
                    return Ok((now, " (as recorded)"));
                }
                cfg.write16(sta, SLTSTA_LINK_EVENTS)?;
                let v = (now & !SLTCTL_LINK_EVENTS) | (ctl & SLTCTL_LINK_EVENTS);
                self.write_slot_control(cfg, at, v).map(|()| (v, ""))
            });
            match r {
                Ok((v, note)) => done.push(format!("{} SltCtl {v:#06x}{note}", self.port)),
                Err(e) => errors.push(format!("{} SltCtl: {e}", self.port)),
            }
        }
        if let Some((aer, mask)) = self.aer_mask {
            let r = cfg.read32(aer + PCI_ERR_UNCOR_MASK).and_then(|now| {
                if now & PCI_ERR_UNC_SURPDN == mask & PCI_ERR_UNC_SURPDN {
                    return Ok((now, " (as recorded)"));
                }
                cfg.write32(aer + PCI_ERR_UNCOR_STATUS, PCI_ERR_UNC_SURPDN)?;
                let v = (now & !PCI_ERR_UNC_SURPDN) | (mask & PCI_ERR_UNC_SURPDN);
                cfg.write32(aer + PCI_ERR_UNCOR_MASK, v).map(|()| (v, ""))
            });
            match r {
                Ok((v, note)) => done.push(format!("{} AER UncorMask {v:#010x}{note}", self.port)),
                Err(e) => errors.push(format!("{} AER UncorMask: {e}", self.port)),
            }
        }
        if errors.is_empty() {
            Ok(done)
        } else {
            Err(errors.join("; "))
        }
    }

    /// Writes Slot Control and, where the slot reports completions that no interrupt handler
    /// consumes, waits for Command Completed and clears it, as `pcie_poll_cmd` does, so the
    /// controller has taken one command before the next (and before the link drops). A slot
    /// that never completes is not an error: pciehp only logs that too.
    fn write_slot_control(
        &self,
        cfg: &mut dyn ConfigSpace,
        at: u16,
        v: u16,
    ) -> std::io::Result<()> {
        cfg.write16(at, v)?;
        if !self.command_completed {
            return Ok(());
        }
        let sta = at - PCI_EXP_SLTCTL + PCI_EXP_SLTSTA;
        let deadline = std::time::Instant::now() + COMMAND_COMPLETED_WAIT;
        while std::time::Instant::now() < deadline {
            if cfg.read16(sta)? & PCI_EXP_SLTSTA_CC != 0 {
                return cfg.write16(sta, PCI_EXP_SLTSTA_CC);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Whether `cfg` is still the bridge this record was taken from.
    pub fn same_port(&self, cfg: &mut dyn ConfigSpace) -> Result<(), String> {
        let now = PortIds::read(cfg).map_err(|e| e.to_string())?;
        match self.ids {
            Some(want) if want != now => Err(format!(
                "{} is now {now}, not the {want} the record was taken from",
                self.port
            )),
            _ => Ok(()),
        }
    }

    /// Record offsets a corrupt or hand-edited record could get wrong (an underflow or a write
    /// into another register); checked when a record is loaded.
    pub fn validate(&self) -> Result<(), PortDefect> {
        if let Some((at, _)) = self.slot_control
            && !(0x40 + PCI_EXP_SLTCTL..0x100).contains(&at)
        {
            return Err(PortDefect::SlotControl(at));
        }
        if let Some((aer, _)) = self.aer_mask
            && (!(EXT_CAP_START..0x1000 - 0x10).contains(&aer) || !aer.is_multiple_of(4))
        {
            return Err(PortDefect::Aer(aer));
        }
        Ok(())
    }
}

/// pciehp completes a command within 1 s (`pcie_wait_cmd`).
const COMMAND_COMPLETED_WAIT: std::time::Duration = std::time::Duration::from_millis(1000);

/// A bridge's identity in config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortIds {
    /// The port's vendor ID.
    pub vendor: u16,
    /// The port's device ID.
    pub device: u16,
    /// Base class and subclass (0x0604: PCI-to-PCI bridge).
    pub class: u16,
}

impl PortIds {
    /// Reads the identity through `cfg`.
    pub fn read(cfg: &mut dyn ConfigSpace) -> std::io::Result<PortIds> {
        Ok(PortIds {
            vendor: cfg.read16(0x00)?,
            device: cfg.read16(0x02)?,
            class: cfg.read16(0x0a)?,
        })
    }
}

impl std::fmt::Display for PortIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04x}:{:04x} class {:04x}",
            self.vendor, self.device, self.class
        )
    }
}

/// Whether pciehp polls its slots (`pciehp_poll_mode`): it then acts on latched presence and
/// link changes whatever the enable bits say, so masking them does not keep it from removing
/// the card. `sys` is the sysfs mount.
pub fn pciehp_polls(sys: &Path) -> bool {
    std::fs::read_to_string(sys.join("module/pciehp/parameters/pciehp_poll_mode"))
        .is_ok_and(|v| matches!(v.trim(), "Y" | "1"))
}

/// A port's config space in memory, for the unit tests of the guard and the record.
#[cfg(test)]
pub mod fake {
    use super::ConfigSpace;

    /// 4 KiB of config space in memory; write-1-to-clear is not modelled, writes are logged.
    pub struct FakeConfig {
        /// The 4 KiB.
        pub bytes: Vec<u8>,
        /// Every write, as (offset, value).
        pub writes: Vec<(u16, u32)>,
        /// Writes fail with EPERM (a locked-down host).
        pub read_only: bool,
    }

    impl FakeConfig {
        /// A root port with a PCIe capability at 0x40 (slot implemented, hotplug capable,
        /// SltCtl `sltctl`), AER at 0x100 with `mask`, and DPC at 0x140 with control `dpc`.
        pub fn root_port(sltctl: u16, mask: u32, dpc: u16) -> FakeConfig {
            let mut c = FakeConfig {
                bytes: vec![0; 4096],
                writes: Vec::new(),
                read_only: false,
            };
            c.put16(0x06, 0x0010);
            c.put16(0x34, 0x48); // the list starts with power management at 0x48 ...
            c.put16(0x48, 0x4001); // PM, next 0x40
            c.put16(0x40, 0x0010); // ... then PCIe, last in the list
            c.put16(0x42, 0x0142); // v2, root port, slot implemented
            c.put32(0x54, 0x0000_0040); // SltCap.HPC
            c.put16(0x58, sltctl);
            c.put32(0x100, 0x1401_0001); // AER v1, next 0x140
            c.put32(0x108, mask);
            c.put32(0x140, 0x0001_001d); // DPC, last
            c.put16(0x146, dpc);
            c
        }

        /// Sets a 16-bit register without logging it.
        pub fn put16(&mut self, off: u16, v: u16) {
            self.bytes[off as usize..off as usize + 2].copy_from_slice(&v.to_le_bytes());
        }

        /// Sets a 32-bit register without logging it.
        pub fn put32(&mut self, off: u16, v: u32) {
            self.bytes[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
        }

        /// A 16-bit register.
        pub fn get16(&self, off: u16) -> u16 {
            u16::from_le_bytes([self.bytes[off as usize], self.bytes[off as usize + 1]])
        }

        /// A 32-bit register.
        pub fn get32(&self, off: u16) -> u32 {
            let o = off as usize;
            u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap())
        }

        fn refuse(&self) -> std::io::Result<()> {
            if self.read_only {
                return Err(std::io::Error::from_raw_os_error(1));
            }
            Ok(())
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read16(&mut self, off: u16) -> std::io::Result<u16> {
            Ok(self.get16(off))
        }
        fn read32(&mut self, off: u16) -> std::io::Result<u32> {
            Ok(self.get32(off))
        }
        fn write16(&mut self, off: u16, v: u16) -> std::io::Result<()> {
            self.refuse()?;
            self.writes.push((off, u32::from(v)));
            self.put16(off, v);
            Ok(())
        }
        fn write32(&mut self, off: u16, v: u32) -> std::io::Result<()> {
            self.refuse()?;
            self.writes.push((off, v));
            self.put32(off, v);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeConfig;
    use super::*;

    fn port() -> Bdf {
        "0000:00:1c.0".parse().unwrap()
    }

    #[test]
    fn reads_hotplug_aer_and_dpc_state() {
        // pciehp's usual enables: PDCE | HPIE | DLLSCE | CCIE.
        let mut c = FakeConfig::root_port(0x1038, 0, 0);
        let s = PortState::read(port(), &mut c).unwrap();
        assert_eq!(s.slot_control, Some(0x1038));
        assert!(s.hotplug_events && s.surprise_down_unmasked && !s.dpc_enabled);
        assert!(s.needs_guard());
        assert!(
            s.summary().contains("masked during a reset"),
            "{}",
            s.summary()
        );

        let mut quiet = FakeConfig::root_port(0x0020, PCI_ERR_UNC_SURPDN, 0x0001);
        let s = PortState::read(port(), &mut quiet).unwrap();
        assert!(!s.hotplug_events && !s.surprise_down_unmasked && s.dpc_enabled);
        assert!(!s.needs_guard());
        assert!(s.summary().contains("DPC enabled"), "{}", s.summary());
        assert_eq!(PortRecord::plan(&s), None, "nothing to mask");
        // Either report alone is reason enough to guard the link drop.
        for (sltctl, aer) in [(0x1038, PCI_ERR_UNC_SURPDN), (0x0020, 0)] {
            let s = PortState::read(port(), &mut FakeConfig::root_port(sltctl, aer, 0)).unwrap();
            assert!(s.hotplug_events != s.surprise_down_unmasked && s.needs_guard());
        }

        // No slot: Slot Control is not the port's to touch.
        let mut noslot = FakeConfig::root_port(0x1038, 0, 0);
        noslot.put16(0x42, 0x0042);
        let s = PortState::read(port(), &mut noslot).unwrap();
        assert_eq!((s.slot_control, s.hotplug_events), (None, false));
    }

    #[test]
    fn the_guard_masks_only_link_drop_reports_and_restores_them() {
        let mut c = FakeConfig::root_port(0x1038, 0x0040_0000, 0);
        let s = PortState::read(port(), &mut c).unwrap();
        let rec = PortRecord::plan(&s).unwrap();
        assert_eq!(rec.slot_control, Some((0x58, 0x1038)));
        assert_eq!(rec.aer_mask, Some((0x100, 0x0040_0000)));
        rec.apply(&mut c).unwrap();
        // HPIE and CCIE stay; PDCE and DLLSCE go. Other mask bits stay.
        assert_eq!(c.get16(0x58), 0x0030);
        assert_eq!(c.get32(0x108), 0x0040_0020);
        c.writes.clear();
        let done = rec.restore(&mut c).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!(
            c.writes,
            vec![
                (0x5a, 0x0108), // SltSta: PDC | DLLSC cleared (RW1C)
                (0x58, 0x1038),
                (0x104, 0x20), // Surprise Down status cleared (RW1C)
                (0x108, 0x0040_0000),
            ],
            "latched status cleared before the enables return"
        );
    }

    /// A guard whose writes were refused (lockdown) masked nothing: its restore writes nothing
    /// and succeeds, so the record can go; a register that was masked is still put back.
    #[test]
    fn the_restore_writes_nothing_where_the_guard_wrote_nothing() {
        let mut c = FakeConfig::root_port(0x1038, 0x0040_0000, 0);
        let rec = PortRecord::plan(&PortState::read(port(), &mut c).unwrap()).unwrap();
        c.read_only = true;
        assert!(rec.apply(&mut c).is_err());
        let done = rec.restore(&mut c).unwrap();
        assert_eq!(
            done,
            [
                "0000:00:1c.0 SltCtl 0x1038 (as recorded)",
                "0000:00:1c.0 AER UncorMask 0x00400000 (as recorded)"
            ]
        );
        c.read_only = false;
        rec.apply(&mut c).unwrap();
        c.put32(0x108, 0x0040_0000); // only Slot Control stayed masked
        c.writes.clear();
        rec.restore(&mut c).unwrap();
        assert_eq!(c.writes, vec![(0x5a, 0x0108), (0x58, 0x1038)]);
        c.put16(0x58, 0x1038);
        c.put32(0x108, 0x0040_0020); // only the AER mask stayed masked
        c.writes.clear();
        rec.restore(&mut c).unwrap();
        assert_eq!(c.writes, vec![(0x104, 0x20), (0x108, 0x0040_0000)]);
    }

    /// Issue 17 item 4 (F10): the restore puts back only the bits the guard changed; what
    /// pciehp or the admin changed since (power controller, indicators, other AER masks)
    /// stays, even from an old record.
    #[test]
    fn the_restore_puts_back_only_the_guards_bits() {
        let mut c = FakeConfig::root_port(0x1038, 0x0040_0000, 0);
        let rec = PortRecord::plan(&PortState::read(port(), &mut c).unwrap()).unwrap();
        rec.apply(&mut c).unwrap();
        c.put16(0x58, c.get16(0x58) | 0x0400); // pciehp turned the slot's power off meanwhile
        c.put32(0x108, c.get32(0x108) | 0x1000); // the admin masked Poisoned TLP
        rec.restore(&mut c).unwrap();
        assert_eq!(c.get16(0x58), 0x1438, "power off kept, PDCE|DLLSCE back");
        assert_eq!(
            c.get32(0x108),
            0x0040_1000,
            "new mask kept, Surprise Down back"
        );
    }

    /// A slot that had only one of the two events on gets exactly that one back.
    #[test]
    fn the_restore_brings_back_only_the_events_that_were_on() {
        let mut c = FakeConfig::root_port(0x0038, 0, 0); // PDCE on, DLLSCE off
        let rec = PortRecord::plan(&PortState::read(port(), &mut c).unwrap()).unwrap();
        rec.apply(&mut c).unwrap();
        assert_eq!(c.get16(0x58), 0x0030);
        rec.restore(&mut c).unwrap();
        assert_eq!(c.get16(0x58), 0x0038, "DLLSCE stays off");
    }

    /// Issue 17 item 11: a slot reporting Command Completed without CCIE gets it polled and
    /// cleared after each Slot Control write; with CCIE it is pciehp's.
    #[test]
    fn command_completed_is_awaited_where_no_interrupt_takes_it() {
        let mut c = FakeConfig::root_port(0x1028, 0, 0); // PDCE|DLLSCE|HPIE, no CCIE
        c.put16(0x5a, PCI_EXP_SLTSTA_CC);
        let rec = PortRecord::plan(&PortState::read(port(), &mut c).unwrap()).unwrap();
        assert!(rec.command_completed);
        rec.apply(&mut c).unwrap();
        assert_eq!(
            c.writes[..2],
            [(0x58, 0x0020), (0x5a, u32::from(PCI_EXP_SLTSTA_CC))],
            "{:?}",
            c.writes
        );
        // No completion reported: the wait ends at its bound and clears nothing.
        let mut silent = FakeConfig::root_port(0x1028, 0, 0);
        let rec = PortRecord::plan(&PortState::read(port(), &mut silent).unwrap()).unwrap();
        rec.apply(&mut silent).unwrap();
        assert!(
            !silent.writes.iter().any(|w| w.0 == 0x5a),
            "{:?}",
            silent.writes
        );
        let mut irq = FakeConfig::root_port(0x1038, 0, 0);
        let rec = PortRecord::plan(&PortState::read(port(), &mut irq).unwrap()).unwrap();
        assert!(!rec.command_completed);
        let mut nccs = FakeConfig::root_port(0x1028, 0, 0);
        nccs.put32(0x54, 0x0004_0040);
        assert!(
            !PortState::read(port(), &mut nccs)
                .unwrap()
                .command_completed
        );
    }

    /// Issue 17 item 4: a restore by address checks it is the same bridge; corrupt offsets are
    /// refused before anything is written.
    #[test]
    fn a_record_names_its_port_and_sane_offsets() {
        let mut c = FakeConfig::root_port(0x1038, 0, 0);
        c.put16(0x00, 0x8086);
        c.put16(0x02, 0x7c0a);
        c.put16(0x0a, 0x0604);
        let rec = PortRecord::plan(&PortState::read(port(), &mut c).unwrap()).unwrap();
        assert_eq!(rec.same_port(&mut c), Ok(()));
        c.put16(0x02, 0x1234);
        let e = rec.same_port(&mut c).unwrap_err();
        assert!(e.contains("8086:1234") && e.contains("8086:7c0a"), "{e}");
        assert_eq!(rec.validate(), Ok(()));
        for at in [0x10, 0x56] {
            let bad = PortRecord {
                slot_control: Some((at, 0)),
                ..rec.clone()
            };
            assert_eq!(
                bad.validate().map_err(|d| d.to_string()),
                Err(format!(
                    "Slot Control offset {at:#x} is outside a capability"
                ))
            );
        }
        for aer in [0x102, 0xff8] {
            let bad = PortRecord {
                aer_mask: Some((aer, 0)),
                ..rec.clone()
            };
            assert_eq!(
                bad.validate().map_err(|d| d.to_string()),
                Err(format!(
                    "AER capability offset {aer:#x} is not an extended capability"
                )),
                "{aer:#x}: the mask would lie outside config space"
            );
        }
    }

    /// A PCIe port whose extended config space cannot be read (sysfs gives non-root only the
    /// header) is an error, not "no AER; no DPC".
    #[test]
    fn a_short_read_of_extended_config_is_not_absence() {
        struct Short(FakeConfig);
        impl ConfigSpace for Short {
            fn read16(&mut self, off: u16) -> std::io::Result<u16> {
                self.0.read16(off)
            }
            fn read32(&mut self, off: u16) -> std::io::Result<u32> {
                if off >= EXT_CAP_START {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                self.0.read32(off)
            }
            fn write16(&mut self, off: u16, v: u16) -> std::io::Result<()> {
                self.0.write16(off, v)
            }
            fn write32(&mut self, off: u16, v: u32) -> std::io::Result<()> {
                self.0.write32(off, v)
            }
        }
        let mut c = Short(FakeConfig::root_port(0x1038, 0, 0));
        assert!(PortState::read(port(), &mut c).is_err());
        c.0.put16(0x06, 0); // no capability list: conventional PCI, no extended space
        let s = PortState::read(port(), &mut c).unwrap();
        assert_eq!((s.aer_uncor_mask, s.dpc_enabled), (None, false));
    }

    #[test]
    fn the_capability_walk_follows_the_list_and_stops_where_it_must() {
        let find = |c: &mut FakeConfig| capability(c).unwrap();
        assert_eq!(
            find(&mut FakeConfig::root_port(0, 0, 0)),
            Some(0x40),
            "second in the list"
        );
        let mut no_list = FakeConfig::root_port(0, 0, 0);
        no_list.put16(0x06, 0x0000);
        assert_eq!(find(&mut no_list), None, "Status.CAP_LIST clear");
        let mut gone = FakeConfig::root_port(0, 0, 0);
        gone.put16(0x06, 0xffff);
        assert_eq!(find(&mut gone), None, "all-ones: off the bus");
        let mut bad = FakeConfig::root_port(0, 0, 0);
        bad.put16(0x34, 0x3c);
        assert_eq!(
            find(&mut bad),
            None,
            "a pointer into the header ends the walk"
        );
        let mut looped = FakeConfig::root_port(0, 0, 0);
        looped.put16(0x48, 0x4801); // PM pointing at itself, PCIe never reached
        assert_eq!(find(&mut looped), None, "a loop ends after 48 entries");
        // Extended capabilities: a next pointer below 0x100 ends the walk, even where the
        // header's bytes there happen to look like the capability asked for.
        let mut back = FakeConfig::root_port(0, 0, 1);
        back.put32(0x100, 0x0801_0001); // AER, next 0x080
        back.put32(0x80, 0x0001_001d);
        assert_eq!(ext_capability(&mut back, PCI_EXT_CAP_ID_DPC).unwrap(), None);
        // DPC is found behind AER; a zero header ends the walk.
        let mut c = FakeConfig::root_port(0, 0, 1);
        assert_eq!(
            ext_capability(&mut c, PCI_EXT_CAP_ID_DPC).unwrap(),
            Some(0x140)
        );
        c.put32(0x100, 0);
        assert_eq!(ext_capability(&mut c, PCI_EXT_CAP_ID_DPC).unwrap(), None);
        c.put32(0x100, u32::MAX);
        assert_eq!(
            ext_capability(&mut c, PCI_EXT_CAP_ID_DPC).unwrap(),
            None,
            "all-ones: off the bus"
        );
        assert_eq!(
            ext_capability(&mut c, 0xffff).unwrap(),
            None,
            "never matched as an ID"
        );
    }

    #[test]
    fn a_slot_without_hotplug_and_a_port_with_only_one_report_are_guarded_exactly() {
        // A slot that is not hotplug capable: its Slot Control is not ours to touch.
        let mut c = FakeConfig::root_port(0x1038, 0, 0);
        c.put32(0x54, 0);
        let s = PortState::read(port(), &mut c).unwrap();
        assert_eq!((s.slot_control, s.hotplug_events), (None, false));
        let rec = PortRecord::plan(&s).unwrap();
        assert_eq!((rec.slot_control, rec.aer_mask), (None, Some((0x100, 0))));
        // Hotplug events on, Surprise Down already masked: only Slot Control.
        let mut c = FakeConfig::root_port(0x1008, PCI_ERR_UNC_SURPDN, 0);
        let rec = PortRecord::plan(&PortState::read(port(), &mut c).unwrap()).unwrap();
        assert_eq!(
            (rec.slot_control, rec.aer_mask),
            (Some((0x58, 0x1008)), None)
        );
        // Masking sets only Surprise Down on the port's mask as it is now: a stale record's
        // other bits are never written.
        let mut c = FakeConfig::root_port(0, PCI_ERR_UNC_SURPDN, 0);
        let rec = PortRecord {
            port: port(),
            ids: None,
            command_completed: false,
            slot_control: None,
            aer_mask: Some((0x100, PCI_ERR_UNC_SURPDN | 1)),
        };
        rec.apply(&mut c).unwrap();
        assert_eq!(c.get32(0x108), PCI_ERR_UNC_SURPDN);
    }

    #[test]
    fn a_port_that_refuses_writes_reports_it() {
        let mut c = FakeConfig::root_port(0x1038, 0, 0);
        let rec = PortRecord::plan(&PortState::read(port(), &mut c).unwrap()).unwrap();
        rec.apply(&mut c).unwrap();
        c.read_only = true; // masked, then the port stopped taking writes
        let e = rec.restore(&mut c).unwrap_err();
        assert!(e.contains("SltCtl") && e.contains("AER"), "{e}");
    }

    #[test]
    fn sysfs_config_reads_and_writes_little_endian_at_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, [0u8; 64]).unwrap();
        let mut c = SysfsConfig::open(&path, true).unwrap();
        c.write16(0x18, 0x1038).unwrap();
        c.write32(0x20, 0xdead_beef).unwrap();
        assert_eq!(c.read16(0x18).unwrap(), 0x1038);
        assert_eq!(c.read32(0x20).unwrap(), 0xdead_beef);
        assert_eq!(c.read16(0x22).unwrap(), 0xdead);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x18..0x1a], &[0x38, 0x10]);
        assert!(c.read32(62).is_err(), "a short read is an error, not zeros");
        let mut ro = SysfsConfig::open(&path, false).unwrap();
        assert!(ro.write16(0, 1).is_err(), "opened read-only");
    }

    #[test]
    fn upstream_is_the_pci_parent_in_the_device_tree() {
        let dir = tempfile::tempdir().unwrap();
        let card = dir.path().join("pci0000:00/0000:00:1c.0/0000:03:00.0");
        std::fs::create_dir_all(&card).unwrap();
        let dev = |dir: std::path::PathBuf, bdf: &str| SysfsDevice {
            bdf: bdf.parse().unwrap(),
            dir,
        };
        let p = upstream(&dev(card, "0000:03:00.0")).unwrap();
        assert_eq!(p.bdf.to_string(), "0000:00:1c.0");
        assert!(
            upstream(&dev(
                dir.path().join("pci0000:00/0000:00:1c.0"),
                "0000:00:1c.0"
            ))
            .is_none(),
            "root bus"
        );
    }

    #[test]
    fn a_card_on_the_root_bus_has_no_port() {
        let s = PortState::default();
        assert_eq!(PortRecord::plan(&s), None);
        assert!(s.summary().contains("root bus"));
    }
}
