//! Register-level model of the WLAN and modem firmware's reaction to the reset registers
//! (domain.md §2): the SoC global reset drops the link and reboots into PBL with SYSERR still
//! latched, an MHICTRL reset clears SYSERR, the modem's SoC reset request reboots it into PBL and
//! it raises READY later. Faults reproduce the failures seen in the field. Time is in
//! microseconds from the model's start and is supplied by the caller, so the same model runs on
//! a virtual clock in tests and on the wall clock behind a shared-memory BAR.
use serde::{Deserialize, Serialize};

use super::config::SimConfig;
use crate::device::Family;
use crate::device::regs::*;

/// Faults to inject. Every field defaults to "off".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// SYSERR stays latched whatever the host does.
    pub stuck_syserr: bool,
    /// After a reset the link stays down this long (ms) instead of the family's usual time.
    pub link_down_ms: Option<u64>,
    /// After a reset the link never comes back.
    pub never_returns: bool,
    /// READY (and the end of an MHI reset) comes this long (ms) after it normally would.
    pub slow_ready_ms: Option<u64>,
    /// The device drops off the bus after this many register writes.
    pub vanish_after_writes: Option<u32>,
    /// Config space reads all-ones from the start: the link was already down.
    pub config_all_ones: bool,
    /// Register writes have no effect.
    pub writes_ignored: bool,
    /// The modem boots on into AMSS by itself once READY (what a real SDX may do within its
    /// 2 s post-reset wait).
    pub boots_to_amss: bool,
    /// 0x3008 bit 0 was left set: a global reset asserted and never deasserted (a qcom-reset
    /// killed between the two writes).
    pub reset_asserted: bool,
    /// The SoC ignores this many reset requests (a well-formed sequence), keeping its firmware
    /// running: what makes a kernel's "successful" device-specific reset one to verify.
    pub resets_missed: u32,
}

impl Faults {
    /// Parses "stuck-syserr,link-down-ms=800,..." as given to `qcom-reset-sim --fault`.
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, val) = item
                .split_once('=')
                .map_or((item, None), |(k, v)| (k, Some(v)));
            let num = |v: Option<&str>| {
                v.and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| format!("fault {key:?} needs a number, e.g. {key}=500"))
            };
            match key {
                "stuck-syserr" => f.stuck_syserr = true,
                "never-returns" => f.never_returns = true,
                "config-all-ones" => f.config_all_ones = true,
                "writes-ignored" => f.writes_ignored = true,
                "reset-asserted" => f.reset_asserted = true,
                "boots-to-amss" => f.boots_to_amss = true,
                "link-down-ms" => f.link_down_ms = Some(num(val)?),
                "slow-ready-ms" => f.slow_ready_ms = Some(num(val)?),
                "vanish-after-writes" => f.vanish_after_writes = Some(num(val)? as u32),
                "resets-missed" => f.resets_missed = num(val)? as u32,
                _ => return Err(format!("unknown fault {key:?}; known: {}", Faults::NAMES)),
            }
        }
        Ok(f)
    }

    /// Every fault's name, for `--faults` errors and help.
    pub const NAMES: &'static str = "stuck-syserr, never-returns, config-all-ones, writes-ignored, reset-asserted, boots-to-amss, \
         link-down-ms=N, slow-ready-ms=N, vanish-after-writes=N, resets-missed=N";
}

/// The state a previous owner left the card in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SimState {
    /// A killed VM's live session: MHI M0 in mission mode (WLAN FW / AMSS), no error. What a
    /// bus reset leaves untouched on the real parts.
    #[default]
    Mission,
    /// The firmware crashed: SYSERR latched, MHI SYS_ERR, EE RDDM.
    Crashed,
    /// The firmware hung in an MHI reset it never finishes acknowledging: never READY.
    Stuck,
}

/// Typical firmware timings (µs), within what the upstream sequence tolerates.
const WLAN_LINK_DOWN_US: u64 = 40_000;
const MODEM_LINK_DOWN_US: u64 = 300_000;
const MHI_RESET_US: u64 = 3_000;
const MODEM_READY_US: u64 = 600_000;
/// Shortest assertion of the global reset bit that the SoC honours: the reviewed 10 ms, less the
/// shared-memory server's polling slack.
const MIN_ASSERT_US: u64 = 10_000 - super::conformance::SLACK_US;
/// 0x3008 reads with other bits set, so a sequence that writes 1/0 instead of v|1 / v&~1
/// clobbers them; the SoC then ignores the write.
pub const GLOBAL_RESET_OTHER_BITS: u32 = 0x0000_0010;
/// What a link drop does to config space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LinkDrop {
    /// A function reset, as PCIe has it on DL_Down: PCI_COMMAND 0, BARs unassigned, every
    /// register at its reset value; MMIO reads all-ones until the header is restored.
    #[default]
    FunctionReset,
    /// Config space survives (what the VM lab's ivshmem stand-in can show: its config space is
    /// QEMU's, not the simulator's).
    KeepsConfig,
}
/// Where the simulated card's BHI registers start in its BAR (BHIOFF reads this).
pub const BHI_BASE: u32 = 0x100;
/// ath11k/ath12k's register window (`ATH1xK_PCI_WINDOW_REG_ADDRESS`): the upper bits of an
/// offset beyond 512 KiB select which 512 KiB the BAR shows at `WINDOW_START`.
const WINDOW_REG: u32 = 0x310c;
const WINDOW_START: u32 = 0x80000;
const WINDOW_RANGE: u32 = 0x7ffff;
const WINDOW_SHIFT: u32 = 19;
const WINDOW_SELECT: u32 = 0x3f;
/// `TCSR_SOC_HW_VERSION` as ath11k reads it for WCN6855 (BAR offset) and ath12k for WCN7850
/// (through the window), and what both parts answer: major 2, minor 0 (hw2.0).
const TCSR_SOC_HW_VERSION_WCN6855: u32 = 0x224;
const TCSR_SOC_HW_VERSION_WCN7850: u32 = 0x1b0_0000;
const SOC_HW_VERSION_2_0: u32 = 0x200;

/// One BAR write the card received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WriteRecord {
    /// When, in µs of simulated time.
    pub at_us: u64,
    /// The register.
    pub offset: u32,
    /// The value written.
    pub value: u32,
}

/// A power-state change the host made through PMCSR (D0 = 0, D3hot = 3): runtime PM putting
/// the idle card to sleep, a session waking it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PowerChange {
    /// When, in µs of simulated time.
    pub at_us: u64,
    /// The power state before.
    pub from: u8,
    /// The power state after.
    pub to: u8,
}

/// The simulated card: its SoC state machine, config space and link.
#[derive(Clone, Debug)]
pub struct Model {
    /// The reset family it behaves as.
    pub family: Family,
    /// Its vendor ID in config space.
    pub vendor: u16,
    /// Its device ID in config space.
    pub device: u16,
    /// How it misbehaves.
    pub faults: Faults,
    /// Its config space.
    pub cfg: SimConfig,
    /// What a link drop does to its config space.
    pub link_drop: LinkDrop,
    /// Config writes received (also those a downed link dropped).
    pub config_writes: usize,
    /// Every PMCSR power-state change, in order.
    pub power: Vec<PowerChange>,
    /// The SoC itself crashed: only a SoC reset heals it, an MHI reset does not.
    soc_crashed: bool,
    /// The firmware hangs in the MHI reset it was in (`Stuck`): it never acknowledges that one
    /// or any later one (a driver's rebind fails the same way); only a SoC reset heals it.
    hung: bool,
    /// Link down until this time (u64::MAX: for good).
    link_down_until: u64,
    vanished: bool,
    /// 0x3008 as the sequence will first read it.
    initial_global_reset: u32,
    global_reset: u32,
    asserted_at: Option<u64>,
    mhictrl: u32,
    mhi_reset_done_at: Option<u64>,
    mhi_state: u8,
    syserr: bool,
    ready: bool,
    ready_at: Option<u64>,
    ee: u32,
    intvec: u32,
    soc_reset_req: u32,
    wake: u32,
    /// Number of SoC resets that took effect.
    pub resets: u32,
    /// Reset requests the SoC ignored (`resets-missed`).
    pub missed: u32,
    /// Every BAR write received, in order.
    pub writes: Vec<WriteRecord>,
    /// The register window ath11k/ath12k selected.
    window: u32,
    /// Offsets read that the model does not know (answered 0): a driver's path beyond what
    /// is modelled. On real WCN7850 firmware some such reads crash it.
    pub beyond: std::collections::BTreeSet<u32>,
}

impl Model {
    /// A device in the state a previous owner left it in.
    pub fn new(family: Family, vendor: u16, device: u16, state: SimState, faults: Faults) -> Model {
        let link_down_until = if faults.config_all_ones { u64::MAX } else { 0 };
        let global_reset = GLOBAL_RESET_OTHER_BITS | u32::from(faults.reset_asserted);
        let asserted_at = faults.reset_asserted.then_some(0);
        let mission_ee = family.spec().sim.mission_ee;
        let (mhictrl, mhi_state, ee, syserr, ready) = match state {
            SimState::Mission => (
                u32::from(MHI_STATE_M0) << 8,
                MHI_STATE_M0,
                mission_ee,
                false,
                true,
            ),
            SimState::Crashed => (0, MHI_STATE_SYS_ERR, EE_RDDM, true, false),
            SimState::Stuck => (MHICTRL_RESET, MHI_STATE_RESET, mission_ee, false, false),
        };
        Model {
            family,
            vendor,
            device,
            faults,
            cfg: SimConfig::new(family, vendor, device, super::bar_len(family)),
            link_drop: LinkDrop::default(),
            config_writes: 0,
            power: Vec::new(),
            soc_crashed: state == SimState::Crashed,
            hung: state == SimState::Stuck,
            link_down_until,
            vanished: false,
            initial_global_reset: global_reset,
            global_reset,
            asserted_at,
            mhictrl,
            mhi_reset_done_at: None,
            mhi_state,
            syserr,
            ready,
            ready_at: None,
            ee,
            intvec: 0,
            soc_reset_req: 0,
            wake: 0,
            resets: 0,
            missed: 0,
            writes: Vec::new(),
            window: 0,
            beyond: Default::default(),
        }
    }

    /// Whether the link is up at `now` (µs).
    pub fn link_up(&self, now: u64) -> bool {
        !self.vanished && now >= self.link_down_until
    }

    fn slow(&self) -> u64 {
        self.faults.slow_ready_ms.unwrap_or(0) * 1000
    }

    fn advance(&mut self, now: u64) {
        if self.mhi_reset_done_at.is_some_and(|t| now >= t) {
            self.mhi_reset_done_at = None;
            self.mhictrl &= !MHICTRL_RESET;
            if !self.faults.stuck_syserr && !self.soc_crashed {
                self.syserr = false;
                self.mhi_state = MHI_STATE_READY;
                self.ready = true;
            }
        }
        if self.ready_at.is_some_and(|t| now >= t) {
            self.ready_at = None;
            if !self.syserr {
                self.ready = true;
                self.mhi_state = MHI_STATE_READY;
                if self.faults.boots_to_amss {
                    self.ee = EE_AMSS;
                }
            }
        }
    }

    /// The least time a reset of this card can take following the reviewed sequence: each
    /// mandated wait, or the firmware's own time where that is longer (the WLAN link is down
    /// for `link-down` after the deassert, which the sequence's 10 ms wait overlaps; MHI reset
    /// completes within its 10 ms wait; the modem is READY within its 2 s wait). What a reset
    /// takes beyond this is the host's: the poll granularity and qcom-reset's bookkeeping.
    pub fn reset_floor(&self) -> std::time::Duration {
        const MANDATED_US: u64 = 10_000;
        let link = |usual: u64| self.faults.link_down_ms.map_or(usual, |ms| ms * 1000);
        let us = match self.family {
            Family::Wlan => {
                MANDATED_US
                    + link(WLAN_LINK_DOWN_US).max(MANDATED_US)
                    + (MHI_RESET_US + self.slow()).max(MANDATED_US)
            }
            Family::Modem => (link(MODEM_LINK_DOWN_US) + MODEM_READY_US + self.slow())
                .max(crate::device::sequence::MODEM_POST_RESET.as_micros() as u64),
        };
        std::time::Duration::from_micros(us)
    }

    /// The SoC reboots: the link drops, then the device comes back in PBL.
    fn reboot(&mut self, now: u64, usual_link_down: u64) {
        if self.faults.resets_missed > 0 {
            // The request is taken (the register reads as after a reset), nothing else happens.
            self.faults.resets_missed -= 1;
            self.missed += 1;
            self.asserted_at = None;
            self.soc_reset_req = 0;
            return;
        }
        self.resets += 1;
        self.link_down_until = if self.faults.never_returns {
            u64::MAX
        } else {
            now + self
                .faults
                .link_down_ms
                .map_or(usual_link_down, |ms| ms * 1000)
        };
        let up = self.link_down_until;
        self.soc_crashed = false;
        self.hung = false;
        if self.link_drop == LinkDrop::FunctionReset {
            self.cfg.link_drop_reset();
        }
        self.asserted_at = None;
        self.global_reset = GLOBAL_RESET_OTHER_BITS;
        self.mhictrl = 0;
        self.mhi_reset_done_at = None;
        self.mhi_state = MHI_STATE_RESET;
        self.ready = false;
        self.ee = EE_PBL;
        self.intvec = 0;
        self.soc_reset_req = 0;
        match self.family {
            // SYSERR survives the global reset until the host resets MHI (ath11k comment).
            Family::Wlan => self.syserr = true,
            Family::Modem => {
                self.syserr = self.faults.stuck_syserr;
                self.ready_at = Some(up.saturating_add(MODEM_READY_US + self.slow()));
            }
        }
    }

    /// A reset from outside the register BAR (a bus reset above the card, VFIO's device
    /// reset): config space goes back to its reset values, the SoC and its firmware keep their
    /// state, which is what makes the kernel's "success" meaningless on these parts.
    pub fn kernel_reset(&mut self, now: u64) {
        self.advance(now);
        self.cfg.function_reset();
    }

    /// A config-space read at `now` (all-ones while the link is down).
    pub fn config_read16(&mut self, now: u64, offset: u16) -> u16 {
        self.advance(now);
        if !self.link_up(now) {
            return 0xffff;
        }
        self.cfg.read16(offset)
    }

    /// A config-space write at `now` (dropped while the link is down).
    pub fn config_write16(&mut self, now: u64, offset: u16, value: u16) {
        self.config_writes += 1;
        self.advance(now);
        if !self.link_up(now) {
            return;
        }
        let from = self.cfg.power_state();
        self.cfg.write16(offset, value);
        let to = self.cfg.power_state();
        if to != from {
            self.power.push(PowerChange {
                at_us: now,
                from,
                to,
            });
        }
    }

    /// The writes received, checked against the reviewed sequence for this card.
    pub fn conformance(&self) -> super::conformance::Conformance {
        let mut c = super::conformance::check(self.family, &self.writes, self.initial_global_reset);
        c.problems.extend(self.cfg.order_problems.iter().cloned());
        c.ok = c.problems.is_empty();
        c
    }

    /// A BAR read at `now`.
    pub fn read32(&mut self, now: u64, offset: u32) -> u32 {
        self.advance(now);
        if !self.link_up(now) || !self.cfg.decodes() {
            return ALL_ONES;
        }
        let offset = self.unwindowed(offset);
        self.register(offset).unwrap_or_else(|| {
            self.beyond.insert(offset);
            0
        })
    }

    /// An offset in ath11k/ath12k's window as the SoC address it selects; others as they are.
    fn unwindowed(&self, offset: u32) -> u32 {
        match (self.family, offset) {
            (Family::Wlan, o) if (WINDOW_START..2 * WINDOW_START).contains(&o) => {
                (self.window & WINDOW_SELECT) << WINDOW_SHIFT | (o & WINDOW_RANGE)
            }
            (_, o) => o,
        }
    }

    /// The modelled registers' values; None for an offset the model does not know.
    fn register(&self, offset: u32) -> Option<u32> {
        Some(match offset {
            MHIREGLEN => 0x1000,
            MHIVER => 0x0100_0000,
            BHIOFF => BHI_BASE,
            MHICTRL => self.mhictrl,
            MHISTATUS => {
                u32::from(self.mhi_state) << 8
                    | if self.syserr { MHISTATUS_SYSERR } else { 0 }
                    | if self.ready { MHISTATUS_READY } else { 0 }
            }
            MHI_SOC_RESET_REQ => self.soc_reset_req,
            PCIE_SOC_WAKE => self.wake,
            PCIE_SOC_GLOBAL_RESET => self.global_reset,
            o if o == BHI_BASE + BHI_EXECENV => self.ee,
            o if o == BHI_BASE + BHI_INTVEC => self.intvec,
            WINDOW_REG if self.family == Family::Wlan => self.window,
            TCSR_SOC_HW_VERSION_WCN6855 if self.device == 0x1103 => SOC_HW_VERSION_2_0,
            TCSR_SOC_HW_VERSION_WCN7850 if self.device == 0x1107 => SOC_HW_VERSION_2_0,
            _ => return None,
        })
    }

    /// A BAR write at `now`: the SoC acts on it.
    pub fn write32(&mut self, now: u64, offset: u32, value: u32) {
        self.advance(now);
        if !self.link_up(now) || !self.cfg.decodes() {
            return;
        }
        self.writes.push(WriteRecord {
            at_us: now,
            offset,
            value,
        });
        if let Some(n) = self.faults.vanish_after_writes
            && self.writes.len() as u32 >= n
        {
            self.vanished = true;
            return;
        }
        if self.faults.writes_ignored {
            return;
        }
        match (self.family, offset) {
            (Family::Wlan, PCIE_SOC_GLOBAL_RESET) => {
                if value & !GLOBAL_RESET_V != self.global_reset & !GLOBAL_RESET_V {
                    // Other bits clobbered (1/0 written instead of v|1 / v&~1): ignored.
                    return;
                }
                let was = self.asserted_at;
                self.global_reset = value;
                match (value & GLOBAL_RESET_V != 0, was) {
                    (true, None) => self.asserted_at = Some(now),
                    (false, Some(t)) if now - t >= MIN_ASSERT_US => {
                        self.reboot(now, WLAN_LINK_DOWN_US);
                    }
                    (false, Some(_)) => self.asserted_at = None,
                    _ => {}
                }
            }
            (Family::Wlan, PCIE_SOC_WAKE) => self.wake = value,
            (Family::Wlan, WINDOW_REG) => self.window = value,
            (_, MHICTRL) if self.hung => self.mhictrl = value | MHICTRL_RESET,
            (_, MHICTRL) => {
                self.mhictrl = value;
                if value & MHICTRL_RESET != 0 {
                    self.mhi_reset_done_at = Some(now + MHI_RESET_US + self.slow());
                }
            }
            (Family::Modem, MHI_SOC_RESET_REQ) => {
                self.soc_reset_req = value;
                if value & 1 != 0 {
                    self.reboot(now, MODEM_LINK_DOWN_US);
                }
            }
            (_, o) if o == BHI_BASE + BHI_INTVEC => self.intvec = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::*;

    fn mem_on(m: &mut Model) {
        m.config_write16(0, PCI_COMMAND, PCI_COMMAND_MEMORY);
    }

    #[test]
    fn wlan_global_reset_needs_a_held_assertion() {
        let mut m = Model::new(
            Family::Wlan,
            0x17cb,
            0x1103,
            SimState::Crashed,
            Faults::default(),
        );
        mem_on(&mut m);
        let v = GLOBAL_RESET_OTHER_BITS;
        m.write32(0, PCIE_SOC_GLOBAL_RESET, v | 1);
        m.write32(5_000, PCIE_SOC_GLOBAL_RESET, v); // 5 ms: shorter than reviewed, ignored
        assert_eq!(m.resets, 0);
        m.write32(5_100, PCIE_SOC_GLOBAL_RESET, 1); // clobbers the other bits: ignored
        m.write32(16_000, PCIE_SOC_GLOBAL_RESET, 0);
        assert_eq!(m.resets, 0, "1/0 instead of v|1 / v&~1");
        m.write32(200, PCIE_SOC_GLOBAL_RESET, v | 1);
        m.write32(10_200, PCIE_SOC_GLOBAL_RESET, v);
        assert_eq!(m.resets, 1);
        assert_eq!(
            m.read32(10_300, MHISTATUS),
            ALL_ONES,
            "link drops after the reset"
        );
        let up = 10_200 + WLAN_LINK_DOWN_US;
        // The function reset took the header with it: back as the kernel had it.
        assert_eq!(
            m.read32(up, MHISTATUS),
            ALL_ONES,
            "no decoding without the header"
        );
        m.config_write16(up, 0x12, 0xfe00);
        m.config_write16(up, PCI_COMMAND, PCI_COMMAND_MEMORY);
        assert_eq!(
            m.read32(up, MHISTATUS) & MHISTATUS_SYSERR,
            MHISTATUS_SYSERR,
            "SYSERR survives"
        );
        assert_eq!(m.read32(up, BHI_BASE + BHI_EXECENV), EE_PBL);
        m.write32(up, MHICTRL, MHICTRL_RESET);
        let st = m.read32(up + MHI_RESET_US, MHISTATUS);
        assert_eq!(st & MHISTATUS_SYSERR, 0, "MHI reset clears SYSERR");
        assert_eq!(m.read32(up + MHI_RESET_US, MHICTRL) & MHICTRL_RESET, 0);
    }

    #[test]
    fn a_missed_reset_leaves_the_firmware_running_and_the_next_one_takes() {
        let faults = Faults::parse("resets-missed=1").unwrap();
        let mut m = Model::new(Family::Modem, 0x17cb, 0x0308, SimState::Mission, faults);
        mem_on(&mut m);
        let mission = m.read32(0, MHISTATUS);
        m.write32(10, MHI_SOC_RESET_REQ, 1);
        assert_eq!((m.resets, m.missed), (0, 1));
        assert_eq!(
            m.read32(20, MHISTATUS),
            mission,
            "no link drop, the session runs on"
        );
        m.write32(3_000_000, MHI_SOC_RESET_REQ, 1);
        assert_eq!((m.resets, m.missed), (1, 1));
        assert_eq!(
            m.read32(3_000_010, MHISTATUS),
            ALL_ONES,
            "this one dropped the link"
        );
    }

    /// The users' stuck modem: a rebind of mhi-pci-generic fails as the first bind did ("Device
    /// failed to clear MHI Reset"), because the hung firmware acknowledges no MHI reset; the SoC
    /// reset heals it.
    #[test]
    fn a_hung_firmware_acknowledges_no_mhi_reset_until_the_soc_resets() {
        let mut m = Model::new(
            Family::Modem,
            0x17cb,
            0x0308,
            SimState::Stuck,
            Faults::default(),
        );
        mem_on(&mut m);
        assert_ne!(m.read32(0, MHICTRL) & MHICTRL_RESET, 0);
        m.write32(10, MHICTRL, MHICTRL_RESET);
        m.write32(20, MHICTRL, 0);
        let later = 10 * MHI_RESET_US;
        assert_ne!(
            m.read32(later, MHICTRL) & MHICTRL_RESET,
            0,
            "still in reset"
        );
        assert_eq!(
            m.read32(later, MHISTATUS) & MHISTATUS_READY,
            0,
            "never READY"
        );
        m.write32(later, MHI_SOC_RESET_REQ, 1);
        let up = later + MODEM_LINK_DOWN_US;
        m.config_write16(up, 0x12, 0xfe00);
        m.config_write16(up, PCI_COMMAND, PCI_COMMAND_MEMORY);
        m.write32(up, MHICTRL, MHICTRL_RESET);
        assert_eq!(
            m.read32(up + MHI_RESET_US, MHICTRL) & MHICTRL_RESET,
            0,
            "healed"
        );
    }

    /// What ath11k and ath12k read first to tell the part's revision, each where it reads it;
    /// what the model does not know is answered 0 and listed.
    #[test]
    fn the_wlan_parts_tell_their_revision_where_their_drivers_read_it() {
        let mut wcn6855 = Model::new(
            Family::Wlan,
            0x17cb,
            0x1103,
            SimState::Mission,
            Faults::default(),
        );
        mem_on(&mut wcn6855);
        assert_eq!(
            wcn6855.read32(0, TCSR_SOC_HW_VERSION_WCN6855),
            SOC_HW_VERSION_2_0
        );
        let mut wcn7850 = Model::new(
            Family::Wlan,
            0x17cb,
            0x1107,
            SimState::Mission,
            Faults::default(),
        );
        mem_on(&mut wcn7850);
        let window = TCSR_SOC_HW_VERSION_WCN7850 >> WINDOW_SHIFT;
        wcn7850.write32(0, WINDOW_REG, 0x4000_0000 | window);
        assert_eq!(wcn7850.read32(0, WINDOW_REG) & WINDOW_SELECT, window);
        let at = WINDOW_START + (TCSR_SOC_HW_VERSION_WCN7850 & WINDOW_RANGE);
        assert_eq!(wcn7850.read32(0, at), SOC_HW_VERSION_2_0);
        assert!(wcn7850.beyond.is_empty(), "{:x?}", wcn7850.beyond);
        assert_eq!(wcn7850.read32(0, WINDOW_START + 0x40), 0);
        assert_eq!(
            wcn7850.beyond.iter().copied().collect::<Vec<_>>(),
            [TCSR_SOC_HW_VERSION_WCN7850 + 0x40],
            "listed at the SoC address the window selects"
        );
    }

    #[test]
    fn an_mhi_reset_alone_does_not_heal_a_crashed_soc_and_decode_off_loses_writes() {
        let mut m = Model::new(
            Family::Wlan,
            0x17cb,
            0x1103,
            SimState::Crashed,
            Faults::default(),
        );
        m.write32(0, MHICTRL, MHICTRL_RESET);
        assert!(
            m.writes.is_empty(),
            "memory decoding off: the write is lost"
        );
        mem_on(&mut m);
        m.write32(0, MHICTRL, MHICTRL_RESET);
        let st = m.read32(MHI_RESET_US + 1, MHISTATUS);
        assert_ne!(st & MHISTATUS_SYSERR, 0, "still crashed");
        assert_eq!(m.read32(MHI_RESET_US + 1, BHI_BASE + BHI_EXECENV), EE_RDDM);
    }

    #[test]
    fn a_soc_reset_resets_the_function_and_mmio_waits_for_the_header() {
        let mut m = Model::new(
            Family::Modem,
            0x17cb,
            0x0308,
            SimState::Mission,
            Faults::default(),
        );
        mem_on(&mut m);
        assert_eq!(m.config_read16(0, 0x12), 0xfe00);
        m.write32(0, MHI_SOC_RESET_REQ, 1);
        let up = MODEM_LINK_DOWN_US;
        assert_eq!(m.config_read16(up, 0x12), 0, "BAR0 lost with the link");
        assert_eq!(m.config_read16(up, PCI_COMMAND), 0, "and PCI_COMMAND");
        assert_eq!(m.config_read16(up, PCI_VENDOR_ID), 0x17cb);
        assert_eq!(
            m.read32(up, MHISTATUS),
            ALL_ONES,
            "no decoding until the header is back"
        );
        m.config_write16(up, PCI_COMMAND, PCI_COMMAND_MEMORY);
        assert_eq!(
            m.read32(up, MHISTATUS),
            ALL_ONES,
            "BAR0 unassigned: still nothing"
        );
        m.config_write16(up, 0x12, 0xfe00);
        assert_ne!(m.read32(up, MHISTATUS), ALL_ONES);
        // The other mode keeps config space across the drop.
        let mut k = Model::new(
            Family::Modem,
            0x17cb,
            0x0308,
            SimState::Mission,
            Faults::default(),
        );
        k.link_drop = LinkDrop::KeepsConfig;
        mem_on(&mut k);
        k.write32(0, MHI_SOC_RESET_REQ, 1);
        assert_ne!(k.read32(up, MHISTATUS), ALL_ONES);
    }

    #[test]
    fn memory_decode_off_reads_all_ones() {
        let mut m = Model::new(
            Family::Modem,
            0x17cb,
            0x0308,
            SimState::Crashed,
            Faults::default(),
        );
        assert_eq!(m.read32(0, MHISTATUS), ALL_ONES);
        mem_on(&mut m);
        assert_ne!(m.read32(0, MHISTATUS), ALL_ONES);
    }

    /// The floor follows the card's faults: a longer link drop, a slower firmware.
    #[test]
    fn the_floor_is_each_mandated_wait_or_the_firmwares_longer_time() {
        let floor = |family, faults: &str| {
            let m = Model::new(
                family,
                0x17cb,
                0x1103,
                SimState::Mission,
                Faults::parse(faults).unwrap(),
            );
            m.reset_floor().as_millis()
        };
        assert_eq!(floor(Family::Wlan, ""), 10 + 40 + 10);
        assert_eq!(floor(Family::Wlan, "link-down-ms=800"), 10 + 800 + 10);
        // MHI reset completes 3 ms after the write, 50 ms later when slow: past its 10 ms wait.
        assert_eq!(floor(Family::Wlan, "slow-ready-ms=50"), 10 + 40 + 53);
        assert_eq!(floor(Family::Modem, ""), 2000);
        // Link down 300 ms, READY 600 ms after it comes back, 2 s later when slow.
        assert_eq!(floor(Family::Modem, "slow-ready-ms=2000"), 300 + 600 + 2000);
    }

    #[test]
    fn fault_spec_parses_and_rejects() {
        let f = Faults::parse("stuck-syserr, link-down-ms=800,vanish-after-writes=2").unwrap();
        assert!(f.stuck_syserr);
        assert_eq!(f.link_down_ms, Some(800));
        assert_eq!(f.vanish_after_writes, Some(2));
        assert!(
            Faults::parse("link-down-ms")
                .unwrap_err()
                .contains("needs a number")
        );
        assert!(
            Faults::parse("bogus")
                .unwrap_err()
                .contains("unknown fault")
        );
    }
}
