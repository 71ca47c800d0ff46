//! The reviewed upstream reset sequences (domain.md §2.5: `reset_qualcomm_wlan()` and
//! `reset_qualcomm_modem()` of the v12 PCI quirk), replayed step for step through
//! [`RegisterIo`], with one guard the quirk lacks: nothing is written when the first read is
//! all-ones, because the link is already down and that value written back would be garbage.
//! After it, the sequence is the quirk's to the letter (the deassert is written from the value
//! read before the assert, whatever the flush read returned).
use std::time::Duration;

use serde::Serialize;

use crate::device::Family;
use crate::device::regio::RegisterIo;
use crate::device::regs::*;

const MS: fn(u64) -> Duration = Duration::from_millis;
/// The WLAN link-recovery poll: up to 5 s, every 20 ms after the first [`QUICK_WINDOW`] (v12's
/// cadence).
pub const WLAN_LINK_POLL: Duration = Duration::from_millis(20);
/// How long the WLAN link may take to come back (upstream: 5 s, then -ETIMEDOUT).
pub const WLAN_LINK_TIMEOUT: Duration = Duration::from_millis(5000);

/// Waits start by polling every [`QUICK_POLL`] for this long: the cards come back within it
/// (the WLAN link after tens of ms), and a coarse poll there is pure delay added to every
/// reset. After it, the kernel's own cadence: a card still booting gets no more reads than the
/// quirk or the MHI host would make.
pub const QUICK_WINDOW: Duration = Duration::from_millis(100);
/// The poll interval inside [`QUICK_WINDOW`].
pub const QUICK_POLL: Duration = Duration::from_millis(1);

/// Polls `ready` until it answers true or `timeout` has been waited, reading at 0, 1, ..., 100
/// ms and then every `cadence` up to and including `timeout` (the window is covered to its
/// end, like v12's poll, whose last read comes after the timeout has expired). Time is what
/// `io` waited, so a simulator's virtual clock drives it exactly as a real one.
pub fn poll<I: RegisterIo + ?Sized>(
    io: &mut I,
    cadence: Duration,
    timeout: Duration,
    ready: &mut dyn FnMut(&mut I) -> bool,
) -> bool {
    let mut waited = Duration::ZERO;
    loop {
        if ready(io) {
            return true;
        }
        if waited >= timeout {
            return false;
        }
        let step = if waited < QUICK_WINDOW {
            QUICK_POLL
        } else {
            cadence
        };
        let step = step.min(timeout - waited);
        io.delay(step);
        waited += step;
    }
}
/// The modem needs this long after the SoC reset request (`MHI_POST_RESET_DELAY_MS`).
pub const MODEM_POST_RESET: Duration = Duration::from_millis(2000);

/// Highest register offset (exclusive) each sequence and its verification touch; the BAR must
/// be at least this large.
pub const fn bar_needed(family: Family) -> u64 {
    family.spec().bar_needed
}

/// How a sequence ended.
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
    (family.spec().run)(io, step)
}

pub(super) fn wlan(io: &mut dyn RegisterIo, step: &mut dyn FnMut(&str)) -> Outcome {
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
        "wait for the link to come back (a read every {} ms for {} ms, then every {} ms, up to {} s)",
        QUICK_POLL.as_millis(),
        QUICK_WINDOW.as_millis(),
        WLAN_LINK_POLL.as_millis(),
        WLAN_LINK_TIMEOUT.as_secs()
    ));
    let up = poll(io, WLAN_LINK_POLL, WLAN_LINK_TIMEOUT, &mut |io| {
        io.read32(PCIE_SOC_GLOBAL_RESET) != ALL_ONES
    });
    if !up {
        return Outcome::LinkTimeout;
    }
    step("MHI reset (MHICTRL.RESET)");
    io.write32(MHICTRL, MHICTRL_RESET);
    io.read32(MHICTRL);
    io.delay(MS(10));
    Outcome::Completed
}

pub(super) fn modem(io: &mut dyn RegisterIo, step: &mut dyn FnMut(&str)) -> Outcome {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Records when each read of a wait happened, on the waits' own clock.
    struct Clock {
        now: Duration,
        reads: Vec<u64>,
        delays: Vec<u64>,
    }

    impl RegisterIo for Clock {
        fn read32(&mut self, _: u32) -> u32 {
            self.reads.push(self.now.as_millis() as u64);
            ALL_ONES
        }
        fn write32(&mut self, _: u32, _: u32) {}
        fn delay(&mut self, d: Duration) {
            self.delays.push(d.as_millis() as u64);
            self.now += d;
        }
    }

    fn clock() -> Clock {
        Clock {
            now: Duration::ZERO,
            reads: Vec::new(),
            delays: Vec::new(),
        }
    }

    /// Every ms through the quick window, then the cadence, the last read exactly at the
    /// timeout and no wait after it.
    #[test]
    fn a_wait_reads_every_ms_first_then_at_the_kernels_cadence_to_the_end() {
        let mut io = clock();
        let up = poll(&mut io, WLAN_LINK_POLL, WLAN_LINK_TIMEOUT, &mut |io| {
            io.read32(PCIE_SOC_GLOBAL_RESET) != ALL_ONES
        });
        assert!(!up);
        let want: Vec<u64> = (0..=100).chain((120..=5000).step_by(20)).collect();
        assert_eq!(io.reads, want);
        assert_eq!(io.delays.iter().sum::<u64>(), 5000);
        assert_eq!(
            io.delays.len(),
            io.reads.len() - 1,
            "no wait after the last read"
        );
    }

    /// A timeout that is not a multiple of the cadence still ends with a read at the timeout.
    #[test]
    fn the_last_step_is_shortened_to_end_at_the_timeout() {
        let mut io = clock();
        poll(
            &mut io,
            Duration::from_millis(25),
            Duration::from_millis(160),
            &mut |io| io.read32(0) != ALL_ONES,
        );
        assert_eq!(&io.reads[100..], [100, 125, 150, 160]);
    }

    /// A card that answers stops the wait at once: the first read that sees it is the last.
    #[test]
    fn a_wait_ends_at_the_first_read_that_sees_the_card() {
        let mut io = clock();
        let mut n = 0;
        let up = poll(&mut io, WLAN_LINK_POLL, WLAN_LINK_TIMEOUT, &mut |io| {
            io.read32(0);
            n += 1;
            n == 38
        });
        assert!(up);
        assert_eq!(io.reads.last(), Some(&37));
        assert_eq!(io.now, Duration::from_millis(37));
    }
}
