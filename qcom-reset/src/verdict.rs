//! Health verdicts from config space and the MHI registers. An all-ones read means the link is
//! down and is never decoded as bits (all-ones would otherwise read as RESET+READY+SYSERR).
use std::time::Duration;

use serde::Serialize;

use crate::devices::Family;
use crate::io::RegisterIo;
use crate::regs::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Link up, no SYSERR, MHI out of reset in a valid execution environment.
    Healthy,
    /// The device reports a system error (MHISTATUS.SYSERR or MHI state SYS_ERR).
    Syserr,
    /// Config space or the BAR reads all-ones: the device is off the bus.
    LinkDown,
    /// Alive and without error, but MHI is still in reset or (modem) not READY.
    NotReady,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Syserr => "syserr",
            Health::LinkDown => "link-down",
            Health::NotReady => "not-ready",
        })
    }
}

/// Raw values behind a verdict; `None` where the register was not read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Registers {
    pub config_vendor: u16,
    pub config_device: u16,
    pub mhictrl: Option<u32>,
    pub mhistatus: Option<u32>,
    pub bhioff: Option<u32>,
    pub execenv: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub health: Health,
    /// What the family's firmware should show right after our reset.
    pub expected: &'static str,
    /// Whether the registers match `expected` exactly.
    pub in_expected_state: bool,
    pub detail: String,
    pub registers: Registers,
}

pub const fn expected_after_reset(family: Family) -> &'static str {
    match family {
        // The SoC global reset reboots into the primary boot loader; the MHI reset clears the
        // SYSERR latched across it (ath11k_mhi_set_mhictrl_reset).
        Family::Wlan => "MHICTRL.RESET clear, SYSERR clear, MHI state RESET or READY, EE PBL",
        // After MHI_SOC_RESET_REQ and 2 s the modem is booting or booted (mhi_pci_generic
        // reset_done accepts PBL/SBL/AMSS/EDL/PTHRU) and must raise READY for the host.
        Family::Modem => "SYSERR clear, MHI state READY, EE PBL/SBL/AMSS/EDL/PTHRU",
    }
}

fn bhi_readable(bhioff: u32, bar_len: u64) -> bool {
    bhioff != ALL_ONES && (bhioff as u64 + BHI_EXECENV as u64 + 4) <= bar_len
}

/// Reads everything a verdict needs; the BAR only when config space answers.
pub fn read_registers(
    vendor: u16,
    device: u16,
    io: &mut dyn RegisterIo,
    bar_len: u64,
) -> Registers {
    let mut r = Registers {
        config_vendor: vendor,
        config_device: device,
        ..Default::default()
    };
    if vendor == 0xffff {
        return r;
    }
    r.mhistatus = Some(io.read32(MHISTATUS));
    r.mhictrl = Some(io.read32(MHICTRL));
    let bhioff = io.read32(BHIOFF);
    r.bhioff = Some(bhioff);
    if bhi_readable(bhioff, bar_len) {
        r.execenv = Some(io.read32(bhioff + BHI_EXECENV));
    }
    r
}

pub fn judge(family: Family, r: &Registers) -> Verdict {
    let v = |health, in_expected_state, detail: String| Verdict {
        health,
        expected: expected_after_reset(family),
        in_expected_state,
        detail,
        registers: *r,
    };
    if r.config_vendor == 0xffff {
        return v(
            Health::LinkDown,
            false,
            "config space reads all-ones (rev ff): the link is down".into(),
        );
    }
    let (Some(status), Some(ctrl)) = (r.mhistatus, r.mhictrl) else {
        return v(Health::LinkDown, false, "registers not readable".into());
    };
    if status == ALL_ONES || ctrl == ALL_ONES {
        return v(
            Health::LinkDown,
            false,
            "BAR reads all-ones: the device is off the bus".into(),
        );
    }
    let state = mhi_state(status);
    let ee = r.execenv.filter(|e| *e != ALL_ONES);
    let ee_name = ee.map_or("unreadable", ee_name);
    let what = format!(
        "MHI state {}, SYSERR {}, READY {}, MHICTRL.RESET {}, EE {}",
        mhi_state_name(state),
        (status & MHISTATUS_SYSERR != 0) as u8,
        (status & MHISTATUS_READY != 0) as u8,
        (ctrl & MHICTRL_RESET != 0) as u8,
        ee_name
    );
    if status & MHISTATUS_SYSERR != 0 || state == MHI_STATE_SYS_ERR {
        return v(Health::Syserr, false, what);
    }
    let ready = status & MHISTATUS_READY != 0;
    if ctrl & MHICTRL_RESET != 0 || ee.is_none_or(ee_name_is_invalid) {
        return v(Health::NotReady, false, what);
    }
    let ee = ee.expect("checked above");
    match family {
        Family::Wlan => {
            let expected = ee == EE_PBL && (state == MHI_STATE_RESET || state == MHI_STATE_READY);
            v(Health::Healthy, expected, what)
        }
        Family::Modem => {
            if !ready && state < MHI_STATE_READY {
                return v(Health::NotReady, false, what);
            }
            let expected = state == MHI_STATE_READY
                && [EE_PBL, EE_SBL, EE_AMSS, EE_EDL, EE_PTHRU].contains(&ee);
            v(Health::Healthy, expected, what)
        }
    }
}

fn ee_name_is_invalid(ee: u32) -> bool {
    ee_name(ee) == "INVALID"
}

/// How long verification waits for the device to settle, polling every 25 ms like the MHI host.
pub const fn settle_window(family: Family) -> Duration {
    match family {
        Family::Wlan => Duration::from_millis(1000),
        // SDX65's MHI config times out READY after 8 s.
        Family::Modem => Duration::from_millis(8000),
    }
}
pub const SETTLE_POLL: Duration = Duration::from_millis(25);

/// After a reset: polls until healthy or the settle window ends; link-down and syserr verdicts
/// are also re-polled because the firmware may still be coming up.
pub fn verify(
    family: Family,
    config_ids: &mut dyn FnMut() -> (u16, u16),
    io: &mut dyn RegisterIo,
    bar_len: u64,
) -> Verdict {
    let polls = settle_window(family).as_millis() / SETTLE_POLL.as_millis();
    let mut last = None;
    for i in 0..=polls {
        let (vendor, device) = config_ids();
        let verdict = judge(family, &read_registers(vendor, device, io, bar_len));
        if verdict.health == Health::Healthy {
            return verdict;
        }
        last = Some(verdict);
        if i < polls {
            io.delay(SETTLE_POLL);
        }
    }
    last.expect("at least one poll")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(status: u32, ctrl: u32, ee: u32) -> Registers {
        Registers {
            config_vendor: 0x17cb,
            config_device: 0x1103,
            mhictrl: Some(ctrl),
            mhistatus: Some(status),
            bhioff: Some(0x100),
            execenv: Some(ee),
        }
    }

    #[test]
    fn all_ones_is_link_down_never_bits() {
        let v = judge(Family::Wlan, &regs(ALL_ONES, ALL_ONES, ALL_ONES));
        assert_eq!(v.health, Health::LinkDown);
        let mut r = regs(0, 0, 0);
        r.config_vendor = 0xffff;
        assert_eq!(judge(Family::Modem, &r).health, Health::LinkDown);
    }

    #[test]
    fn decodes_each_verdict() {
        assert_eq!(
            judge(Family::Wlan, &regs(MHISTATUS_SYSERR, 0, EE_PBL)).health,
            Health::Syserr
        );
        assert_eq!(
            judge(Family::Wlan, &regs(0xff00, 0, EE_WFW)).health,
            Health::Syserr
        );
        assert_eq!(
            judge(Family::Wlan, &regs(0, MHICTRL_RESET, EE_PBL)).health,
            Health::NotReady
        );
        let ok = judge(Family::Wlan, &regs(0x0101, 0, EE_PBL));
        assert_eq!((ok.health, ok.in_expected_state), (Health::Healthy, true));
        let mission = judge(Family::Wlan, &regs(0x0201, 0, EE_WFW));
        assert_eq!(
            (mission.health, mission.in_expected_state),
            (Health::Healthy, false)
        );
        assert_eq!(
            judge(Family::Modem, &regs(0, 0, EE_PBL)).health,
            Health::NotReady
        );
        let m = judge(Family::Modem, &regs(0x0101, 0, EE_SBL));
        assert_eq!((m.health, m.in_expected_state), (Health::Healthy, true));
        assert_eq!(
            judge(Family::Modem, &regs(0x0101, 0, 0x42)).health,
            Health::NotReady
        );
    }
}
