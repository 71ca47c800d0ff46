//! Health verdicts from config space and the MHI registers. An all-ones read means the link is
//! down and is never decoded as bits (all-ones would otherwise read as RESET+READY+SYSERR).
use std::time::Duration;

use serde::Serialize;

use crate::device::Family;
use crate::device::regio::RegisterIo;
use crate::device::regs::*;
use crate::device::sequence;

/// Whether the next owner can use the card, not merely whether it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// The family's post-reset state: the next owner can bring the firmware up from scratch.
    Clean,
    /// A previous owner's firmware session still runs (MHI M0-M3 or a mission-mode EE with no
    /// host driver bound): alive, but the next owner's driver cannot take it over.
    Stale,
    /// The firmware crashed: SYSERR, MHI state SYS_ERR or EE RDDM (ramdump).
    Crashed,
    /// Alive and without error, but MHI is still in reset, or not READY, or the EE is unreadable.
    NotReady,
    /// Config space or the BAR reads all-ones: the device is off the bus.
    LinkDown,
    /// Config space answers with other IDs than the target's (0x0000 included).
    WrongIdentity,
}

impl Health {
    /// The health's name, as journals and metrics write it.
    pub const fn name(self) -> &'static str {
        match self {
            Health::Clean => "clean",
            Health::Stale => "stale",
            Health::Crashed => "crashed",
            Health::NotReady => "not-ready",
            Health::LinkDown => "link-down",
            Health::WrongIdentity => "wrong-identity",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Raw values behind a verdict; `None` where the register was not read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Registers {
    /// The vendor ID config space answered with.
    pub config_vendor: u16,
    /// The device ID config space answered with.
    pub config_device: u16,
    /// MHICTRL.
    pub mhictrl: Option<u32>,
    /// MHISTATUS.
    pub mhistatus: Option<u32>,
    /// BHIOFF.
    pub bhioff: Option<u32>,
    /// BHI EXECENV.
    pub execenv: Option<u32>,
}

/// A card's health after a reset (or a look), with what it was judged on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The health.
    pub health: Health,
    /// What `clean` means for this family.
    pub expected: &'static str,
    /// Why, in a sentence.
    pub detail: String,
    /// The registers read.
    pub registers: Registers,
}

/// What the registers are judged against. The engine reads registers only of a device with no
/// host driver bound (vfio-pci or none), so a running session there is always a stale one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The card's family.
    pub family: Family,
    /// The IDs the target had when it was chosen (sysfs).
    pub vendor: u16,
    /// The device ID.
    pub device: u16,
    /// Right after a reset that was seen to take effect (the link dropped), a modem may already
    /// have booted on into AMSS by itself.
    pub after_our_reset: bool,
}

/// What `clean` means for `family`, as a sentence.
pub const fn expected_after_reset(family: Family) -> &'static str {
    family.spec().expected
}

fn bhi_readable(bhioff: u32, bar_len: u64) -> bool {
    bhioff != ALL_ONES && (u64::from(bhioff) + u64::from(BHI_EXECENV) + 4) <= bar_len
}

/// Reads everything a verdict needs; the BAR only when config space answers with the target's
/// vendor (reading unknown offsets of a foreign device is never safe).
pub fn read_registers(
    expect: &Expect,
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
    if (vendor, device) != (expect.vendor, expect.device) {
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

/// A mission-mode execution environment: the firmware proper runs (domain.md §2.1).
fn mission_mode(ee: u32) -> bool {
    matches!(ee, EE_AMSS | EE_WFW | EE_FP)
}

/// MHI M0..M3 (M3_FAST included): a host completed power-up and the session is live.
fn session_state(state: u8) -> bool {
    (MHI_STATE_M0..=MHI_STATE_M3 + 1).contains(&state)
}

/// Judges `r` against `expect`.
pub fn judge(expect: &Expect, r: &Registers) -> Verdict {
    let family = expect.family;
    let v = |health, detail: String| Verdict {
        health,
        expected: expected_after_reset(family),
        detail,
        registers: *r,
    };
    if r.config_vendor == 0xffff {
        return v(
            Health::LinkDown,
            "config space reads all-ones (rev ff): the link is down".into(),
        );
    }
    if (r.config_vendor, r.config_device) != (expect.vendor, expect.device) {
        return v(
            Health::WrongIdentity,
            format!(
                "config space reads {:04x}:{:04x}, expected {:04x}:{:04x}",
                r.config_vendor, r.config_device, expect.vendor, expect.device
            ),
        );
    }
    let (Some(status), Some(ctrl)) = (r.mhistatus, r.mhictrl) else {
        return v(Health::LinkDown, "registers not readable".into());
    };
    if status == ALL_ONES || ctrl == ALL_ONES {
        return v(
            Health::LinkDown,
            "BAR reads all-ones: the device is off the bus".into(),
        );
    }
    let state = mhi_state(status);
    let ee = r.execenv.filter(|e| *e != ALL_ONES);
    let ready = status & MHISTATUS_READY != 0;
    let what = format!(
        "MHI state {}, SYSERR {}, READY {}, MHICTRL.RESET {}, EE {}",
        mhi_state_name(state),
        u8::from(status & MHISTATUS_SYSERR != 0),
        u8::from(ready),
        u8::from(ctrl & MHICTRL_RESET != 0),
        ee.map_or("unreadable", ee_name)
    );
    if status & MHISTATUS_SYSERR != 0 || state == MHI_STATE_SYS_ERR || ee == Some(EE_RDDM) {
        return v(Health::Crashed, what);
    }
    let Some(ee) = ee.filter(|e| !ee_name_is_invalid(*e)) else {
        return v(Health::NotReady, what);
    };
    let amss_after_reset = family == Family::Modem && expect.after_our_reset && ee == EE_AMSS;
    if session_state(state) || (mission_mode(ee) && !amss_after_reset) {
        return v(
            Health::Stale,
            format!("{what}: a previous owner's firmware session still runs"),
        );
    }
    if ctrl & MHICTRL_RESET != 0 {
        return v(Health::NotReady, what);
    }
    let clean = (family.spec().is_clean)(ready, state, ee);
    v(
        if clean {
            Health::Clean
        } else {
            Health::NotReady
        },
        what,
    )
}

fn ee_name_is_invalid(ee: u32) -> bool {
    ee_name(ee) == "INVALID"
}

/// The verification's schedule in words, for the real run's log and the dry run's plan alike:
/// the reads [`crate::device::sequence::poll`] makes.
pub fn verify_schedule(family: Family) -> String {
    use crate::device::sequence::{QUICK_POLL, QUICK_WINDOW};
    format!(
        "a read every {} ms for {} ms, then every {} ms, up to {} ms",
        QUICK_POLL.as_millis(),
        QUICK_WINDOW.as_millis(),
        SETTLE_POLL.as_millis(),
        settle_window(family).as_millis()
    )
}

/// How long verification waits for the device to settle; after the first 100 ms it polls
/// every 25 ms like the MHI host.
pub const fn settle_window(family: Family) -> Duration {
    family.spec().settle_window
}
/// How often verification polls after its first 100 ms.
pub const SETTLE_POLL: Duration = Duration::from_millis(25);

/// What verification reads: the BAR, and the IDs config space answers with (all-ones: the
/// card is off the bus).
pub trait Card: RegisterIo {
    /// The IDs config space answers with (all-ones: off the bus).
    fn config_ids(&mut self) -> (u16, u16);
}

impl<I: Card> Card for crate::device::regio::Recorder<I> {
    fn config_ids(&mut self) -> (u16, u16) {
        self.inner.config_ids()
    }
}

/// A BAR whose config space always answers with the same IDs (benchmarks, unit tests).
pub struct FixedIds<I>(pub I, pub (u16, u16));

impl<I: RegisterIo> RegisterIo for FixedIds<I> {
    fn read32(&mut self, offset: u32) -> u32 {
        self.0.read32(offset)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        self.0.write32(offset, value);
    }
    fn delay(&mut self, d: Duration) {
        self.0.delay(d);
    }
}

impl<I: RegisterIo> Card for FixedIds<I> {
    fn config_ids(&mut self) -> (u16, u16) {
        self.1
    }
}

/// After a reset: polls until clean or the settle window ends; every other verdict is re-polled
/// because the firmware may still be coming up ([`sequence::poll`]'s schedule: every ms at
/// first, then the MHI host's 25 ms).
pub fn verify(expect: &Expect, card: &mut dyn Card, bar_len: u64) -> Verdict {
    let mut last = None;
    sequence::poll(
        card,
        SETTLE_POLL,
        settle_window(expect.family),
        &mut |card| {
            let (vendor, device) = card.config_ids();
            let verdict = judge(
                expect,
                &read_registers(expect, vendor, device, card, bar_len),
            );
            let clean = verdict.health == Health::Clean;
            last = Some(verdict);
            clean
        },
    );
    last.expect("at least one poll")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmarks' and tests' card passes every access through and answers with its IDs.
    #[test]
    fn fixed_ids_pass_every_access_through() {
        let mut io = FixedIds(
            crate::device::regio::Recorder::new(crate::device::regio::DryRun {
                assumed: |o| o + 1,
            }),
            (1, 2),
        );
        assert_eq!(io.read32(4), 5);
        io.write32(8, 9);
        io.delay(Duration::from_millis(3));
        assert_eq!(io.config_ids(), (1, 2));
        assert_eq!(
            io.0.ops,
            [
                crate::device::regio::Op::Read {
                    offset: 4,
                    value: 5
                },
                crate::device::regio::Op::Write {
                    offset: 8,
                    value: 9
                },
                crate::device::regio::Op::Delay { ms: 3 },
            ]
        );
    }

    const WLAN: Expect = Expect {
        family: Family::Wlan,
        vendor: 0x17cb,
        device: 0x1103,
        after_our_reset: false,
    };
    const MODEM: Expect = Expect {
        family: Family::Modem,
        vendor: 0x17cb,
        device: 0x0308,
        after_our_reset: false,
    };

    fn regs(e: &Expect, status: u32, ctrl: u32, ee: u32) -> Registers {
        Registers {
            config_vendor: e.vendor,
            config_device: e.device,
            mhictrl: Some(ctrl),
            mhistatus: Some(status),
            bhioff: Some(0x100),
            execenv: Some(ee),
        }
    }

    fn health(e: &Expect, status: u32, ctrl: u32, ee: u32) -> Health {
        judge(e, &regs(e, status, ctrl, ee)).health
    }

    fn st(state: u8, bits: u32) -> u32 {
        u32::from(state) << 8 | bits
    }

    #[test]
    fn all_ones_is_link_down_never_bits() {
        assert_eq!(
            health(&WLAN, ALL_ONES, ALL_ONES, ALL_ONES),
            Health::LinkDown
        );
        assert_eq!(health(&WLAN, ALL_ONES, 0, EE_PBL), Health::LinkDown);
        assert_eq!(health(&WLAN, 0, ALL_ONES, EE_PBL), Health::LinkDown);
        let mut r = regs(&MODEM, 0, 0, 0);
        r.config_vendor = 0xffff;
        assert_eq!(judge(&MODEM, &r).health, Health::LinkDown);
        r.config_vendor = MODEM.vendor;
        r.mhistatus = None;
        assert_eq!(judge(&MODEM, &r).health, Health::LinkDown);
    }

    #[test]
    fn other_ids_are_wrong_identity_and_not_read() {
        for (v, d) in [(0x0000, 0x0000), (0x17cb, 0x1107), (0x8086, 0x1103)] {
            let mut r = regs(&WLAN, st(1, 1), 0, EE_PBL);
            (r.config_vendor, r.config_device) = (v, d);
            let verdict = judge(&WLAN, &r);
            assert_eq!(verdict.health, Health::WrongIdentity, "{v:04x}:{d:04x}");
            assert!(
                verdict.detail.contains("expected 17cb:1103"),
                "{}",
                verdict.detail
            );
        }
        let mut io = crate::device::regio::DryRun {
            assumed: |_| panic!("a foreign device's BAR must not be read"),
        };
        let r = read_registers(&WLAN, 0x0000, 0x0000, &mut io, 0x1000);
        assert_eq!(r.mhistatus, None);
    }

    #[test]
    fn wlan_clean_only_in_pbl_with_reset_or_ready() {
        assert_eq!(health(&WLAN, st(0, 0), 0, EE_PBL), Health::Clean);
        assert_eq!(health(&WLAN, st(1, 1), 0, EE_PBL), Health::Clean);
        assert_eq!(health(&WLAN, st(1, 1), 0, EE_SBL), Health::NotReady);
        assert_eq!(health(&WLAN, st(7, 0), 0, EE_PBL), Health::NotReady, "BHI");
        assert_eq!(
            health(&WLAN, st(0, 0), MHICTRL_RESET, EE_PBL),
            Health::NotReady
        );
        assert_eq!(
            health(&WLAN, st(0, 0), 0, 0x42),
            Health::NotReady,
            "invalid EE"
        );
        // An EE outside the known ones means the registers are not to be trusted yet, even
        // with an MHI state that would otherwise say a session runs.
        assert_eq!(
            health(&WLAN, st(2, 1), 0, 0x42),
            Health::NotReady,
            "M0, invalid EE"
        );
        let mut r = regs(&WLAN, st(0, 0), 0, EE_PBL);
        r.execenv = None;
        assert_eq!(judge(&WLAN, &r).health, Health::NotReady, "EE unreadable");
    }

    #[test]
    fn a_running_session_is_stale_not_clean() {
        for state in 2..=6 {
            assert_eq!(
                health(&WLAN, st(state, 1), 0, EE_WFW),
                Health::Stale,
                "M{}",
                state - 2
            );
            assert_eq!(health(&MODEM, st(state, 1), 0, EE_AMSS), Health::Stale);
        }
        // Mission mode in READY: the firmware proper runs, nobody owns it.
        assert_eq!(health(&WLAN, st(1, 1), 0, EE_WFW), Health::Stale);
        assert_eq!(health(&WLAN, st(0, 0), 0, EE_FP), Health::Stale);
        assert_eq!(health(&MODEM, st(1, 1), 0, EE_AMSS), Health::Stale);
        let v = judge(&WLAN, &regs(&WLAN, st(2, 1), 0, EE_WFW));
        assert!(
            v.detail.contains("M0") && v.detail.contains("session"),
            "{}",
            v.detail
        );
    }

    #[test]
    fn a_live_session_in_a_boot_ee_is_stale_too() {
        // M0..M3_FAST are sessions whatever the EE; BHI (7) is a boot loader state.
        for state in [2, 5, 6] {
            assert_eq!(
                health(&WLAN, st(state, 1), 0, EE_PBL),
                Health::Stale,
                "{state}"
            );
            assert_eq!(
                health(&MODEM, st(state, 1), 0, EE_SBL),
                Health::Stale,
                "{state}"
            );
        }
        assert_eq!(health(&WLAN, st(7, 0), 0, EE_PBL), Health::NotReady);
    }

    #[test]
    fn the_ee_is_read_only_inside_the_bar() {
        // BHIOFF 0x100: EXECENV at 0x128..0x12c must fit in the BAR.
        let read = |bar_len: u64| {
            let mut io = crate::device::regio::Recorder::new(crate::device::regio::DryRun {
                assumed: |off| match off {
                    BHIOFF => 0x100,
                    _ => 0,
                },
            });
            read_registers(&WLAN, WLAN.vendor, WLAN.device, &mut io, bar_len).execenv
        };
        assert_eq!(read(0x12c), Some(0), "the last 4 bytes of the BAR");
        assert_eq!(read(0x12b), None, "one byte short");
        let mut io = crate::device::regio::DryRun {
            assumed: |off| if off == BHIOFF { ALL_ONES } else { 0 },
        };
        let r = read_registers(&WLAN, WLAN.vendor, WLAN.device, &mut io, 1 << 20);
        assert_eq!(
            (r.bhioff, r.execenv),
            (Some(ALL_ONES), None),
            "all-ones BHIOFF"
        );
    }

    /// The schedule the log and the dry run state is the poll the test below counts: every
    /// 1 ms for 100 ms, then every 25 ms, for the family's whole window.
    #[test]
    fn the_schedule_in_words_is_the_poll() {
        assert_eq!(
            verify_schedule(Family::Wlan),
            "a read every 1 ms for 100 ms, then every 25 ms, up to 1000 ms"
        );
        assert_eq!(
            verify_schedule(Family::Modem),
            "a read every 1 ms for 100 ms, then every 25 ms, up to 8000 ms"
        );
    }

    /// A device that never becomes clean is polled for exactly the settle window, every ms for
    /// the first 100 ms (101 reads, 0..=100) and then every 25 ms (36 reads, 125..=1000): 137
    /// reads of WLAN MHISTATUS over 1000 ms, and no wait after the last one.
    #[test]
    fn verification_polls_the_whole_window_and_stops() {
        struct Crashed {
            waited: Duration,
            status_reads: u32,
        }
        impl RegisterIo for Crashed {
            fn read32(&mut self, offset: u32) -> u32 {
                match offset {
                    MHISTATUS => {
                        self.status_reads += 1;
                        MHISTATUS_SYSERR
                    }
                    BHIOFF => 0x100,
                    _ => 0,
                }
            }
            fn write32(&mut self, _: u32, _: u32) {}
            fn delay(&mut self, d: Duration) {
                self.waited += d;
            }
        }
        let mut io = FixedIds(
            Crashed {
                waited: Duration::ZERO,
                status_reads: 0,
            },
            (WLAN.vendor, WLAN.device),
        );
        let v = verify(&WLAN, &mut io, 1 << 20);
        assert_eq!(v.health, Health::Crashed);
        let io = io.0;
        assert_eq!(
            (io.status_reads, io.waited),
            (101 + 36, settle_window(Family::Wlan))
        );
    }

    #[test]
    fn clean_is_spelled_out_per_family() {
        let w = expected_after_reset(Family::Wlan);
        assert!(w.contains("EE PBL") && w.contains("SYSERR clear"), "{w}");
        let m = expected_after_reset(Family::Modem);
        assert!(
            m.contains("MHI state READY") && m.contains("AMSS only"),
            "{m}"
        );
        assert_eq!(judge(&WLAN, &regs(&WLAN, 0, 0, EE_PBL)).expected, w);
    }

    #[test]
    fn crashed_on_syserr_sys_err_state_or_ramdump() {
        assert_eq!(health(&WLAN, MHISTATUS_SYSERR, 0, EE_PBL), Health::Crashed);
        assert_eq!(health(&WLAN, st(0xff, 0), 0, EE_WFW), Health::Crashed);
        assert_eq!(health(&WLAN, st(0, 0), 0, EE_RDDM), Health::Crashed);
        assert_eq!(
            health(&MODEM, st(2, 1 | MHISTATUS_SYSERR), 0, EE_AMSS),
            Health::Crashed
        );
    }

    #[test]
    fn modem_clean_needs_ready_and_amss_only_after_our_reset() {
        for ee in [EE_PBL, EE_SBL, EE_EDL, EE_PTHRU] {
            assert_eq!(
                health(&MODEM, st(1, 1), 0, ee),
                Health::Clean,
                "{}",
                ee_name(ee)
            );
        }
        assert_eq!(health(&MODEM, st(0, 0), 0, EE_PBL), Health::NotReady);
        assert_eq!(
            health(&MODEM, st(1, 0), 0, EE_PBL),
            Health::NotReady,
            "READY bit"
        );
        assert_eq!(
            health(&MODEM, st(1, 1), MHICTRL_RESET, EE_PBL),
            Health::NotReady
        );
        let after = Expect {
            after_our_reset: true,
            ..MODEM
        };
        assert_eq!(health(&after, st(1, 1), 0, EE_AMSS), Health::Clean);
        assert_eq!(
            health(&after, st(2, 1), 0, EE_AMSS),
            Health::Stale,
            "M0 never"
        );
        let wlan_after = Expect {
            after_our_reset: true,
            ..WLAN
        };
        assert_eq!(health(&wlan_after, st(1, 1), 0, EE_WFW), Health::Stale);
    }
}
