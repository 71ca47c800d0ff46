//! The reset engine against the firmware simulator and a host tree of our own: golden operation
//! traces, every fault's verdict with PCI_COMMAND and power control restored, and the refusals.
mod common;

use common::*;
use qcom_reset::Error;
use qcom_reset::access::Backend as _;
use qcom_reset::device::Family;
use qcom_reset::device::regio::Op::{self, Delay, Read, Write};
use qcom_reset::device::regs::ALL_ONES;
use qcom_reset::device::sequence::Outcome;
use qcom_reset::device::verdict::Health;
use qcom_reset::host::lock::DeviceLock;
use qcom_reset::session::{self, Method, Request};
use qcom_reset::sim::{Faults, SimState};

const WLAN: &str = "0000:03:00.0";
const OTHER: u32 = qcom_reset::sim::model::GLOBAL_RESET_OTHER_BITS;
const MODEM: &str = "0000:04:00.0";

fn wlan_host() -> FakeHost {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    h
}

fn modem_host() -> FakeHost {
    let h = FakeHost::new();
    h.add(FakeDevice::modem(MODEM));
    h
}

fn writes(sim: &qcom_reset::sim::SimDevice) -> usize {
    sim.with_model(|m| m.writes.len())
}

/// Every path ends with PCI_COMMAND back at its saved value and power/control back at "auto".
fn assert_restored(h: &FakeHost, bdf: &str, sim: &qcom_reset::sim::SimDevice, r: &session::Report) {
    assert_eq!(
        h.read(bdf, "power/control"),
        "auto",
        "power/control restored"
    );
    assert_eq!(
        r.reset().unwrap().restored.power_control.as_deref(),
        Some("auto")
    );
    assert!(
        r.reset().unwrap().restored.errors.is_empty(),
        "{:?}",
        r.reset().unwrap().restored.errors
    );
    if r.reset().unwrap().restored.command.is_some() {
        assert_eq!(r.reset().unwrap().restored.command, Some(0x0400));
        // A device that is off the bus drops config writes; the restore was still issued.
        if sim.link_up_now() {
            assert_eq!(
                sim.with_model(|m| m.cfg.command()),
                0x0400,
                "device PCI_COMMAND restored"
            );
        }
    }
    if sim.link_up_now() {
        // After a function reset every register is back as the kernel had it (BARs, MPS in
        // Device Control, Link Control 2, ...), not only those that read 0.
        let (now, fresh) = sim.with_model(|m| {
            let fresh = qcom_reset::sim::Model::new(
                m.family,
                m.vendor,
                m.device,
                SimState::Mission,
                Faults::default(),
            );
            (m.cfg.words().to_vec(), fresh.cfg.words().to_vec())
        });
        assert_eq!(now, fresh, "config space restored as the kernel left it");
    }
    assert!(
        !h.host.run_dir.join(format!("{bdf}.json")).exists(),
        "the crash record is removed after post"
    );
}

/// Clean (the family's post-reset state), one SoC reset in the reviewed order, state restored.
fn assert_healthy_after_one_conformant_reset(
    h: &FakeHost,
    bdf: &str,
    sim: &qcom_reset::sim::SimDevice,
    r: &session::Report,
) {
    let v = r.verdict().unwrap();
    assert_eq!(v.health, Health::Clean, "{}", v.detail);
    assert_eq!(sim.with_model(|m| m.resets), 1);
    assert!(sim.with_model(qcom_reset::sim::Model::conformance).ok);
    assert_restored(h, bdf, sim, r);
}

#[test]
fn wlan_golden_trace_and_healthy_verdict() {
    let h = wlan_host();
    let sim = sim(Family::Wlan, Faults::default());
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &sim).unwrap();
    let mut golden: Vec<Op> = vec![
        // 0x3008 reads with another bit set: the assert keeps it (v | 1)...
        Read {
            offset: 0x3008,
            value: OTHER,
        },
        Write {
            offset: 0x3008,
            value: OTHER | 1,
        },
        Read {
            offset: 0x3008,
            value: OTHER | 1,
        },
        Delay { ms: 10 },
        // ...and so does the deassert (v & ~1).
        Write {
            offset: 0x3008,
            value: OTHER,
        },
        Read {
            offset: 0x3008,
            value: ALL_ONES,
        },
        Delay { ms: 10 },
    ];
    // The link poll: every ms while the link is down (the simulator's 40 ms from the
    // deassert, 10 of them the mandated wait above), then the read that finds it back...
    for _ in 0..30 {
        golden.extend([
            Read {
                offset: 0x3008,
                value: ALL_ONES,
            },
            Delay { ms: 1 },
        ]);
    }
    golden.extend([
        Read {
            offset: 0x3008,
            value: OTHER,
        },
        // ...and the MHI reset.
        Write {
            offset: 0x38,
            value: 2,
        },
        Read {
            offset: 0x38,
            value: 2,
        },
        Delay { ms: 10 },
    ]);
    assert_eq!(r.ops, golden);
    assert_eq!(
        (r.method(), r.outcome(), r.sequence_version),
        (
            Method::RegisterSequence,
            Some(Outcome::Completed),
            "wlan-soc-global-reset/v12"
        )
    );
    assert_healthy_after_one_conformant_reset(&h, WLAN, &sim, &r);
    assert_eq!(
        r.verdict().unwrap().registers.execenv,
        Some(0),
        "rebooted into PBL"
    );
}

#[test]
fn modem_golden_trace_and_healthy_verdict() {
    let h = modem_host();
    let sim = sim(Family::Modem, Faults::default());
    let r = reset_with(&h, &Request::new(bdf(MODEM)), &sim).unwrap();
    assert_eq!(
        r.ops,
        vec![
            // MHISTATUS of the crashed modem: SYS_ERR with SYSERR set.
            Read {
                offset: 0x48,
                value: 0xff04
            },
            Write {
                offset: 0xb0,
                value: 1
            },
            Read {
                offset: 0xb0,
                value: ALL_ONES
            },
            Delay { ms: 2000 },
        ]
    );
    assert_healthy_after_one_conformant_reset(&h, MODEM, &sim, &r);
}

/// (family, fault, expected outcome, expected verdict, register writes the device received)
#[test]
fn every_fault_ends_in_the_right_verdict_with_state_restored() {
    #[rustfmt::skip]
    let cases: &[(Family, &str, Option<Outcome>, Health, usize)] = &[
        (Family::Wlan, "stuck-syserr", Some(Outcome::Completed), Health::Crashed, 3),
        (Family::Wlan, "link-down-ms=8000", Some(Outcome::LinkTimeout), Health::LinkDown, 2),
        (Family::Wlan, "link-down-ms=4000", Some(Outcome::Completed), Health::Clean, 3),
        // The link poll covers the whole 5 s window: back at 4995 ms after the deassert (the
        // poll starts 10 ms after it) still completes; at 5015 ms it is too late, the MHI reset
        // is never sent and the SYSERR latched across the global reset stays: crashed.
        (Family::Wlan, "link-down-ms=4995", Some(Outcome::Completed), Health::Clean, 3),
        (Family::Wlan, "link-down-ms=5015", Some(Outcome::LinkTimeout), Health::Crashed, 2),
        (Family::Wlan, "never-returns", Some(Outcome::LinkTimeout), Health::LinkDown, 2),
        (Family::Wlan, "vanish-after-writes=1", Some(Outcome::LinkTimeout), Health::LinkDown, 1),
        (Family::Wlan, "config-all-ones", None, Health::LinkDown, 0),
        (Family::Wlan, "writes-ignored", Some(Outcome::Completed), Health::Crashed, 3),
        (Family::Wlan, "slow-ready-ms=500", Some(Outcome::Completed), Health::Clean, 3),
        // A qcom-reset killed between assert and deassert: the next run reads bit 0 set and
        // must keep it (v | 1), then deassert.
        (Family::Wlan, "reset-asserted", Some(Outcome::Completed), Health::Clean, 3),
        (Family::Modem, "never-returns", Some(Outcome::Completed), Health::LinkDown, 1),
        (Family::Modem, "stuck-syserr", Some(Outcome::Completed), Health::Crashed, 1),
        (Family::Modem, "slow-ready-ms=3000", Some(Outcome::Completed), Health::Clean, 1),
        (Family::Modem, "slow-ready-ms=12000", Some(Outcome::Completed), Health::NotReady, 1),
        (Family::Modem, "link-down-ms=5000", Some(Outcome::Completed), Health::Clean, 1),
        (Family::Modem, "config-all-ones", None, Health::LinkDown, 0),
        // READY in AMSS right after a reset that dropped the link: it rebooted, so clean.
        (Family::Modem, "boots-to-amss", Some(Outcome::Completed), Health::Clean, 1),
    ];
    for &(family, spec, outcome, health, n_writes) in cases {
        let faults = Faults::parse(spec).unwrap();
        let (h, b) = match family {
            Family::Wlan => (wlan_host(), WLAN),
            Family::Modem => (modem_host(), MODEM),
        };
        let sim = sim(family, faults);
        let r = reset_with(&h, &Request::new(bdf(b)), &sim).unwrap();
        let v = r.verdict().unwrap();
        assert_eq!(
            (r.outcome(), v.health),
            (outcome, health),
            "{family:?} {spec}: {}",
            v.detail
        );
        assert_eq!(writes(&sim), n_writes, "{family:?} {spec}");
        if health == Health::Clean {
            let c = sim.with_model(qcom_reset::sim::Model::conformance);
            assert!(c.ok, "{family:?} {spec}: {:?}", c.problems);
        }
        assert_restored(&h, b, &sim, &r);
        if health == Health::LinkDown {
            let regs = v.registers;
            assert!(
                regs.mhistatus.is_none_or(|s| s == ALL_ONES),
                "link-down keeps raw all-ones, never decoded"
            );
            if outcome.is_none() {
                assert_eq!(
                    (regs.config_vendor, regs.config_device),
                    (0xffff, 0xffff),
                    "the raw config IDs of a dead link are reported"
                );
            }
        }
    }
}

/// From every state a previous owner can leave, one reviewed reset ends clean; a reset whose
/// writes are lost leaves that state as it was, and is never called clean.
#[test]
fn every_left_state_is_reset_to_clean_and_lost_writes_are_not_clean() {
    #[rustfmt::skip]
    let cases: &[(Family, SimState, Health)] = &[
        (Family::Wlan, SimState::Mission, Health::Stale),
        (Family::Wlan, SimState::Crashed, Health::Crashed),
        (Family::Wlan, SimState::Stuck, Health::Stale),
        (Family::Modem, SimState::Mission, Health::Stale),
        (Family::Modem, SimState::Crashed, Health::Crashed),
        (Family::Modem, SimState::Stuck, Health::Stale),
    ];
    for &(family, state, deaf_health) in cases {
        let (h, b) = match family {
            Family::Wlan => (wlan_host(), WLAN),
            Family::Modem => (modem_host(), MODEM),
        };
        let card = sim_in(family, state, Faults::default());
        let before = session::status(
            &h.host,
            session::inspect(&h.host, bdf(b), None, None).unwrap(),
            &mut |_, _| Ok(Box::new(card.clone())),
            session::ReadMode::EnableAndRestore,
        )
        .unwrap();
        assert_eq!(
            before.verdict().unwrap().health,
            deaf_health,
            "{family:?} {state:?} before"
        );
        let r = reset_with(&h, &Request::new(bdf(b)), &card).unwrap();
        assert_healthy_after_one_conformant_reset(&h, b, &card, &r);
        let deaf = sim_in(
            family,
            state,
            Faults {
                writes_ignored: true,
                ..Default::default()
            },
        );
        let r = reset_with(&h, &Request::new(bdf(b)), &deaf).unwrap();
        assert_eq!(
            r.verdict().unwrap().health,
            deaf_health,
            "{family:?} {state:?} with lost writes"
        );
    }
}

#[test]
fn held_device_is_never_written() {
    let h = wlan_host();
    h.hold(4242, "qemu-system-x86", "/dev/vfio/12");
    let sim = sim(Family::Wlan, Faults::default());
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &sim).unwrap_err();
    assert!(matches!(e, Error::Held { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("pid 4242 (qemu-system-x86) through /dev/vfio/12"),
        "{e}"
    );
    let mut forced = Request::new(bdf(WLAN));
    forced.force = true;
    assert!(
        matches!(reset_with(&h, &forced, &sim), Err(Error::Held { .. })),
        "--force never overrides a holder"
    );
    assert_eq!(writes(&sim), 0);
    assert_eq!(
        sim.with_model(|m| m.cfg.command()),
        0x0400,
        "config untouched"
    );
    assert_eq!(h.read(WLAN, "power/control"), "auto");
}

#[test]
fn refuses_non_targets_missing_devices_and_foreign_drivers() {
    let h = FakeHost::new();
    h.add(FakeDevice::foreign("0000:05:00.0"));
    h.add(FakeDevice {
        bdf: WLAN,
        driver: Some("ath11k_pci"),
        ..Default::default()
    });
    let sim = sim(Family::Wlan, Faults::default());
    let e = reset_with(&h, &Request::new(bdf("0000:05:00.0")), &sim).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotTarget {
                vendor: 0x8086,
                device: 0x1533
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("--profile"));
    let e = reset_with(&h, &Request::new(bdf("0000:09:00.0")), &sim).unwrap_err();
    assert!(matches!(e, Error::NoSuchDevice(..)), "{e}");
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &sim).unwrap_err();
    assert!(
        matches!(e, Error::WrongDriver { .. }) && e.to_string().contains("ath11k_pci"),
        "{e}"
    );
    assert_eq!(writes(&sim), 0);
    let mut forced = Request::new(bdf(WLAN));
    forced.force = true;
    let r = reset_with(&h, &forced, &sim).unwrap();
    assert_eq!(r.verdict().unwrap().health, Health::Clean);
    let mut bad = Request::new(bdf(WLAN));
    bad.profile = Some("nosuch".into());
    assert!(matches!(
        reset_with(&h, &bad, &sim),
        Err(Error::UnknownProfile(_))
    ));
}

#[test]
fn profile_override_makes_any_device_a_target_with_its_bar() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        bdf: "0000:00:03.0",
        vendor: 0x1af4,
        device: 0x1110,
        group: Some("3"),
        ..Default::default()
    });
    // The config space of the device itself: the simulated firmware answers with its IDs.
    let card = |vendor, device| {
        qcom_reset::sim::SimDevice::new(qcom_reset::sim::Model::new(
            Family::Modem,
            vendor,
            device,
            SimState::Mission,
            Faults::default(),
        ))
    };
    let mut req = Request::new(bdf("0000:00:03.0"));
    req.profile = Some("sdx65".into());
    req.bar = Some(2);
    let r = reset_with(&h, &req, &card(0x1af4, 0x1110)).unwrap();
    assert_eq!((r.profile, r.family), ("sdx65", Family::Modem));
    assert_eq!(r.verdict().unwrap().health, Health::Clean);
    // A device that answers with other IDs than sysfs showed is never judged clean, nor
    // are its registers read for a verdict.
    let r = reset_with(&h, &req, &card(0x17cb, 0x0308)).unwrap();
    let v = r.verdict().unwrap();
    assert_eq!(v.health, Health::WrongIdentity, "{}", v.detail);
    assert_eq!(v.registers.mhistatus, None);
}

#[test]
fn dry_run_prints_every_operation_and_touches_nothing() {
    let h = wlan_host();
    let sim = sim(Family::Wlan, Faults::default());
    let mut req = Request::new(bdf(WLAN));
    req.dry_run = true;
    let r = reset_with(&h, &req, &sim).unwrap();
    assert_eq!(r.method(), Method::DryRun);
    assert_eq!(writes(&sim), 0);
    assert_eq!(
        sim.elapsed().as_micros(),
        0,
        "no delay was taken on the device clock"
    );
    assert_eq!(sim.with_model(|m| m.cfg.command()), 0x0400);
    assert_eq!(h.read(WLAN, "power/control"), "auto");
    assert!(
        !h.host.run_dir.join(format!("{WLAN}.lock")).exists(),
        "no lock file created"
    );
    // The plan follows a healthy device: 0x3008 reads 0, the link is back at once.
    assert_eq!(
        r.ops.first(),
        Some(&Read {
            offset: 0x3008,
            value: 0
        })
    );
    let plan: Vec<String> = r.plan().iter().map(ToString::to_string).collect();
    let plan = plan.join("\n");
    for want in [
        "sysfs power/control <- on",
        "PCI_COMMAND <- saved | MEMORY",
        "write 0x3008 <- 0x00000001",
        "delay 10 ms",
        "write 0x3008 <- 0x00000000",
        "write 0x0038 <- 0x00000002",
        "PCI_COMMAND <- saved",
        "sysfs power/control <- auto",
    ] {
        assert!(plan.contains(want), "plan lacks {want:?}:\n{plan}");
    }
}

#[test]
fn a_busy_device_lock_is_respected() {
    let h = wlan_host();
    let _held = DeviceLock::acquire(&h.host.run_dir, bdf(WLAN), std::time::Duration::ZERO).unwrap();
    let sim = sim(Family::Wlan, Faults::default());
    assert!(matches!(
        reset_with(&h, &Request::new(bdf(WLAN)), &sim),
        Err(Error::Busy { .. })
    ));
    assert_eq!(writes(&sim), 0);
}

#[test]
fn steps_aside_where_the_kernel_has_device_specific() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        reset_method: Some("bus device_specific"),
        ..Default::default()
    });
    let sim = sim(Family::Wlan, Faults::default());
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &sim).unwrap();
    assert_eq!(r.method(), Method::KernelDeviceSpecific);
    assert_eq!(writes(&sim), 0, "no register writes of ours");
    assert!(r.ops.is_empty());
    assert_eq!(
        h.read(WLAN, "reset"),
        "1",
        "the kernel's reset was triggered"
    );
    assert_eq!(
        h.read(WLAN, "reset_method"),
        "bus device_specific",
        "method order restored"
    );
    assert!(r.verdict().is_some(), "the device is still verified");
    let mut ours = Request::new(bdf(WLAN));
    ours.ignore_kernel_reset = true;
    let r = reset_with(&h, &ours, &sim).unwrap();
    assert_eq!(r.method(), Method::RegisterSequence);
}

/// The kernel's device-specific reset can fail (the WLAN link poll times out when the SoC
/// reset also reset the function: the VM lab's `--kernel devspecific` saw -ETIMEDOUT after 5 s):
/// the card is then as the kernel restored it, and qcom-reset's own sequence resets it.
#[test]
fn a_failed_kernel_reset_falls_back_to_our_sequence() {
    let h = FakeHost::new();
    let dev = h.add(FakeDevice {
        reset_method: Some("device_specific"),
        ..Default::default()
    });
    // A `reset` that cannot be written stands for the kernel's reset failing.
    std::fs::remove_file(dev.join("reset")).unwrap();
    std::fs::create_dir(dev.join("reset")).unwrap();
    let sim = sim(Family::Wlan, Faults::default());
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &sim).unwrap();
    assert_eq!(r.method(), Method::RegisterSequence);
    assert_eq!(sim.with_model(|m| m.resets), 1);
    assert_eq!(
        r.verdict().map(|v| v.health),
        Some(qcom_reset::device::verdict::Health::Clean)
    );
    assert_eq!(h.read(WLAN, "reset_method"), "device_specific");
}

#[test]
fn a_device_stuck_outside_d0_is_refused_and_power_restored() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        power_state: "D3hot",
        ..Default::default()
    });
    let sim = sim(Family::Wlan, Faults::default());
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &sim).unwrap_err();
    assert!(matches!(e, Error::NotD0 { .. }), "{e}");
    assert_eq!(h.read(WLAN, "power/control"), "auto");
    assert_eq!(writes(&sim), 0);
}

#[test]
fn status_reads_registers_only_when_safe() {
    let h = wlan_host();
    let sim = sim(Family::Wlan, Faults::default());
    let t = session::inspect(&h.host, bdf(WLAN), None, None).unwrap();
    let s2 = sim.clone();
    let st = session::status(
        &h.host,
        t,
        &mut move |_, _| Ok(Box::new(s2.clone())),
        session::ReadMode::EnableAndRestore,
    )
    .unwrap();
    let v = st.verdict().unwrap();
    assert_eq!(
        v.health,
        Health::Crashed,
        "the stuck simulator reports SYSERR"
    );
    assert_eq!(v.registers.mhistatus, Some(0xff04));
    // A dead link: the raw config IDs are what status reports.
    let dead = sim_in(
        Family::Wlan,
        SimState::Mission,
        Faults::parse("config-all-ones").unwrap(),
    );
    let t = session::inspect(&h.host, bdf(WLAN), None, None).unwrap();
    let st = session::status(
        &h.host,
        t,
        &mut move |_, _| Ok(Box::new(dead.clone())),
        session::ReadMode::EnableAndRestore,
    )
    .unwrap();
    let r = st.verdict().unwrap().registers;
    assert_eq!((r.config_vendor, r.config_device), (0xffff, 0xffff));
    assert_eq!(
        sim.with_model(|m| m.cfg.command()),
        0x0400,
        "PCI_COMMAND restored after reading"
    );
    h.hold(77, "qemu", "/dev/vfio/12");
    let t = session::inspect(&h.host, bdf(WLAN), None, None).unwrap();
    let st = session::status(
        &h.host,
        t,
        &mut |_, _| panic!("must not open a held device"),
        session::ReadMode::EnableAndRestore,
    )
    .unwrap();
    assert!(st.verdict().is_none());
    assert!(
        matches!(&st.unread(), Some(session::Unread::Held(w)) if w.contains("pid 77")),
        "held, typed as such: {:?}",
        st.unread()
    );
    assert_eq!(writes(&sim), 0);
}

/// Observe-only reads nothing it would have to write for: power/control stays, PCI_COMMAND
/// stays, and the reason is said instead.
#[test]
fn a_no_writes_status_says_why_instead_of_writing() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::default());
    let status = |h: &FakeHost| {
        let t = session::inspect(&h.host, bdf(WLAN), None, None).unwrap();
        let c = card.clone();
        session::status(
            &h.host,
            t,
            &mut move |_, _| Ok(Box::new(c.clone())),
            session::ReadMode::NoWrites,
        )
        .unwrap()
    };
    let st = status(&h);
    assert!(st.verdict().is_none());
    assert!(
        matches!(&st.unread(), Some(session::Unread::Refused(w)) if w.contains("power/control=on (it is auto)")),
        "runtime PM may keep it in D3hot: {:?}",
        st.unread()
    );
    assert_eq!(h.read(WLAN, "power/control"), "auto");
    std::fs::write(
        h.root()
            .join("sys/bus/pci/devices")
            .join(WLAN)
            .join("power/control"),
        "on",
    )
    .unwrap();
    let st = status(&h);
    assert!(
        matches!(&st.unread(), Some(session::Unread::Refused(w)) if w.contains("memory decoding (PCI_COMMAND=0x0400)")),
        "vfio-pci leaves decoding off after a release: {:?}",
        st.unread()
    );
    assert_eq!(card.with_model(|m| m.cfg.command()), 0x0400);
    // The next owner (or an admin) enabled decoding: now it can be read without a write.
    qcom_reset::access::Backend::config_write16(&mut card.clone(), 4, 0x0402).unwrap();
    let st = status(&h);
    assert_eq!(st.verdict().unwrap().health, Health::Crashed);
    assert_eq!(
        card.with_model(|m| (m.cfg.command(), m.writes.len())),
        (0x0402, 0)
    );
    assert_eq!(h.read(WLAN, "power/control"), "on");
}

/// The SoC reset drops the link and the endpoint resets its function: PCI_COMMAND and the BARs
/// are repaired as soon as MMIO reads all-ones while config space answers (issue 17 item 10),
/// and at post every saved word goes back like `pci_restore_state` does, registers with
/// non-zero reset values included (item 9: MPS in Device Control, Link Control 2), and the
/// session says what it put back.
#[test]
fn config_words_the_reset_lost_are_restored_and_reported() {
    for (family, h, b) in [
        (Family::Wlan, wlan_host(), WLAN),
        (Family::Modem, modem_host(), MODEM),
    ] {
        let card = sim_in(family, SimState::Mission, Faults::default());
        let r = reset_with(&h, &Request::new(bdf(b)), &card).unwrap();
        assert_eq!(r.verdict().unwrap().health, Health::Clean, "{family:?}");
        let restored = r.reset().unwrap().restored.config.join(", ");
        for word in [
            "0x58: 0x2810 -> 0x2830",
            "0x80: 0x0003 -> 0x0002",
            "0x0c: 0x0000 -> 0x0010",
            "0x3c: 0x0100 -> 0x010b",
        ] {
            assert!(restored.contains(word), "{family:?}: {restored}");
        }
        assert_restored(&h, b, &card, &r);
        assert_eq!(
            card.with_model(|m| m.cfg.read16(0x12)),
            0xfe00,
            "{family:?}"
        );
    }
}

#[test]
fn nothing_is_written_before_the_crash_record_exists() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::default());
    let unrecorded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (c, u, record) = (
        card.clone(),
        unrecorded.clone(),
        h.host.run_dir.join(format!("{WLAN}.json")),
    );
    let r = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| {
            let (u, record) = (u.clone(), record.clone());
            Ok(Box::new(Hooked {
                inner: c.clone(),
                on_config_write: Box::new(move || {
                    if !record.exists() {
                        u.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }),
                on_map: Box::new(|| {}),
            }))
        },
        "record-first",
    )
    .unwrap();
    assert_eq!(r.verdict().unwrap().health, Health::Clean);
    assert_eq!(
        unrecorded.load(std::sync::atomic::Ordering::SeqCst),
        // The record is removed only after the restore: every write is covered, its own too.
        0,
        "a config write went out with no record on disk"
    );
}

/// SIGKILL during a sequence leaves power/control on and memory decoding set; the next session
/// restores what the record says before taking its own baseline.
#[test]
fn a_killed_session_is_recovered_before_the_next_baseline() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::default());
    // What the killed session left: awake, decoding on, and BAR0 lost by its reset.
    leave_killed_session(&h, WLAN, &card, vec![(0x12, 0xfe00)]);
    card.clone().config_write16(0x12, 0).unwrap();
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    let rec = r
        .reset()
        .unwrap()
        .recovered
        .clone()
        .expect("the dead session's record was used");
    assert_eq!(
        (rec.command, rec.power_control.as_deref()),
        (Some(0x0400), Some("auto"))
    );
    assert_eq!(rec.config, ["0x12: 0x0000 -> 0xfe00"]);
    // The new baseline was the recovered state, not what the killed session left.
    assert_eq!(r.reset().unwrap().restored.command, Some(0x0400));
    assert_restored(&h, WLAN, &card, &r);
}

/// Any doubt about ownership fails closed: nothing is written.
#[test]
fn a_vfio_device_whose_group_cannot_be_held_is_not_written() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::default());
    let node = h.host.dev_vfio.join("12");
    std::fs::remove_file(&node).unwrap();
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(
        matches!(e, Error::NotOwned { .. }) && e.to_string().contains("does not exist"),
        "{e}"
    );
    std::fs::create_dir(&node).unwrap();
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(
        matches!(e, Error::NotOwned { .. }) && e.to_string().contains("cannot open"),
        "{e}"
    );
    assert!(
        matches!(
            &e,
            Error::NotOwned { why: qcom_reset::NotOwnable::Open { err, .. }, .. }
                if err.raw_os_error() == Some(libc::EISDIR)
        ),
        "the OS error is kept: {e:?}"
    );
    assert_eq!(writes(&card), 0);
    assert_eq!(card.with_model(|m| m.cfg.command()), 0x0400);
    assert_eq!(h.read(WLAN, "power/control"), "auto");
}

/// The BAR must hold every register the sequence touches; one byte short is refused unwritten.
#[test]
fn a_bar_too_small_for_the_sequence_is_refused() {
    let need = qcom_reset::device::sequence::bar_needed(Family::Wlan);
    assert_eq!(
        need, 0x300c,
        "0x3008 is the last register the WLAN sequence touches"
    );
    let h = wlan_host();
    let short = sim(Family::Wlan, Faults::default()).with_bar_len(need - 4);
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &short).unwrap_err();
    assert!(matches!(e, Error::BarTooSmall { need: 0x300c, .. }), "{e}");
    assert_eq!(writes(&short), 0);
    let exact = sim(Family::Wlan, Faults::default()).with_bar_len(need);
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &exact).unwrap();
    assert_eq!(r.verdict().unwrap().health, Health::Clean);
}

/// Holding the group does not stop an unbind from vfio-pci (libvirt reattaching the host
/// driver): the session notices before its sequence, writes no register, and leaves config
/// space and power to the new driver (issue 17 item 6: no config or power write after it).
#[test]
fn a_device_rebound_during_the_session_is_not_written() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::default());
    let new_driver = h.root().join("sys/bus/pci/drivers/ath11k_pci");
    std::fs::create_dir_all(&new_driver).unwrap();
    let (c, link) = (
        card.clone(),
        h.root()
            .join("sys/bus/pci/devices")
            .join(WLAN)
            .join("driver"),
    );
    let e = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| {
            let (link, new_driver) = (link.clone(), new_driver.clone());
            Ok(Box::new(Hooked {
                inner: c.clone(),
                on_config_write: Box::new(|| {}),
                on_map: Box::new(move || {
                    std::fs::remove_file(&link).unwrap();
                    std::os::unix::fs::symlink(&new_driver, &link).unwrap();
                }),
            }))
        },
        "rebinding",
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Taken { .. }) && e.to_string().contains("taken by driver ath11k_pci"),
        "{e}"
    );
    assert_eq!(writes(&card), 0, "no register written");
    assert_eq!(
        h.read(WLAN, "power/control"),
        "on",
        "power is the new driver's: not written after the handover"
    );
    assert!(
        !h.host.run_dir.join(format!("{WLAN}.json")).exists(),
        "nothing is left to restore for a device its new driver owns"
    );
}

/// What a reset's sequence waited (ms), and the least the card needed (its simulator's floor).
fn waits_and_floor(r: &session::Report, card: &qcom_reset::sim::SimDevice) -> (u64, u64) {
    let waited = r
        .ops
        .iter()
        .map(|o| match o {
            Delay { ms } => *ms,
            _ => 0,
        })
        .sum();
    (
        waited,
        card.with_model(qcom_reset::sim::Model::reset_floor)
            .as_millis() as u64,
    )
}

/// The waits of a clean reset are the card's and nothing more: with the quick poll, the WLAN
/// sequence waits exactly the simulator's floor (the mandated 10 ms steps and the link's own
/// 40 ms down time), where the 20 ms cadence alone waited up to 19 ms more; the modem waits
/// its mandated 2 s. Verification finds the card clean at its first read.
#[test]
fn a_clean_reset_waits_the_cards_floor_and_no_more() {
    for (family, bdf_s) in [(Family::Wlan, WLAN), (Family::Modem, MODEM)] {
        let h = if family == Family::Wlan {
            wlan_host()
        } else {
            modem_host()
        };
        let card = sim(family, Faults::default());
        let r = reset_with(&h, &Request::new(bdf(bdf_s)), &card).unwrap();
        assert_eq!(r.verdict().unwrap().health, Health::Clean);
        let (waited, floor) = waits_and_floor(&r, &card);
        assert_eq!((family, waited), (family, floor));
    }
}

/// A link that stays down past the quick window is found at the kernel's 20 ms cadence: the
/// waits exceed the floor by less than one poll.
#[test]
fn a_slow_link_costs_less_than_one_poll_beyond_the_floor() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::parse("link-down-ms=800").unwrap());
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    assert_eq!(r.verdict().unwrap().health, Health::Clean);
    let (waited, floor) = waits_and_floor(&r, &card);
    assert!(
        (floor..floor + 20).contains(&waited),
        "waited {waited} ms, floor {floor} ms"
    );
}

/// The report's phases account for its duration: they time consecutive stretches from the same
/// start, so they add up to it within its rounding down to the ms.
#[test]
fn the_phases_add_up_to_the_duration() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::default());
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    let p = r.reset().unwrap().phases;
    let sum_ms = (p.own_us + p.guard_us + p.sequence_us + p.verify_us + p.restore_us) / 1000;
    assert!(
        sum_ms <= r.reset().unwrap().duration_ms && r.reset().unwrap().duration_ms <= sum_ms + 1,
        "{p:?} against {} ms",
        r.reset().unwrap().duration_ms
    );
    // The crash record written and removed: file system calls, never a µs or less.
    assert!(p.own_us > 1 && p.restore_us > 1, "{p:?}");
}

/// A link that never comes back: the poll reads at 0, 1, ..., 100 ms after the deassert's 10 ms
/// wait, then at 120, 140, ..., 5000 ms (v12's cadence): 101 + 245 reads, 5 s of waits, and it
/// stops at its last read, with no wait after it.
#[test]
fn the_link_poll_covers_exactly_the_reviewed_window() {
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::parse("never-returns").unwrap());
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    assert_eq!(r.outcome(), Some(Outcome::LinkTimeout));
    // The poll starts after the deassert's read-back and its 10 ms wait.
    let start = r
        .ops
        .iter()
        .position(|o| *o == Delay { ms: 10 })
        .map(|i| {
            r.ops[i + 1..]
                .iter()
                .position(|o| *o == Delay { ms: 10 })
                .unwrap()
                + i
                + 2
        })
        .unwrap();
    let poll = &r.ops[start..];
    let reads = poll.iter().filter(|o| matches!(o, Read { .. })).count();
    let waited: u64 = poll
        .iter()
        .map(|o| match o {
            Delay { ms } => *ms,
            _ => 0,
        })
        .sum();
    assert_eq!((reads, waited), (101 + 245, 5000));
    assert_eq!(
        poll.last(),
        Some(&Read {
            offset: 0x3008,
            value: ALL_ONES
        }),
        "no wait after the last read"
    );
}

/// The modem's dry run assumes a READY modem (MHISTATUS 0x101), so it shows the full sequence.
#[test]
fn the_modem_dry_run_follows_a_ready_modem() {
    let h = modem_host();
    let card = sim(Family::Modem, Faults::default());
    let mut req = Request::new(bdf(MODEM));
    req.dry_run = true;
    let r = reset_with(&h, &req, &card).unwrap();
    assert_eq!(
        r.ops,
        vec![
            Read {
                offset: 0x48,
                value: 0x101
            },
            Write {
                offset: 0xb0,
                value: 1
            },
            Read {
                offset: 0xb0,
                value: 0
            },
            Delay { ms: 2000 },
        ]
    );
    assert_eq!(writes(&card), 0);
}

/// Each step is logged with the BDF and the sequence version (vendor-reset style), pre to post.
#[test]
fn every_step_is_logged_with_bdf_and_sequence_version() {
    // One global subscriber writing into a per-thread buffer: a thread-local subscriber would
    // race the callsite interest cache of the tests running beside this one.
    capture_logs();
    let h = wlan_host();
    let card = sim(Family::Wlan, Faults::default());
    reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    let log = this_threads_log();
    for step in [
        "pre:",
        "pre: wcn6855 (",
        "reset: assert SoC global reset",
        "verify:",
        "verdict: clean",
        "post: BAR unmapped",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(step))
            .unwrap_or_else(|| panic!("no {step:?} line in\n{log}"));
        assert!(
            line.contains("bdf=0000:03:00.0") && line.contains("seq=\"wlan-soc-global-reset/v12\""),
            "{line}"
        );
    }
    // The link drop lost the BARs: the post step says what it wrote back.
    assert!(
        log.contains("post: the link dropped; config restored: ")
            && log.contains("0x0c: 0x0000 -> 0x0010"),
        "{log}"
    );
    assert!(!log.contains("restore failed"), "{log}");
}

#[test]
fn each_regime_is_named_and_explained() {
    use session::Regime;
    let of = |m: &[&str]| {
        Regime::of(Some(
            &m.iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>(),
        ))
    };
    assert_eq!(Regime::of(None), Regime::NoKernelReset);
    assert_eq!(of(&[]), Regime::NoKernelReset);
    assert_eq!(of(&["bus"]), Regime::KernelBusReset);
    assert_eq!(of(&["acpi", "bus"]), Regime::KernelBusReset);
    assert_eq!(
        of(&["device_specific", "bus"]),
        Regime::KernelDeviceSpecific
    );
    assert_eq!(of(&["acpi"]), Regime::KernelOther);
    for (r, name, says) in [
        (
            Regime::KernelBusReset,
            "kernel-bus-reset",
            "does not reset it",
        ),
        (
            Regime::NoKernelReset,
            "no-kernel-reset",
            "qcom-reset is the reset",
        ),
        (
            Regime::KernelDeviceSpecific,
            "kernel-device-specific",
            "only verifies",
        ),
        (
            Regime::KernelOther,
            "kernel-other",
            "resets after each release",
        ),
    ] {
        assert_eq!(r.to_string(), name);
        assert!(r.meaning().contains(says), "{name}: {}", r.meaning());
    }
}

/// Targets: the table's devices plus each configured override with its own profile and BAR;
/// a foreign device without an override is not one.
#[test]
fn targets_are_the_table_plus_the_overrides_each_with_its_profile() {
    let h = wlan_host();
    h.add(FakeDevice {
        bdf: "0000:00:03.0",
        vendor: 0x1af4,
        device: 0x1110,
        group: Some("3"),
        ..Default::default()
    });
    h.add(FakeDevice::foreign("0000:05:00.0"));
    let ts = session::targets(&h.host, &[(bdf("0000:00:03.0"), "sdx65".into(), Some(2))]).unwrap();
    let mut got: Vec<(String, &str, u8)> = ts
        .iter()
        .map(|t| (t.bdf.to_string(), t.profile.name, t.profile.bar))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("0000:00:03.0".to_string(), "sdx65", 2),
            (WLAN.to_string(), "wcn6855", 0)
        ]
    );
}

/// A runtime-suspended device is woken (power/control on) before its BAR is touched, and a
/// device that reaches D0 within the 200 ms wait is reset; one already decoding memory keeps it.
#[test]
fn the_device_is_woken_and_awaited_before_its_bar_is_touched() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        power_state: "D3hot",
        ..Default::default()
    });
    let dev = h.root().join("sys/bus/pci/devices").join(WLAN);
    let to_d0 = dev.join("power_state");
    let waker = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(60));
        std::fs::write(to_d0, "D0\n").unwrap();
    });
    let card = sim(Family::Wlan, Faults::default());
    // Memory decoding already on before the session: it must stay on, not be toggled off.
    card.clone().config_write16(4, 0x0406).unwrap();
    let (c, control) = (card.clone(), dev.join("power/control"));
    let r = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| {
            let control = control.clone();
            Ok(Box::new(Hooked {
                inner: c.clone(),
                on_config_write: Box::new(|| {}),
                on_map: Box::new(move || {
                    assert_eq!(std::fs::read_to_string(&control).unwrap(), "on");
                }),
            }))
        },
        "hooked",
    )
    .unwrap();
    waker.join().unwrap();
    assert_eq!(r.verdict().unwrap().health, Health::Clean);
    assert_eq!(r.reset().unwrap().restored.command, Some(0x0406));
    assert_eq!(h.read(WLAN, "power/control"), "auto");
}

/// A device on vfio-pci is owned through its group, which the VFIO access path reuses; one on
/// no driver has no group to hold.
#[test]
fn ownership_holds_the_group_of_a_vfio_device_only() {
    use qcom_reset::host::own::Ownership;
    let h = wlan_host();
    h.add(FakeDevice {
        bdf: "0000:05:00.0",
        driver: None,
        group: Some("14"),
        ..Default::default()
    });
    let dev = |b: &str| h.host.sysfs.device(bdf(b)).unwrap();
    let own = Ownership::take(
        &h.host.dev_vfio,
        &h.host.proc_root,
        &dev(WLAN),
        &h.host.open_group,
    )
    .unwrap();
    assert_eq!(own.group_path(), Some(h.host.dev_vfio.join("12").as_path()));
    assert!(
        own.group_fd().is_some_and(|fd| fd.is_ok()),
        "a second descriptor of the group"
    );
    let free = Ownership::take(
        &h.host.dev_vfio,
        &h.host.proc_root,
        &dev("0000:05:00.0"),
        &h.host.open_group,
    )
    .unwrap();
    assert!(free.group_path().is_none() && free.group_fd().is_none());
}

#[test]
fn every_experimental_profile_is_refused_without_opt_in_and_resets_like_its_family_with_it() {
    use qcom_reset::device::{DEVICES, OptIn, Status};
    let golden = |family| {
        let h = match family {
            Family::Wlan => wlan_host(),
            Family::Modem => modem_host(),
        };
        let at = if family == Family::Wlan { WLAN } else { MODEM };
        reset_with(&h, &Request::new(bdf(at)), &sim(family, Faults::default()))
            .unwrap()
            .ops
    };
    let (wlan_ops, modem_ops) = (golden(Family::Wlan), golden(Family::Modem));
    let experimental: Vec<_> = DEVICES
        .iter()
        .filter(|d| d.status == Status::Experimental)
        .collect();
    assert!(experimental.len() >= 20, "{}", experimental.len());
    for p in experimental {
        let h = FakeHost::new();
        h.add(FakeDevice {
            bdf: "0000:06:00.0",
            vendor: p.vendor,
            device: p.device,
            group: Some("6"),
            ..Default::default()
        });
        let card = qcom_reset::sim::SimDevice::new(qcom_reset::sim::Model::new(
            p.family,
            p.vendor,
            p.device,
            SimState::Crashed,
            Faults::default(),
        ));
        let mut req = Request::new(bdf("0000:06:00.0"));
        let e = reset_with(&h, &req, &card).unwrap_err();
        assert!(
            matches!(e, Error::Experimental { profile, .. } if profile == p.name),
            "{}: {e}",
            p.model
        );
        assert!(e.to_string().contains("--experimental"), "{e}");
        assert_eq!(writes(&card), 0, "{}: written without an opt-in", p.model);
        req.experimental = OptIn(vec![p.name.to_uppercase()]);
        let r = reset_with(&h, &req, &card).unwrap();
        assert_eq!(r.profile, p.name);
        let want = match p.family {
            Family::Wlan => &wlan_ops,
            Family::Modem => &modem_ops,
        };
        assert_eq!(
            &r.ops, want,
            "{}: not the family's reviewed sequence",
            p.model
        );
        assert_healthy_after_one_conformant_reset(&h, "0000:06:00.0", &card, &r);
    }
}

/// The simulator's two link-drop behaviours (issue 17 item 10): with a function reset the
/// header is repaired mid-sequence and the golden trace is unchanged; with config kept there
/// is nothing to repair and no config word is written before post.
#[test]
fn both_link_drop_behaviours_end_clean_with_the_reviewed_trace() {
    for drop in [
        qcom_reset::sim::LinkDrop::FunctionReset,
        qcom_reset::sim::LinkDrop::KeepsConfig,
    ] {
        let h = wlan_host();
        let mut model = qcom_reset::sim::Model::new(
            Family::Wlan,
            0x17cb,
            0x1103,
            SimState::Crashed,
            Faults::default(),
        );
        model.link_drop = drop;
        let card = qcom_reset::sim::SimDevice::new(model);
        let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
        assert_healthy_after_one_conformant_reset(&h, WLAN, &card, &r);
        let polls = r
            .ops
            .iter()
            .filter(|o| matches!(o, Read { offset: 0x3008, .. }))
            .count();
        // The first read and the two flushes, then the link poll: 30 reads of a downed link a
        // ms apart and the one that finds it back.
        assert_eq!(polls, 3 + 31, "{drop:?}: {:?}", r.ops);
        // enable_memory; with a function reset BAR0's address word and PCI_COMMAND mid-sequence,
        // then at post decoding off, the six words with other reset values, PCI_COMMAND.
        let expected = match drop {
            qcom_reset::sim::LinkDrop::FunctionReset => 1 + 2 + 1 + 6 + 1,
            qcom_reset::sim::LinkDrop::KeepsConfig => 1 + 1,
        };
        assert_eq!(card.with_model(|m| m.config_writes), expected, "{drop:?}");
    }
}

/// A check-then-reset told to stop after its verdict (the agent's shutdown during the check's
/// lock wait) begins no reset and puts back what the check changed; one whose verdict calls for
/// none leaves the card as it found it.
#[test]
fn a_check_resets_only_when_its_verdict_calls_for_it_and_not_once_stopped() {
    let check = |resets: bool, stop: bool| {
        let h = wlan_host();
        let card = sim(Family::Wlan, Faults::default());
        let c = card.clone();
        let got = session::check_then_reset(
            &h.host,
            &Request::new(bdf(WLAN)),
            &mut move |_, _| Ok(Box::new(c.clone())),
            "sim",
            &|_| resets,
            &|| stop,
        )
        .unwrap();
        assert_eq!(h.read(WLAN, "power/control"), "auto");
        (got, card.with_model(|m| m.resets), writes(&card))
    };
    let (got, resets, bar_writes) = check(true, true);
    assert!(matches!(got, session::Checked::Stopped(_)), "{got:?}");
    assert_eq!((resets, bar_writes), (0, 0), "no reset once stopped");
    let (got, resets, bar_writes) = check(false, false);
    assert!(matches!(got, session::Checked::Left(_)), "{got:?}");
    assert_eq!((resets, bar_writes), (0, 0), "left alone");
    let (got, resets, _) = check(true, false);
    let session::Checked::Reset(r) = got else {
        panic!("{got:?}")
    };
    assert_eq!(r.verdict().map(|v| v.health), Some(Health::Clean));
    assert_eq!(resets, 1);
}

/// An experimental sibling (a Quectel SDX6x under its own ID, profile `sdx65`) is checked but
/// not reset without an opt-in: after the lock wait the card is inspected again by its IDs, not
/// by the name of the profile the first inspection found (whose reference row is reviewed).
#[test]
fn a_check_resets_an_experimental_sibling_only_when_opted_in() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        vendor: 0x1eac,
        device: 0x1004,
        ..FakeDevice::modem(MODEM)
    });
    let card = sim(Family::Modem, Faults::default());
    let c = card.clone();
    let got = session::check_then_reset(
        &h.host,
        &Request::new(bdf(MODEM)),
        &mut move |_, _| Ok(Box::new(c.clone())),
        "sim",
        &|_| true,
        &|| false,
    );
    assert!(matches!(got, Err(Error::Experimental { .. })), "{got:?}");
    assert_eq!(card.with_model(|m| m.resets), 0, "not reset");
}
