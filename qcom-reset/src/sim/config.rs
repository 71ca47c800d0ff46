//! The simulated card's config space, as the hardware has it: read-only bits (IDs, BAR type
//! bits, the interrupt pin, the PM capability's `NoSoftRst+`), writable masks (a BAR decodes
//! only the address bits its size allows), and the values a function reset gives back (PCI_COMMAND
//! 0, BARs unassigned, Device Control at MPS 128 / MRRS 512, Link Control 2 at the top speed):
//! what a real endpoint does on DL_Down, and what made "restore what reads 0" wrong.
use crate::device::Family;
use crate::pci::{PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};

/// Where the capabilities sit: PM, then PCI Express, then MSI (a WCN6855's list order).
pub const PM_CAP: u16 = 0x40;
/// The PCI Express capability.
pub const PCIE_CAP: u16 = 0x50;
/// The MSI capability.
pub const MSI_CAP: u16 = 0x90;
/// PCIe registers a restore must bring back (offsets in config space).
pub const DEVCTL: u16 = PCIE_CAP + 0x08;
/// Link Control.
pub const LNKCTL: u16 = PCIE_CAP + 0x10;
/// Device Control 2.
pub const DEVCTL2: u16 = PCIE_CAP + 0x28;
/// Link Control 2.
pub const LNKCTL2: u16 = PCIE_CAP + 0x30;
/// BAR0's address as the kernel assigned it; MMIO decodes only there.
pub const BAR0_ADDRESS: u32 = 0xfe00_0000;
/// PMCSR's PowerState field (D0 = 0, D3hot = 3).
const PMCSR_STATE: u16 = 0x0003;
/// A 64-bit memory BAR: type bits 0b100, read-only.
const BAR_TYPE_64: u16 = 0x0004;

const WORDS: usize = 128;

/// The simulated card's config space, with real reset values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    words: [u16; WORDS],
    /// Writable bits per word; the rest read as `reset` has them.
    rw: [u16; WORDS],
    /// Every word after a function reset.
    reset: [u16; WORDS],
    /// Where BAR0 decodes: the address the tests' host maps, or (`None`) wherever QEMU maps
    /// it: QEMU's vfio emulates the BAR registers (the guest reads QEMU's copy, which no reset
    /// of ours clears), so behind it only PCI_COMMAND's memory bit decides.
    home: Option<u32>,
    /// Link Control and Link Control 2 are QEMU's (the card on its root bus, presented as a
    /// root-complex integrated endpoint): the guest reads QEMU's zeros, so no restore owes them.
    links_emulated: bool,
    /// Set by a link drop's function reset: the words `pci_restore_state` puts back before it
    /// turns decoding on again (the PCIe control words, BAR0 where it is ours), with the values
    /// they had. The first write that enables decoding checks them.
    due: Vec<(u16, u16)>,
    /// Decoding was turned on before a due word was back.
    pub order_problems: Vec<String>,
}

impl SimConfig {
    /// Config space as the kernel left it after enumeration and vfio-pci's release: BAR0
    /// assigned, MPS 256, Common Clock, LTR on, the link held at 5 GT/s, memory decoding off.
    pub fn new(family: Family, vendor: u16, device: u16, bar_len: u64) -> SimConfig {
        let mut c = SimConfig {
            words: [0; WORDS],
            rw: [0; WORDS],
            reset: [0; WORDS],
            home: Some(BAR0_ADDRESS),
            links_emulated: false,
            due: Vec::new(),
            order_problems: Vec::new(),
        };
        let class = family.spec().sim.class;
        for (off, value) in [
            (0x00, vendor),
            (0x02, device),
            (0x06, 0x0010), // Status: capability list
            (0x0a, class),
            (0x10, BAR_TYPE_64),
            (0x2c, vendor),
            (0x2e, device),
            (0x34, PM_CAP),
            (0x3c, 0x0100), // interrupt pin INTA
            (PM_CAP, (PCIE_CAP << 8) | 0x01),
            (PM_CAP + 2, 0x0003),
            (PM_CAP + 4, 0x0008), // PMCSR: D0, NoSoftRst+
            (PCIE_CAP, (MSI_CAP << 8) | 0x10),
            (PCIE_CAP + 2, 0x0002),    // v2, endpoint
            (PCIE_CAP + 4, 0x8001),    // DevCap: MPS 256, role-based errors (PCIe 1.1+), no FLR
            (DEVCTL, 0x2810),          // MRRS 512, no-snoop, relaxed ordering, MPS 128
            (PCIE_CAP + 0x0c, 0x0c13), // LnkCap: 8 GT/s x1, ASPM L0s/L1
            (PCIE_CAP + 0x12, 0x1011), // LnkSta: 2.5 GT/s x1 after training
            (LNKCTL2, 0x0003),         // target speed: the highest supported
            (MSI_CAP, 0x0005),
            (MSI_CAP + 2, 0x0080), // 64-bit capable
        ] {
            c.reset[off as usize / 2] = value;
        }
        let bar_mask = !(bar_len.max(16) as u32 - 1) & 0xffff_fff0;
        for (off, rw) in [
            (0x04, 0x0547), // I/O, memory, master, parity, SERR, INTx disable
            (0x0c, 0x00ff), // cache line size
            (0x10, bar_mask as u16),
            (0x12, (bar_mask >> 16) as u16),
            (0x14, 0xffff),
            (0x16, 0xffff),
            (0x3c, 0x00ff),
            (PM_CAP + 4, 0x0003),
            (DEVCTL, 0x7fff),
            (LNKCTL, 0x0fdb),
            (DEVCTL2, 0x07ff),
            (LNKCTL2, 0x0fff),
            (MSI_CAP + 2, 0x0071),
            (MSI_CAP + 4, 0xfffc),
            (MSI_CAP + 6, 0xffff),
            (MSI_CAP + 8, 0xffff),
            (MSI_CAP + 0x0a, 0xffff),
            (MSI_CAP + 0x0c, 0xffff),
        ] {
            c.rw[off as usize / 2] = rw;
        }
        c.function_reset();
        for (off, value) in [
            (0x04, 0x0400),
            (0x0c, 0x0010),
            (0x10, BAR0_ADDRESS as u16),
            (0x12, (BAR0_ADDRESS >> 16) as u16),
            (0x3c, 0x010b),
            (DEVCTL, 0x2830),  // MPS 256, matching the port
            (LNKCTL, 0x0040),  // Common Clock
            (DEVCTL2, 0x0400), // LTR
            (LNKCTL2, 0x0002),
        ] {
            c.write16(off, value);
        }
        c
    }

    /// What a function reset (DL_Down, a hot reset) leaves: every register at its reset value.
    pub fn function_reset(&mut self) {
        self.words = self.reset;
    }

    /// The function reset of a link drop: as `function_reset`, and from now on the first write
    /// that enables decoding must find the words a restore owes back at their old values.
    pub fn link_drop_reset(&mut self) {
        let bars = self.home.map(|_| [0x10, 0x12, 0x14, 0x16]);
        let links_emulated = self.links_emulated;
        let owed = [DEVCTL, LNKCTL, DEVCTL2, LNKCTL2]
            .into_iter()
            .filter(|&off| !(links_emulated && (off == LNKCTL || off == LNKCTL2)))
            .chain(bars.into_iter().flatten());
        self.due = owed
            .map(|off| (off, self.read16(off)))
            .filter(|&(off, was)| was != self.reset[off as usize / 2])
            .collect();
        self.function_reset();
    }

    /// A write enabling decoding (memory or bus master) while a restore is due: every owed word
    /// must be back first, PCI_COMMAND last, as `pci_restore_state` orders them.
    fn check_restore_order(&mut self, off: u16, value: u16) {
        const DECODE: u16 = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        if off != 0x04 || value & DECODE == 0 || self.due.is_empty() {
            return;
        }
        for (word, was) in std::mem::take(&mut self.due) {
            let now = self.read16(word);
            if now != was {
                self.order_problems.push(format!(
                    "decoding enabled before {} ({word:#04x}) was restored: reads {now:#06x}, was \
                     {was:#06x} (the PCIe words and BARs go back first, PCI_COMMAND last)",
                    word_name(word)
                ));
            }
        }
    }

    /// A 16-bit register.
    pub fn read16(&self, off: u16) -> u16 {
        self.words.get(off as usize / 2).copied().unwrap_or(0)
    }

    /// Only the writable bits change; an odd or out-of-range offset is ignored like a write to
    /// a register that is not there.
    pub fn write16(&mut self, off: u16, value: u16) {
        let i = off as usize / 2;
        if !off.is_multiple_of(2) || i >= WORDS {
            return;
        }
        self.check_restore_order(off, value);
        self.words[i] = (self.words[i] & !self.rw[i]) | (value & self.rw[i]);
    }

    /// PCI_COMMAND.
    pub fn command(&self) -> u16 {
        self.read16(0x04)
    }

    /// BAR0 is placed by QEMU, not by these registers (the vfio-user card).
    pub fn bars_emulated(&mut self) {
        self.home = None;
    }

    /// The link registers are QEMU's (its root bus: an RC-integrated endpoint has none).
    pub fn links_emulated(&mut self) {
        self.links_emulated = true;
    }

    /// MMIO reaches the registers: in D0, memory decoding on, and BAR0 at the address the host
    /// maps (QEMU's mapping, where the BARs are QEMU's). In D3hot a function answers config
    /// cycles only (PCI PM 1.2, 5.4.1); with `NoSoftRst+` the way back to D0 keeps its state.
    pub fn decodes(&self) -> bool {
        let bar0 = u32::from(self.read16(0x12)) << 16 | (u32::from(self.read16(0x10)) & 0xfff0);
        let placed = self.home.is_none_or(|home| bar0 == home);
        let d0 = self.power_state() == 0;
        d0 && self.command() & PCI_COMMAND_MEMORY != 0 && placed
    }

    /// PMCSR's PowerState: 0 (D0) to 3 (D3hot).
    pub fn power_state(&self) -> u8 {
        (self.read16(PM_CAP + 4) & PMCSR_STATE) as u8
    }

    /// Every word, for comparing config spaces.
    pub fn words(&self) -> &[u16] {
        &self.words
    }
}

/// A register's name for the conformance report.
fn word_name(off: u16) -> &'static str {
    match off {
        DEVCTL => "Device Control",
        LNKCTL => "Link Control",
        DEVCTL2 => "Device Control 2",
        LNKCTL2 => "Link Control 2",
        _ => "BAR0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_bits_and_reset_values_are_the_hardwares() {
        let mut c = SimConfig::new(Family::Modem, 0x17cb, 0x0308, 4096);
        assert_eq!(
            c.read16(0x10),
            BAR_TYPE_64,
            "4 KiB BAR at 0xfe000000: type bits only"
        );
        c.write16(0x10, 0xffff);
        assert_eq!(
            c.read16(0x10),
            0xf004,
            "sizing: address bits 12..15 and the type"
        );
        c.write16(0x3c, 0xffff);
        assert_eq!(c.read16(0x3c), 0x01ff, "the interrupt pin is read-only");
        c.write16(0x00, 0x1234);
        assert_eq!(c.read16(0x00), 0x17cb);
        c.function_reset();
        assert_eq!(
            (
                c.command(),
                c.read16(0x12),
                c.read16(DEVCTL),
                c.read16(LNKCTL2)
            ),
            (0, 0, 0x2810, 0x0003),
            "non-zero reset values where the hardware has them"
        );
        assert_eq!(c.read16(PM_CAP + 4) & 0x0008, 0x0008, "NoSoftRst+");
        assert!(!c.decodes());
        let mut w = SimConfig::new(Family::Wlan, 0x17cb, 0x1103, 2 << 20);
        w.write16(0x10, 0xffff);
        assert_eq!(
            w.read16(0x10),
            BAR_TYPE_64,
            "2 MiB: no address bits below 21"
        );
        w.write16(0x04, 0x0002);
        assert!(w.decodes());
        w.write16(0x12, 0xfd00);
        assert!(!w.decodes(), "the host maps BAR0 at 0xfe000000 only");
        w.bars_emulated();
        w.function_reset();
        assert!(
            !w.decodes(),
            "QEMU maps it, but decoding is off after a reset"
        );
        w.write16(0x04, 0x0002);
        assert!(
            w.decodes(),
            "memory decoding alone counts where QEMU has the BARs"
        );
        w.write16(PM_CAP + 4, 0x0003);
        assert!(!w.decodes(), "D3hot: config only");
        assert_eq!(w.read16(PM_CAP + 4), 0x000b, "NoSoftRst+ stays");
        w.write16(PM_CAP + 4, 0x0000);
        assert!(w.decodes(), "back in D0, nothing to restore");
    }

    #[test]
    fn a_restore_after_a_link_drop_must_turn_decoding_on_last() {
        let mut c = SimConfig::new(Family::Modem, 0x17cb, 0x0308, 4096);
        c.link_drop_reset();
        c.write16(0x10, BAR0_ADDRESS as u16);
        c.write16(0x12, (BAR0_ADDRESS >> 16) as u16);
        c.write16(0x04, 0x0002);
        assert_eq!(c.order_problems.len(), 4, "{:?}", c.order_problems);
        assert!(
            c.order_problems[1].contains("Link Control (0x60)")
                && c.order_problems[1].contains("reads 0x0000, was 0x0040"),
            "{:?}",
            c.order_problems
        );
        c.write16(LNKCTL, 0x0040);
        c.write16(0x04, 0x0006);
        assert_eq!(c.order_problems.len(), 4, "checked once per link drop");

        let mut k = SimConfig::new(Family::Modem, 0x17cb, 0x0308, 4096);
        k.function_reset();
        k.write16(0x04, 0x0002);
        assert!(
            k.order_problems.is_empty(),
            "a kernel reset is the kernel's to restore"
        );

        let mut ok = SimConfig::new(Family::Wlan, 0x17cb, 0x1103, 2 << 20);
        let before: Vec<u16> = ok.words().to_vec();
        ok.link_drop_reset();
        for off in [LNKCTL2, DEVCTL2, LNKCTL, DEVCTL, 0x16, 0x14, 0x12, 0x10] {
            ok.write16(off, before[off as usize / 2]);
        }
        ok.write16(0x04, 0x0002);
        assert!(ok.order_problems.is_empty(), "{:?}", ok.order_problems);
        ok.bars_emulated();
        ok.link_drop_reset();
        for off in [LNKCTL2, DEVCTL2, LNKCTL, DEVCTL] {
            ok.write16(off, before[off as usize / 2]);
        }
        ok.write16(0x04, 0x0002);
        assert!(
            ok.order_problems.is_empty(),
            "QEMU's BARs are not owed: {:?}",
            ok.order_problems
        );
    }

    #[test]
    fn on_qemus_root_bus_the_link_words_are_not_owed() {
        let mut c = SimConfig::new(Family::Wlan, 0x17cb, 0x1103, 2 << 20);
        c.bars_emulated();
        c.links_emulated();
        let before: Vec<u16> = c.words().to_vec();
        c.link_drop_reset();
        for off in [DEVCTL2, DEVCTL] {
            c.write16(off, before[off as usize / 2]);
        }
        c.write16(0x04, 0x0002);
        assert!(c.order_problems.is_empty(), "{:?}", c.order_problems);
        c.link_drop_reset();
        c.write16(0x04, 0x0002);
        assert_eq!(
            c.order_problems.len(),
            2,
            "Device Control (2) still are: {:?}",
            c.order_problems
        );
    }
}
