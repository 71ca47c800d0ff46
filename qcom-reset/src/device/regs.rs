//! Register map of the MHI and SoC-reset registers (domain.md §2; drivers/bus/mhi/common.h,
//! ath11k/ath12k pci.c). Offsets are from the start of the device's register BAR.

/// MHI register space length.
pub const MHIREGLEN: u32 = 0x00;
/// MHI version.
pub const MHIVER: u32 = 0x08;
/// Offset of the BHI registers.
pub const BHIOFF: u32 = 0x28;
/// MHI control.
pub const MHICTRL: u32 = 0x38;
/// MHI control: reset.
pub const MHICTRL_RESET: u32 = 1 << 1;
/// MHI status.
pub const MHISTATUS: u32 = 0x48;
/// MHI status: READY.
pub const MHISTATUS_READY: u32 = 1 << 0;
/// MHI status: SYS_ERR.
pub const MHISTATUS_SYSERR: u32 = 1 << 2;
/// MHI SoC reset request.
pub const MHI_SOC_RESET_REQ: u32 = 0xb0;
/// PCIe SoC wake (WLAN).
pub const PCIE_SOC_WAKE: u32 = 0x3004;
/// PCIe SoC global reset (WLAN).
pub const PCIE_SOC_GLOBAL_RESET: u32 = 0x3008;
/// Global reset: assert.
pub const GLOBAL_RESET_V: u32 = 1 << 0;
/// BHI registers, relative to the value of BHIOFF.
pub const BHI_INTVEC: u32 = 0x20;
/// BHI: the execution environment.
pub const BHI_EXECENV: u32 = 0x28;

/// What every read returns when the link is down (`PCI_POSSIBLE_ERROR`).
pub const ALL_ONES: u32 = 0xffff_ffff;

/// The MHI state field of MHISTATUS.
pub const fn mhi_state(status: u32) -> u8 {
    ((status >> 8) & 0xff) as u8
}

/// MHI states (MHISTATUS/MHICTRL [15:8]).
pub const MHI_STATE_RESET: u8 = 0;
/// MHI state READY.
pub const MHI_STATE_READY: u8 = 1;
/// MHI state M0 (mission mode's running state).
pub const MHI_STATE_M0: u8 = 2;
/// MHI state M3 (suspended).
pub const MHI_STATE_M3: u8 = 5;
/// MHI state SYS_ERR.
pub const MHI_STATE_SYS_ERR: u8 = 0xff;

/// An MHI state's name.
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
/// Execution environment: secondary boot loader.
pub const EE_SBL: u32 = 1;
/// Execution environment: mission mode.
pub const EE_AMSS: u32 = 2;
/// Execution environment: RAM dump debug mode (the crash dump; judged crashed).
pub const EE_RDDM: u32 = 3;
/// Execution environment: WLAN firmware.
pub const EE_WFW: u32 = 4;
/// Execution environment: pass-through.
pub const EE_PTHRU: u32 = 5;
/// Execution environment: emergency download.
pub const EE_EDL: u32 = 6;
/// Execution environment: flash programmer.
pub const EE_FP: u32 = 7;

/// An execution environment's name.
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
