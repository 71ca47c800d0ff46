//! Register map of the MHI and SoC-reset registers (domain.md §2; drivers/bus/mhi/common.h,
//! ath11k/ath12k pci.c). Offsets are from the start of the device's register BAR.

pub const MHIREGLEN: u32 = 0x00;
pub const MHIVER: u32 = 0x08;
pub const BHIOFF: u32 = 0x28;
pub const MHICTRL: u32 = 0x38;
pub const MHICTRL_RESET: u32 = 1 << 1;
pub const MHISTATUS: u32 = 0x48;
pub const MHISTATUS_READY: u32 = 1 << 0;
pub const MHISTATUS_SYSERR: u32 = 1 << 2;
pub const MHI_SOC_RESET_REQ: u32 = 0xb0;
pub const PCIE_SOC_WAKE: u32 = 0x3004;
pub const PCIE_SOC_GLOBAL_RESET: u32 = 0x3008;
pub const GLOBAL_RESET_V: u32 = 1 << 0;
/// BHI registers, relative to the value of BHIOFF.
pub const BHI_INTVEC: u32 = 0x20;
pub const BHI_EXECENV: u32 = 0x28;

/// What every read returns when the link is down (`PCI_POSSIBLE_ERROR`).
pub const ALL_ONES: u32 = 0xffff_ffff;

pub const fn mhi_state(status: u32) -> u8 {
    ((status >> 8) & 0xff) as u8
}

/// MHI states (MHISTATUS/MHICTRL [15:8]).
pub const MHI_STATE_RESET: u8 = 0;
pub const MHI_STATE_READY: u8 = 1;
pub const MHI_STATE_M0: u8 = 2;
pub const MHI_STATE_M3: u8 = 5;
pub const MHI_STATE_SYS_ERR: u8 = 0xff;

pub fn mhi_state_name(s: u8) -> &'static str {
    match s {
        0 => "RESET",
        1 => "READY",
        2 => "M0",
        3 => "M1",
        4 => "M2",
        5 => "M3",
        6 => "M3_FAST",
        7 => "BHI",
        0xff => "SYS_ERR",
        _ => "INVALID",
    }
}

/// Execution environments (BHI EXECENV).
pub const EE_PBL: u32 = 0;
pub const EE_SBL: u32 = 1;
pub const EE_AMSS: u32 = 2;
pub const EE_RDDM: u32 = 3;
pub const EE_WFW: u32 = 4;
pub const EE_PTHRU: u32 = 5;
pub const EE_EDL: u32 = 6;
pub const EE_FP: u32 = 7;

pub fn ee_name(ee: u32) -> &'static str {
    match ee {
        0 => "PBL",
        1 => "SBL",
        2 => "AMSS",
        3 => "RDDM",
        4 => "WFW",
        5 => "PTHRU",
        6 => "EDL",
        7 => "FP",
        _ => "INVALID",
    }
}
