//! One record per reset family: everything that differs between the WLAN and the modem reset
//! (the sequence, how long the card may take to settle, what clean means, the BAR it needs, the
//! simulator's parameters). A sibling device is a row in [`super::DEVICES`]; a new reset is one
//! more record here.
use std::time::Duration;

use super::Family;
use super::regio::RegisterIo;
use super::regs::*;
use super::sequence::{self, Outcome};

/// A reset sequence: register accesses, `step` told before each step (for logs).
pub type SequenceFn = fn(&mut dyn RegisterIo, &mut dyn FnMut(&str)) -> Outcome;

/// Everything one reset family is: its sequence, what clean means, what the simulator plays.
pub struct FamilySpec {
    /// The family's name.
    pub name: &'static str,
    /// Version of our copy of the reviewed upstream sequence; logged with every step.
    pub sequence_version: &'static str,
    /// The reviewed register sequence.
    pub run: SequenceFn,
    /// Highest register offset (exclusive) the sequence and its verification touch; the BAR
    /// must be at least this large.
    pub bar_needed: u64,
    /// How long verification waits for the card to settle.
    pub settle_window: Duration,
    /// What a clean card shows after its reset, for verdicts and docs.
    pub expected: &'static str,
    /// Clean, once nothing stale or not-ready was found: (MHISTATUS.READY, MHI state, EE).
    pub is_clean: fn(ready: bool, state: u8, ee: u32) -> bool,
    /// The simulator's card of this family.
    pub sim: SimSpec,
}

/// What the simulator presents for a family.
pub struct SimSpec {
    /// BAR size (WCN6855's BAR0 is 2 MiB; SDX modems show 4 KiB).
    pub bar_len: u64,
    /// Class code's upper word.
    pub class: u16,
    /// The execution environment of firmware in mission mode.
    pub mission_ee: u32,
}

/// WCN6855/WCN7850: ath11k/ath12k's SoC global reset.
pub const WLAN: FamilySpec = FamilySpec {
    name: "wlan",
    sequence_version: "wlan-soc-global-reset/v12",
    run: sequence::wlan,
    bar_needed: PCIE_SOC_GLOBAL_RESET as u64 + 4,
    settle_window: Duration::from_millis(1000),
    // The SoC global reset reboots into the primary boot loader; the MHI reset clears the
    // SYSERR latched across it (ath11k_mhi_set_mhictrl_reset).
    expected: "MHICTRL.RESET clear, SYSERR clear, MHI state RESET or READY, EE PBL",
    is_clean: |_, state, ee| ee == EE_PBL && (state == MHI_STATE_RESET || state == MHI_STATE_READY),
    sim: SimSpec {
        bar_len: 2 << 20,
        class: 0x0280, // network controller, other
        mission_ee: EE_WFW,
    },
};

/// The SDX modems (SDX62/SDX65, and the SDX24/SDX55 profiles): the MHI SoC reset.
pub const MODEM: FamilySpec = FamilySpec {
    name: "modem",
    sequence_version: "modem-mhi-soc-reset/v12",
    run: sequence::modem,
    bar_needed: 0x200,
    // SDX65's MHI config times out READY after 8 s.
    settle_window: Duration::from_millis(8000),
    // After MHI_SOC_RESET_REQ the modem boots and raises READY for the host
    // (mhi_pci_generic reset_done accepts PBL/SBL/EDL/PTHRU; AMSS only right after our reset).
    expected: "SYSERR clear, MHI state READY, EE PBL/SBL/EDL/PTHRU (AMSS only right after our reset)",
    is_clean: |ready, state, ee| {
        ready
            && state == MHI_STATE_READY
            && [EE_PBL, EE_SBL, EE_EDL, EE_PTHRU, EE_AMSS].contains(&ee)
    },
    sim: SimSpec {
        bar_len: 4096,
        class: 0xff00, // unassigned class, as the SDX parts report
        mission_ee: EE_AMSS,
    },
};

impl Family {
    /// The family's record.
    pub const fn spec(self) -> &'static FamilySpec {
        match self {
            Family::Wlan => &WLAN,
            Family::Modem => &MODEM,
        }
    }

    /// Version of our copy of the reviewed upstream sequence; logged with every step.
    pub const fn sequence_version(self) -> &'static str {
        self.spec().sequence_version
    }

    /// The family's name.
    pub const fn name(self) -> &'static str {
        self.spec().name
    }
}
