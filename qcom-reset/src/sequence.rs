//! The reviewed upstream reset sequences (domain.md §2.5: `reset_qualcomm_wlan()` and
//! `reset_qualcomm_modem()` of the v12 PCI quirk), replayed step for step through
//! [`RegisterIo`], with one guard the quirk lacks: nothing is written when the first read is
//! all-ones, because the link is already down and that value written back would be garbage.
//! After it, the sequence is the quirk's to the letter (the deassert is written from the value
//! read before the assert, whatever the flush read returned).
use std::time::Duration;

use serde::Serialize;

use crate::devices::Family;
use crate::io::RegisterIo;
use crate::regs::*;

const MS: fn(u64) -> Duration = Duration::from_millis;
/// The WLAN link-recovery poll: every 20 ms for up to 5 s.
pub const WLAN_LINK_POLL: Duration = Duration::from_millis(20);
pub const WLAN_LINK_TIMEOUT: Duration = Duration::from_millis(5000);
/// The modem needs this long after the SoC reset request (`MHI_POST_RESET_DELAY_MS`).
pub const MODEM_POST_RESET: Duration = Duration::from_millis(2000);

/// Highest register offset (exclusive) each sequence and its verification touch; the BAR must
/// be at least this large.
pub const fn bar_needed(family: Family) -> u64 {
    match family {
        Family::Wlan => PCIE_SOC_GLOBAL_RESET as u64 + 4,
        Family::Modem => 0x200,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every step ran.
    Completed,
    /// The first read was all-ones: nothing was written.
    LinkDownBefore,
    /// WLAN: the link did not come back within 5 s of the global reset (upstream: -ETIMEDOUT).
    LinkTimeout,
}

/// Runs the family's sequence; `step` is called with a short name before each step, for logs.
pub fn run(family: Family, io: &mut dyn RegisterIo, step: &mut dyn FnMut(&str)) -> Outcome {
    match family {
        Family::Wlan => wlan(io, step),
        Family::Modem => modem(io, step),
    }
}

fn wlan(io: &mut dyn RegisterIo, step: &mut dyn FnMut(&str)) -> Outcome {
    step("read PCIE_SOC_GLOBAL_RESET");
    let v = io.read32(PCIE_SOC_GLOBAL_RESET);
    if v == ALL_ONES {
        return Outcome::LinkDownBefore;
    }
    step("assert SoC global reset");
    io.write32(PCIE_SOC_GLOBAL_RESET, v | GLOBAL_RESET_V);
    io.read32(PCIE_SOC_GLOBAL_RESET); // flushes the posted write
    io.delay(MS(10));
    step("deassert SoC global reset");
    io.write32(PCIE_SOC_GLOBAL_RESET, v & !GLOBAL_RESET_V);
    io.read32(PCIE_SOC_GLOBAL_RESET);
    io.delay(MS(10));
    step(&format!(
        "wait for the link to come back (a read every {} ms, up to {} s)",
        WLAN_LINK_POLL.as_millis(),
        WLAN_LINK_TIMEOUT.as_secs()
    ));
    // Reads at 0, 20, ..., 5000 ms: the window is covered to its end, like v12's poll, whose
    // last read comes after the timeout has expired.
    let polls = WLAN_LINK_TIMEOUT.as_millis() / WLAN_LINK_POLL.as_millis() + 1;
    let mut up = false;
    for i in 0..polls {
        if io.read32(PCIE_SOC_GLOBAL_RESET) != ALL_ONES {
            up = true;
            break;
        }
        if i + 1 < polls {
            io.delay(WLAN_LINK_POLL);
        }
    }
    if !up {
        return Outcome::LinkTimeout;
    }
    step("MHI reset (MHICTRL.RESET)");
    io.write32(MHICTRL, MHICTRL_RESET);
    io.read32(MHICTRL);
    io.delay(MS(10));
    Outcome::Completed
}

fn modem(io: &mut dyn RegisterIo, step: &mut dyn FnMut(&str)) -> Outcome {
    step("read MHISTATUS");
    if io.read32(MHISTATUS) == ALL_ONES {
        return Outcome::LinkDownBefore;
    }
    step("request SoC reset (MHI_SOC_RESET_REQ)");
    io.write32(MHI_SOC_RESET_REQ, 1);
    io.read32(MHI_SOC_RESET_REQ); // flushes the posted write (Mani's 2026 fix)
    step(&format!(
        "wait for the modem to reboot ({} s)",
        MODEM_POST_RESET.as_secs()
    ));
    io.delay(MODEM_POST_RESET);
    Outcome::Completed
}
