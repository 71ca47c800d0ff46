//! Issue 17, "never harm the host": the paths around the happy path. Each test names the
//! item it proves; each failed against the code before its fix (docs/testing.md lists them).
mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use qcom_reset::Error;
use qcom_reset::access::Backend;
use qcom_reset::device::Family;
use qcom_reset::device::regio::RegisterIo;
use qcom_reset::host::lock::DeviceLock;
use qcom_reset::session::record::{self, Record};
use qcom_reset::session::{self, ReadMode, Request};
use qcom_reset::sim::{Faults, SimDevice, SimState};

const WLAN: &str = "0000:03:00.0";
const MODEM: &str = "0000:04:00.0";
const PORT: &str = "0000:00:1c.0";

fn record_path(h: &FakeHost, bdf_s: &str) -> PathBuf {
    h.host.run_dir.join(format!("{bdf_s}.json"))
}

fn config_writes(card: &SimDevice) -> usize {
    card.with_model(|m| m.config_writes)
}

/// Rebinds the fake card to `driver` (what libvirt's managed reattach or an admin does).
fn rebind(h: &FakeHost, bdf_s: &str, driver: &str) {
    let link = h.host.sysfs.root.join(bdf_s).join("driver");
    let target = h.root().join("sys/bus/pci/drivers").join(driver);
    fs::create_dir_all(&target).unwrap();
    let _ = fs::remove_file(&link);
    symlink(&target, &link).unwrap();
}

/// A root port at PORT with pciehp's usual Slot Control (PDCE|HPIE|DLLSCE|CCIE) and AER with
/// Surprise Down reported, and the card `d` below it in the sysfs device tree.
fn host_behind_port(d: FakeDevice) -> FakeHost {
    let h = FakeHost::new();
    let real_port = h.root().join("sys/devices/pci0000:00").join(PORT);
    fs::create_dir_all(&real_port).unwrap();
    let mut cfg = vec![0u8; 4096];
    let mut put = |off: usize, v: &[u8]| cfg[off..off + v.len()].copy_from_slice(v);
    put(0x00, &0x8086u16.to_le_bytes());
    put(0x02, &0x7c0au16.to_le_bytes());
    put(0x0a, &0x0604u16.to_le_bytes());
    put(0x06, &0x0010u16.to_le_bytes());
    put(0x34, &[0x40]);
    put(0x40, &0x0010u16.to_le_bytes()); // PCIe, last
    put(0x42, &0x0142u16.to_le_bytes()); // root port, slot implemented
    put(0x54, &0x0000_0040u32.to_le_bytes()); // hotplug capable
    put(0x58, &0x1038u16.to_le_bytes());
    put(0x100, &0x0001_0001u32.to_le_bytes()); // AER, last
    fs::write(real_port.join("config"), cfg).unwrap();
    for f in ["vendor", "device"] {
        fs::write(real_port.join(f), "0x8086\n").unwrap();
    }
    symlink(&real_port, h.host.sysfs.root.join(PORT)).unwrap();
    let bdf_s = d.bdf;
    let flat = h.add(d);
    let nested = real_port.join(bdf_s);
    fs::rename(&flat, &nested).unwrap();
    symlink(&nested, &flat).unwrap();
    h
}

fn port_regs(h: &FakeHost) -> (u16, u32) {
    let cfg = fs::read(h.host.sysfs.root.join(PORT).join("config")).unwrap();
    (
        u16::from_le_bytes([cfg[0x58], cfg[0x59]]),
        u32::from_le_bytes(cfg[0x108..0x10c].try_into().unwrap()),
    )
}

/// What a killed session left on the port: PDCE|DLLSCE masked.
fn mask_port(h: &FakeHost) {
    let cfg = h.host.sysfs.root.join(PORT).join("config");
    let mut bytes = fs::read(&cfg).unwrap();
    bytes[0x58..0x5a].copy_from_slice(&0x0030u16.to_le_bytes());
    fs::write(&cfg, bytes).unwrap();
}

/// What a session killed after masking the port leaves in its record: the port's Slot Control
/// (PDCE|HPIE|DLLSCE|CCIE) to put back. Returns the record as saved.
fn record_masked_port(h: &FakeHost) -> Record {
    record_masked_port_at(h, PORT)
}

/// The same, for the port at `port`.
fn record_masked_port_at(h: &FakeHost, port: &str) -> Record {
    let mut rec = record::load(&h.host.run_dir, bdf(WLAN)).unwrap().unwrap();
    rec.port = Some(qcom_reset::session::port::PortRecord {
        port: bdf(port),
        ids: None,
        command_completed: false,
        slot_control: Some((0x58, 0x1038)),
        aer_mask: None,
    });
    record::save(&h.host.run_dir, &rec).unwrap();
    rec
}

/// Resets the WLAN card with `when_mapped` run once, as the session maps its BAR (the card
/// changes hands or leaves the bus at exactly that moment).
fn reset_changing_at_map(
    h: &FakeHost,
    card: &SimDevice,
    when_mapped: impl FnOnce() + Send + 'static,
) -> qcom_reset::Result<session::Report> {
    let c = card.clone();
    let mut once = Some(when_mapped);
    session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| {
            let mut f = once.take();
            Ok(Box::new(Hooked {
                inner: c.clone(),
                on_config_write: Box::new(|| {}),
                on_map: Box::new(move || {
                    if let Some(f) = f.take() {
                        f();
                    }
                }),
            }))
        },
        "changing",
    )
}

/// Item 1: observe-only never deletes a killed session's record (it holds the port's masks
/// and power/control).
#[test]
fn observe_only_keeps_a_killed_sessions_record() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![]);
    let t = session::inspect(&h.host, bdf(WLAN), None, None).unwrap();
    let c = card.clone();
    let st = session::status(
        &h.host,
        t,
        &mut move |_, _| Ok(Box::new(c.clone())),
        ReadMode::NoWrites,
    )
    .unwrap();
    assert!(st.verdict().is_some(), "{:?}", st.unread());
    assert!(record_path(&h, WLAN).exists(), "the record stays");
    assert_eq!(
        config_writes(&card),
        1,
        "only the killed session's own write"
    );
}

/// Item 2: a recovery that cannot put everything back refuses the session; the record is
/// neither overwritten by a new baseline nor deleted, and the card is not reset.
#[test]
fn a_failed_recovery_refuses_the_session_and_keeps_the_record() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Crashed, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![]);
    // The killed session had masked a port that cannot be reached now.
    let rec = record_masked_port(&h);
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(
        matches!(e, Error::RecoveryIncomplete { .. }) && e.to_string().contains("by hand"),
        "{e}"
    );
    let kept = record::load(&h.host.run_dir, bdf(WLAN)).unwrap().unwrap();
    assert_eq!(
        (kept.pid, kept.port, kept.command),
        (rec.pid, rec.port, rec.command),
        "the killed session's record, not a new baseline"
    );
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        0,
        "no register written"
    );
    assert_ne!(
        h.read(WLAN, "driver_override"),
        qcom_reset::session::HOLD_OVERRIDE,
        "not left held off its drivers"
    );
}

/// Item 3: a record waits while a host driver has the card; nothing is written under it.
#[test]
fn a_record_waits_while_a_host_driver_has_the_card() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![(0x12, 0xfe00)]);
    rebind(&h, WLAN, "ath11k_pci");
    let c = card.clone();
    let done = session::recover_pending(&h.host, &mut move |_, _| Ok(Box::new(c.clone())));
    let [(b, Err(e))] = done.as_slice() else {
        panic!("{done:?}")
    };
    assert_eq!(*b, bdf(WLAN));
    assert!(
        matches!(e, Error::RecordWaits { .. }) && e.to_string().contains("ath11k_pci"),
        "{e}"
    );
    assert_eq!(config_writes(&card), 1, "PCI_COMMAND left to ath11k");
    assert_eq!(h.read(WLAN, "power/control"), "on");
    assert!(record_path(&h, WLAN).exists(), "the record waits");
}

/// Item 4: a card that leaves the bus mid-session: the port is restored by its recorded
/// address, the record removed only after that, and nothing more is written to the card.
#[test]
fn the_port_is_restored_by_address_when_the_card_is_gone() {
    let h = host_behind_port(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let dir = h.host.sysfs.root.join(WLAN);
    let e = reset_changing_at_map(&h, &card, move || {
        let real = fs::canonicalize(&dir).unwrap();
        fs::remove_dir_all(real).unwrap();
        fs::remove_file(&dir).unwrap();
    })
    .unwrap_err();
    assert!(e.to_string().contains("nobody: it left the bus"), "{e}");
    assert_eq!(
        port_regs(&h),
        (0x1038, 0),
        "hotplug events and Surprise Down back"
    );
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
    assert!(
        !record_path(&h, WLAN).exists(),
        "removed once the port is back"
    );
}

/// Item 5: a record naming offsets no restore may write is refused, naming the file.
#[test]
fn a_corrupt_record_is_refused_naming_the_file() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Crashed, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![(0x04, 0x0000)]);
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(
        matches!(e, Error::BadRecord { .. }) && e.to_string().contains("0000:03:00.0.json"),
        "{e}"
    );
    assert!(
        matches!(
            e,
            Error::BadRecord {
                why: qcom_reset::RecordDefect::ConfigOffset(0x04),
                ..
            }
        ),
        "the defect is kept typed: {e:?}"
    );
    assert!(
        e.to_string()
            .contains("(config offset 0x4 is not a restorable register)"),
        "the line names the defect: {e}"
    );
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
    // Unparsable: the same line, never a silent skip.
    fs::write(record_path(&h, WLAN), "{\"bdf\":").unwrap();
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(matches!(e, Error::BadRecord { .. }), "{e}");
    assert!(
        matches!(
            &e,
            Error::BadRecord { why: qcom_reset::RecordDefect::Json(j), .. } if j.is_eof()
        ),
        "the parser's error is kept: {e:?}"
    );
}

/// Item 6: a card on no driver (start-up rescan) has no group to hold: for the whole session
/// `driver_override` keeps every driver off it, recorded first and put back after.
#[test]
fn a_card_on_no_driver_is_held_off_drivers_for_the_session() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        driver: None,
        group: None,
        ..FakeDevice::default()
    });
    let card = sim(Family::Wlan, Faults::default());
    let seen = Arc::new(Mutex::new(None));
    let (c, s, ovr, run) = (
        card.clone(),
        seen.clone(),
        h.host.sysfs.root.join(WLAN).join("driver_override"),
        h.host.run_dir.clone(),
    );
    let r = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| {
            let (s, ovr, run) = (s.clone(), ovr.clone(), run.clone());
            Ok(Box::new(Hooked {
                inner: c.clone(),
                on_config_write: Box::new(|| {}),
                on_map: Box::new(move || {
                    let rec: Record = record::load(&run, bdf(WLAN)).unwrap().unwrap();
                    *s.lock().unwrap() =
                        Some((fs::read_to_string(&ovr).unwrap(), rec.driver_override));
                }),
            }))
        },
        "simulator",
    )
    .unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
    let (during, recorded) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(during.trim(), qcom_reset::session::HOLD_OVERRIDE);
    assert_eq!(recorded, Some(qcom_reset::host::sysfs::Override::Unset));
    assert_eq!(h.read(WLAN, "driver_override"), "", "cleared again");
}

/// Item 6: libvirt's managed reattach binds the host driver while the WLAN sequence runs (a
/// held group does not stop an unbind): after the handover not one more register, config or
/// power write reaches the card, and the journal says who took it.
#[test]
fn a_card_taken_mid_sequence_gets_no_further_writes() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let root = h.root().to_path_buf();
    let (taken, after) = (Arc::new(Mutex::new(false)), Arc::new(Mutex::new(0)));
    let mut backend = Some(HandOverCard {
        inner: card.clone(),
        take: Some(Box::new(move || {
            let link = root.join("sys/bus/pci/devices").join(WLAN).join("driver");
            let drv = root.join("sys/bus/pci/drivers/ath11k_pci");
            fs::create_dir_all(&drv).unwrap();
            fs::remove_file(&link).unwrap();
            symlink(&drv, &link).unwrap();
        })),
        taken: taken.clone(),
        config_writes_after: after.clone(),
    });
    let e = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| Ok(Box::new(backend.take().unwrap())),
        "hand-over",
    )
    .unwrap_err();
    assert!(e.to_string().contains("taken by driver ath11k_pci"), "{e}");
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        1,
        "the assert went out, the deassert and MHI reset did not"
    );
    assert_eq!(
        *after.lock().unwrap(),
        0,
        "no config write after the handover"
    );
    assert_eq!(
        h.read(WLAN, "power/control"),
        "on",
        "power is the new driver's"
    );
    assert!(
        !record_path(&h, WLAN).exists(),
        "nothing left to restore for us"
    );
}

/// Item 7: `status` waited for the lock while the card was handed to a host driver: it
/// re-checks after the wait and writes nothing.
#[test]
fn status_rechecks_the_driver_after_its_lock_wait() {
    let mut h = FakeHost::new();
    h.host.lock_wait = Duration::from_secs(5);
    h.add(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let lock = DeviceLock::acquire(&h.host.run_dir, bdf(WLAN), Duration::ZERO).unwrap();
    let t = session::inspect(&h.host, bdf(WLAN), None, None).unwrap();
    let (host, c) = (h.host.clone(), card.clone());
    let status = std::thread::spawn(move || {
        session::status(
            &host,
            t,
            &mut move |_, _| Ok(Box::new(c.clone())),
            ReadMode::EnableAndRestore,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    rebind(&h, WLAN, "ath11k_pci");
    drop(lock);
    let st = status.join().unwrap().unwrap();
    let why = st.unread().cloned().expect("not read");
    assert!(
        matches!(&why, session::Unread::Refused(w) if w.contains("ath11k_pci")),
        "{why}"
    );
    assert_eq!(config_writes(&card), 0);
    assert_eq!(h.read(WLAN, "power/control"), "auto");
}

/// Item 15: one device that cannot be inspected does not abort the rescan of the others.
#[test]
fn one_unreadable_device_does_not_abort_the_rescan() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let bad = h.add(FakeDevice::modem(MODEM));
    fs::create_dir(bad.join("reset_method")).unwrap(); // reads fail with EISDIR
    let found = session::targets(&h.host, &[]).unwrap();
    assert_eq!(found.iter().map(|t| t.bdf).collect::<Vec<_>>(), [bdf(WLAN)]);
}

/// Item 15: the kernel reset's `reset_method` swap is in the crash record (a killed session
/// leaves it for the next) and is put back when the kernel's reset fails, which then falls
/// back to our sequence (the 7.4 regime in the VM lab: the WLAN link poll timing out).
#[test]
fn the_reset_method_swap_is_recorded_and_a_failed_kernel_reset_falls_back() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        reset_method: Some("bus device_specific"),
        ..FakeDevice::default()
    });
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    // A killed session left the swap in place, and its record.
    leave_killed_session(&h, WLAN, &card, vec![]);
    let mut rec = record::load(&h.host.run_dir, bdf(WLAN)).unwrap().unwrap();
    rec.reset_method = Some("bus device_specific".into());
    record::save(&h.host.run_dir, &rec).unwrap();
    fs::write(
        h.host.sysfs.root.join(WLAN).join("reset_method"),
        "device_specific\n",
    )
    .unwrap();
    // This run's kernel reset fails.
    let reset = h.host.sysfs.root.join(WLAN).join("reset");
    fs::remove_file(&reset).unwrap();
    fs::create_dir(&reset).unwrap();
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    assert_eq!(r.method(), session::Method::RegisterSequence);
    assert_eq!(card.with_model(|m| m.resets), 1);
    assert_eq!(h.read(WLAN, "reset_method"), "bus device_specific");
    assert!(!record_path(&h, WLAN).exists());
}

/// Item 15: two cards below one port: the second session waits for the first to restore the
/// port instead of recording its masked state as the original.
#[test]
fn two_cards_below_one_port_never_record_each_others_masks() {
    let h = host_behind_port(FakeDevice::default());
    let port_lock = DeviceLock::acquire(&h.host.run_dir, bdf(PORT), Duration::ZERO).unwrap();
    let card = sim(Family::Wlan, Faults::default());
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(
        matches!(e, Error::Busy { .. }) && e.to_string().contains(PORT),
        "{e}"
    );
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
    drop(port_lock);
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
    assert_eq!(port_regs(&h), (0x1038, 0));
}

/// The card behind the port of [`host_behind_port`], pciehp polling its slot
/// (`pciehp_poll_mode=Y`).
fn behind_a_polled_slot() -> FakeHost {
    let h = host_behind_port(FakeDevice::default());
    let param = h.root().join("sys/module/pciehp/parameters");
    fs::create_dir_all(&param).unwrap();
    fs::write(param.join("pciehp_poll_mode"), "Y\n").unwrap();
    h
}

/// Item 11: with pciehp polling, the masks do not stop it acting on the link drop: refused
/// unless allowed.
#[test]
fn pciehp_poll_mode_is_refused_unless_allowed() {
    let h = behind_a_polled_slot();
    let card = sim(Family::Wlan, Faults::default());
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(matches!(e, Error::PciehpPolls { .. }), "{e}");
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
    assert_eq!(port_regs(&h), (0x1038, 0), "nothing masked");
    let r = reset_with(
        &h,
        &Request {
            allow_unguarded_link_drop: true,
            ..Request::new(bdf(WLAN))
        },
        &card,
    )
    .unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
}

/// Review finding: a killed session's port masks come back even while the card is on a host
/// driver (the rest of the record waits) or gone from the bus (the record goes with the port).
#[test]
fn a_killed_sessions_port_masks_come_back_whoever_has_the_card() {
    for gone in [false, true] {
        let h = host_behind_port(FakeDevice::default());
        let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
        leave_killed_session(&h, WLAN, &card, vec![]);
        record_masked_port(&h);
        mask_port(&h);
        if gone {
            let dir = h.host.sysfs.root.join(WLAN);
            fs::remove_dir_all(fs::canonicalize(&dir).unwrap()).unwrap();
            fs::remove_file(&dir).unwrap();
        } else {
            rebind(&h, WLAN, "ath11k_pci");
        }
        let c = card.clone();
        let done = session::recover_pending(&h.host, &mut move |_, _| Ok(Box::new(c.clone())));
        assert_eq!(port_regs(&h).0, 0x1038, "gone={gone}: {done:?}");
        if gone {
            let restored = done[0].1.as_ref().unwrap();
            assert_eq!(restored.port, ["0000:00:1c.0 SltCtl 0x1038"], "{done:?}");
        }
        assert_eq!(config_writes(&card), 1, "nothing written to the card");
        let left = record::load(&h.host.run_dir, bdf(WLAN)).unwrap();
        match gone {
            true => assert!(left.is_none(), "{done:?}"),
            false => assert!(left.is_some_and(|r| r.port.is_none()), "{done:?}"),
        }
    }
}

/// Review finding: a function removed and found again at the same address (vfio-pci rebinding
/// it through `ids=`) is another device: the session writes nothing more to it.
#[test]
fn a_card_re_enumerated_mid_session_is_not_written() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let dir = h.host.sysfs.root.join(WLAN);
    let e = reset_changing_at_map(&h, &card, move || {
        let stash = dir.with_file_name("stash");
        fs::rename(&dir, &stash).unwrap();
        fs::create_dir(&dir).unwrap();
        for e in fs::read_dir(&stash).unwrap() {
            let e = e.unwrap();
            let to = dir.join(e.file_name());
            match fs::read_link(e.path()) {
                Ok(l) => symlink(l, to).unwrap(),
                Err(_) if e.path().is_dir() => {
                    fs::rename(e.path(), to).unwrap();
                }
                Err(_) => {
                    fs::copy(e.path(), to).unwrap();
                }
            }
        }
    })
    .unwrap_err();
    assert!(e.to_string().contains("came back"), "{e}");
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
}

/// The VM lab's `handover` finding: a modem handed over during its 2 s wait got a `clean`
/// verdict read from registers the new driver owned. The session ends as taken instead.
#[test]
fn a_modem_taken_during_its_wait_gets_no_verdict() {
    let h = FakeHost::new();
    h.add(FakeDevice::modem(MODEM));
    let card = sim(Family::Modem, Faults::default());
    let root = h.root().to_path_buf();
    let mut backend = Some(HandOverCard {
        inner: card.clone(),
        take: Some(Box::new(move || {
            let link = root.join("sys/bus/pci/devices").join(MODEM).join("driver");
            let drv = root.join("sys/bus/pci/drivers/uio_pci_generic");
            fs::create_dir_all(&drv).unwrap();
            fs::remove_file(&link).unwrap();
            symlink(&drv, &link).unwrap();
        })),
        taken: Arc::new(Mutex::new(false)),
        config_writes_after: Arc::new(Mutex::new(0)),
    });
    let e = session::reset(
        &h.host,
        &Request::new(bdf(MODEM)),
        &mut move |_, _| Ok(Box::new(backend.take().unwrap())),
        "hand-over",
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Taken { .. }) && e.to_string().contains("uio_pci_generic"),
        "{e}"
    );
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        1,
        "the reset request only"
    );
}

/// A card rebound between the ownership check and the session's first write gets none (not even
/// the `driver_override` hold); an override someone had set (libvirt's "vfio-pci") is held off
/// for the session and put back after it.
#[test]
fn a_rebind_before_the_first_write_is_caught_and_an_existing_override_comes_back() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let ovr = h.host.sysfs.root.join(WLAN).join("driver_override");
    fs::write(&ovr, "vfio-pci\n").unwrap();
    let card = sim(Family::Wlan, Faults::default());
    let (c, root) = (card.clone(), h.root().to_path_buf());
    let e = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| {
            let link = root.join("sys/bus/pci/devices").join(WLAN).join("driver");
            let drv = root.join("sys/bus/pci/drivers/ath11k_pci");
            fs::create_dir_all(&drv).unwrap();
            fs::remove_file(&link).unwrap();
            symlink(&drv, &link).unwrap();
            Ok(Box::new(c.clone()))
        },
        "rebound",
    )
    .unwrap_err();
    assert!(matches!(e, Error::Taken { .. }), "{e}");
    assert_eq!(config_writes(&card), 0);
    assert_eq!(h.read(WLAN, "driver_override"), "vfio-pci", "never touched");
    assert_eq!(h.read(WLAN, "power/control"), "auto");

    rebind(&h, WLAN, "vfio-pci");
    let seen = Arc::new(Mutex::new(String::new()));
    let s = seen.clone();
    let r = reset_changing_at_map(&h, &card, move || {
        *s.lock().unwrap() = fs::read_to_string(&ovr).unwrap();
    })
    .unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
    assert_eq!(
        seen.lock().unwrap().trim(),
        qcom_reset::session::HOLD_OVERRIDE
    );
    assert_eq!(h.read(WLAN, "driver_override"), "vfio-pci", "put back");
}

/// An override someone else set mid-session (libvirt's reattach) is theirs: not put back.
#[test]
fn an_override_set_by_someone_else_mid_session_is_left_alone() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let ovr = h.host.sysfs.root.join(WLAN).join("driver_override");
    let r = reset_changing_at_map(&h, &card, move || {
        fs::write(&ovr, "ath11k_pci\n").unwrap();
    })
    .unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
    assert_eq!(h.read(WLAN, "driver_override"), "ath11k_pci");
}

/// A killed session's old-format record (no override in it) and its hold left on the card: the
/// hold is not taken for the card's own override, so it is cleared at the end.
#[test]
fn a_killed_sessions_hold_is_never_taken_for_the_original() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![]);
    let ovr = h.host.sysfs.root.join(WLAN).join("driver_override");
    fs::write(&ovr, format!("{}\n", qcom_reset::session::HOLD_OVERRIDE)).unwrap();
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    assert!(r.reset().unwrap().recovered.is_some());
    assert_eq!(h.read(WLAN, "driver_override"), "");
}

/// After a link drop that kept config space, a word changed meanwhile still goes back at post
/// (the session knows the link dropped from the sequence's all-ones reads); a card already
/// decoding keeps decoding for the sequence.
#[test]
fn a_link_drop_seen_by_the_sequence_restores_every_word() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let mut model = qcom_reset::sim::Model::new(
        Family::Wlan,
        0x17cb,
        0x1103,
        SimState::Crashed,
        Faults::default(),
    );
    model.link_drop = qcom_reset::sim::LinkDrop::KeepsConfig;
    let card = SimDevice::new(model);
    card.clone().config_write16(4, 0x0406).unwrap(); // memory decoding already on
    let mut c = card.clone();
    let r = reset_changing_at_map(&h, &card, move || {
        c.config_write16(0x3c, 0x0105).unwrap();
    })
    .unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
    assert!(
        r.reset()
            .unwrap()
            .restored
            .config
            .iter()
            .any(|w| w == "0x3c: 0x0105 -> 0x010b"),
        "{:?}",
        r.reset().unwrap().restored
    );
    assert_eq!(card.with_model(|m| m.cfg.read16(0x3c)), 0x010b);
    // The test's two writes; enable memory (decoding kept on: no repair needed); post: decoding
    // off, 0x3c, PCI_COMMAND.
    assert_eq!(card.with_model(|m| m.config_writes), 2 + 1 + 3);
}

/// A killed session's port values put back before the next reset are in its report.
#[test]
fn the_recovered_port_is_reported() {
    let h = host_behind_port(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![]);
    record_masked_port(&h);
    mask_port(&h);
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    assert_eq!(
        r.reset().unwrap().recovered.clone().unwrap().port,
        ["0000:00:1c.0 SltCtl 0x1038"]
    );
    assert_eq!(port_regs(&h).0, 0x1038);
}

/// Item 10 with only PCI_COMMAND lost (BARs kept): MMIO all-ones while config answers is
/// repaired by turning decoding back on, and the sequence runs as reviewed.
#[test]
fn decoding_lost_alone_is_repaired_too() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let mut c = card.clone();
    let r = reset_changing_at_map(&h, &card, move || {
        c.config_write16(4, 0x0400).unwrap(); // memory decoding off, BARs as they were
    })
    .unwrap();
    assert_eq!(
        r.outcome(),
        Some(qcom_reset::device::sequence::Outcome::Completed)
    );
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
}

/// The port's reports are masked while the sequence runs, and back after it.
#[test]
fn the_port_is_masked_during_the_reset() {
    let h = host_behind_port(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let during = Arc::new(Mutex::new((0, 0)));
    let (d, cfg) = (during.clone(), h.host.sysfs.root.join(PORT).join("config"));
    reset_changing_at_map(&h, &card, move || {
        let b = fs::read(&cfg).unwrap();
        *d.lock().unwrap() = (
            u16::from_le_bytes([b[0x58], b[0x59]]),
            u32::from_le_bytes(b[0x108..0x10c].try_into().unwrap()),
        );
    })
    .unwrap();
    assert_eq!(
        *during.lock().unwrap(),
        (0x0030, 0x20),
        "PDCE|DLLSCE off, Surprise Down masked"
    );
    assert_eq!(port_regs(&h), (0x1038, 0));
}

/// The port's config space made unwritable for the test's length: immutable for root (who
/// writes through a mode), read-only for anyone else. Undone on drop, panic or not, so the
/// temporary directory can go.
struct Unwritable(PathBuf);

impl Unwritable {
    fn new(path: PathBuf) -> Unwritable {
        let f = fs::File::open(&path).unwrap();
        if rustix::process::geteuid().is_root() {
            rustix::fs::ioctl_setflags(&f, rustix::fs::IFlags::IMMUTABLE).expect(
                "chattr +i on the fake port's config (the test's tempdir needs ext4/xfs/btrfs)",
            );
        } else {
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .unwrap();
        }
        Unwritable(path)
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if let Ok(f) = fs::File::open(&self.0) {
            let _ = rustix::fs::ioctl_setflags(&f, rustix::fs::IFlags::empty());
        }
        let _ = fs::set_permissions(&self.0, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    }
}

/// Item 11, the guard's own failure: a port whose masks cannot be written refuses the reset
/// (nothing written to the card) unless the admin accepted an unguarded link drop, when the
/// reset goes on and ends clean.
#[test]
fn a_port_guard_that_cannot_write_refuses_unless_allowed() {
    let h = host_behind_port(FakeDevice::default());
    let _ro = Unwritable::new(h.host.sysfs.root.join(PORT).join("config"));
    let card = sim(Family::Wlan, Faults::default());
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(matches!(e, Error::PortGuard { .. }), "{e}");
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        0,
        "refused before the card"
    );
    let allowed = Request {
        allow_unguarded_link_drop: true,
        ..Request::new(bdf(WLAN))
    };
    let r = reset_with(&h, &allowed, &card).unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::Clean
    );
    assert_eq!(port_regs(&h), (0x1038, 0), "the port as it was");
}

/// Found by the vfio-user card (`fault`, Debian 7.2): a card whose link never came back reads
/// all-ones PMCSR, which the kernel reports as D3cold. That is a link down, reported as such (as
/// the first attempt reports it), not as a power-state error that hides the cause.
#[test]
fn a_card_off_the_link_is_link_down_not_a_power_state_error() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        power_state: "D3cold",
        ..FakeDevice::default()
    });
    let card = sim(
        Family::Wlan,
        Faults {
            config_all_ones: true,
            ..Faults::default()
        },
    );
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::LinkDown
    );
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        0,
        "no write to a dead link"
    );
}

/// vfio-pci's view of config space (`access = "vfio"`): the ID registers are its virtualized
/// copy, which answers with the card's IDs whatever the link does.
#[derive(Clone)]
struct VfioView(SimDevice);

impl Backend for VfioView {
    fn name(&self) -> &'static str {
        "vfio"
    }
    fn config_read16(&mut self, o: u16) -> std::io::Result<u16> {
        match o {
            0 => Ok(0x17cb),
            2 => Ok(0x1103),
            _ => self.0.config_read16(o),
        }
    }
    fn config_write16(&mut self, o: u16, v: u16) -> std::io::Result<()> {
        self.0.config_write16(o, v)
    }
    fn map_bar(&mut self, bar: u8) -> qcom_reset::Result<(Box<dyn RegisterIo>, u64)> {
        self.0.map_bar(bar)
    }
}

/// A reset of the WLAN card through `view` (a VFIO-like backend), whose verdict must be
/// link-down.
fn link_down_through(
    h: &FakeHost,
    view: impl Backend + Clone + 'static,
) -> qcom_reset::session::Report {
    let r = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| Ok(Box::new(view.clone())),
        "vfio",
    )
    .unwrap();
    assert_eq!(
        r.verdict().map(|v| v.health),
        Some(qcom_reset::device::verdict::Health::LinkDown)
    );
    r
}

/// Through VFIO a card whose link never comes back still shows its IDs (vfio-pci virtualizes
/// them), so "config space answers with the card's IDs" cannot be the test for a link that is
/// back: the header repair wrote every saved word into the dead link (the VM lab's `container`
/// scenario showed it reading 0xffff and "restoring" it three times). The session writes no more
/// through VFIO than through sysfs.
#[test]
fn virtualized_ids_do_not_make_a_dead_link_look_alive() {
    let dead = || {
        sim(
            Family::Wlan,
            Faults {
                never_returns: true,
                ..Faults::default()
            },
        )
    };
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let plain = dead();
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &plain).unwrap();
    assert_eq!(
        r.verdict().unwrap().health,
        qcom_reset::device::verdict::Health::LinkDown
    );
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = dead();
    let r = link_down_through(&h, VfioView(card.clone()));
    assert_eq!(
        card.with_model(|m| m.config_writes),
        plain.with_model(|m| m.config_writes),
        "no header repair into a dead link ({} words reported restored)",
        r.reset().unwrap().restored.config.len()
    );
}

/// vfio-pci's view of a card whose MMIO reads all-ones while its link and header are fine (a
/// register block not woken, a hung SoC): config passes through except Link Control, whose
/// writes vfio-pci drops (it lets only Device Control and Device Control 2 through).
#[derive(Clone)]
struct DeafBar(SimDevice);

impl Backend for DeafBar {
    fn name(&self) -> &'static str {
        "vfio"
    }
    fn config_read16(&mut self, o: u16) -> std::io::Result<u16> {
        self.0.config_read16(o)
    }
    fn config_write16(&mut self, o: u16, v: u16) -> std::io::Result<()> {
        if o == qcom_reset::sim::config::LNKCTL {
            return Ok(());
        }
        self.0.config_write16(o, v)
    }
    fn map_bar(&mut self, _bar: u8) -> qcom_reset::Result<(Box<dyn RegisterIo>, u64)> {
        Ok((Box::new(AllOnes(self.0.clone())), 1 << 21))
    }
}

/// Reads all-ones, drops writes; time passes on the card's clock.
struct AllOnes(SimDevice);

impl RegisterIo for AllOnes {
    fn read32(&mut self, _offset: u32) -> u32 {
        0xffff_ffff
    }
    fn write32(&mut self, _offset: u32, _value: u32) {}
    fn delay(&mut self, d: Duration) {
        self.0.delay(d);
    }
}

/// MMIO reading all-ones is a lost header only when a BAR or memory decoding is gone: Link
/// Control saved with ASPM cleared (and through VFIO never written) is no reason to repair,
/// let alone on every all-ones read of the verification's polling.
#[test]
fn all_ones_mmio_with_the_header_intact_repairs_nothing() {
    let config_writes = |aspm: bool| {
        let h = FakeHost::new();
        h.add(FakeDevice::default());
        let card = sim(Family::Wlan, Faults::default());
        let lnkctl = qcom_reset::sim::config::LNKCTL;
        let mut c = card.clone();
        if aspm {
            let v = c.config_read16(lnkctl).unwrap();
            c.config_write16(lnkctl, v | 0x0003).unwrap();
        }
        let before = card.with_model(|m| m.config_writes);
        let r = link_down_through(&h, DeafBar(card.clone()));
        (
            card.with_model(|m| m.config_writes) - before,
            r.reset().unwrap().restored.clone(),
        )
    };
    let (plain, _) = config_writes(false);
    let (aspm, restored) = config_writes(true);
    // The one extra write: the final restore turns decoding off around the word it owes after
    // what looked like a link drop. Before: a repair on each of the verification's reads.
    assert!(
        aspm <= plain + 1,
        "ASPM on made the session write {aspm} config words instead of {plain}: {restored:?}"
    );
    assert!(restored.config.is_empty(), "{restored:?}");
    assert_eq!(restored.not_taken, ["0x60 reads 0x0043, not 0x0040"]);
}

/// A card whose BAR0 register refuses the restore (a write error mid-repair): decoding is never
/// turned on over a half-restored BAR, neither by the repair nor after it.
#[derive(Clone)]
struct StuckBar(SimDevice, Arc<Mutex<Vec<(u16, u16, bool)>>>);

impl Backend for StuckBar {
    fn name(&self) -> &'static str {
        "simulator"
    }
    fn config_read16(&mut self, o: u16) -> std::io::Result<u16> {
        self.0.config_read16(o)
    }
    fn config_write16(&mut self, o: u16, v: u16) -> std::io::Result<()> {
        let refused = o == 0x12;
        self.1.lock().unwrap().push((o, v, refused));
        if refused {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.0.config_write16(o, v)
    }
    fn map_bar(&mut self, bar: u8) -> qcom_reset::Result<(Box<dyn RegisterIo>, u64)> {
        self.0.map_bar(bar)
    }
}

#[test]
fn a_bar_write_that_fails_mid_repair_leaves_decoding_off() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    card.clone().config_write16(0x12, 0xfe00).unwrap(); // BAR0 where the kernel put it
    let log = Arc::new(Mutex::new(Vec::new()));
    let view = StuckBar(card.clone(), log.clone());
    let _ = session::reset(
        &h.host,
        &Request::new(bdf(WLAN)),
        &mut move |_, _| Ok(Box::new(view.clone())),
        "simulator",
    );
    let log = log.lock().unwrap();
    let first_refusal = log
        .iter()
        .position(|&(_, _, refused)| refused)
        .expect("the link drop took BAR0 and the repair tried to put it back");
    let decoding_after = log[first_refusal..]
        .iter()
        .find(|&&(o, v, _)| o == 4 && v & 0x2 != 0);
    assert_eq!(decoding_after, None, "writes: {log:?}");
}

/// A card's BAR with `on_read` run at each of the verification's reads (those after the
/// sequence's `writes` writes and the delay that follows the last); `revoked` stands for the
/// kernel taking the mapping away (all-ones from then on).
struct AtVerify {
    inner: Box<dyn RegisterIo>,
    writes: u32,
    seq_writes: u32,
    delayed: bool,
    on_read: Box<dyn FnMut() + Send>,
    revoked: Arc<std::sync::atomic::AtomicBool>,
    /// The card stops answering (all-ones) without the mapping being revoked.
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl RegisterIo for AtVerify {
    fn read32(&mut self, offset: u32) -> u32 {
        if self.writes == self.seq_writes && self.delayed {
            (self.on_read)();
        }
        if self.revoked() || self.dead.load(std::sync::atomic::Ordering::SeqCst) {
            return u32::MAX;
        }
        self.inner.read32(offset)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        self.writes += 1;
        self.delayed = false;
        self.inner.write32(offset, value);
    }
    fn delay(&mut self, d: Duration) {
        self.delayed = true;
        self.inner.delay(d);
    }
    fn revoked(&self) -> bool {
        self.revoked.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What a verification hook saw: whether the group was held at each verification read and at
/// each config write, and the config writes after `after` was set.
#[derive(Clone, Default)]
struct Seen {
    reads_held: Arc<Mutex<Vec<bool>>>,
    writes_held: Arc<Mutex<Vec<bool>>>,
    after: Arc<Mutex<Option<usize>>>,
    revoked: Arc<std::sync::atomic::AtomicBool>,
    dead: Arc<std::sync::atomic::AtomicBool>,
}

/// A backend named `name` ("sysfs" or "vfio") whose BAR runs `on_read` during the verification.
struct VerifyHook {
    name: &'static str,
    inner: SimDevice,
    node: PathBuf,
    seq_writes: u32,
    on_read: Option<Box<dyn FnMut() + Send>>,
    seen: Seen,
}

impl Backend for VerifyHook {
    fn name(&self) -> &'static str {
        self.name
    }
    fn config_read16(&mut self, o: u16) -> std::io::Result<u16> {
        self.inner.config_read16(o)
    }
    fn config_write16(&mut self, o: u16, v: u16) -> std::io::Result<()> {
        self.seen
            .writes_held
            .lock()
            .unwrap()
            .push(holds(&self.node));
        if let Some(n) = self.seen.after.lock().unwrap().as_mut() {
            *n += 1;
        }
        self.inner.config_write16(o, v)
    }
    fn map_bar(&mut self, bar: u8) -> qcom_reset::Result<(Box<dyn RegisterIo>, u64)> {
        let (inner, len) = self.inner.map_bar(bar)?;
        let io = AtVerify {
            inner,
            writes: 0,
            seq_writes: self.seq_writes,
            delayed: false,
            on_read: self.on_read.take().unwrap(),
            revoked: self.seen.revoked.clone(),
            dead: self.seen.dead.clone(),
        };
        Ok((Box::new(io), len))
    }
}

/// The fake /dev/vfio node of `bdf`'s group.
fn group_node(h: &FakeHost, bdf_s: &str) -> PathBuf {
    let link = fs::read_link(h.host.sysfs.root.join(bdf_s).join("iommu_group")).unwrap();
    h.host.dev_vfio.join(link.file_name().unwrap())
}

/// Whether this process has `path` open.
fn holds(path: &std::path::Path) -> bool {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .any(|p| p == path)
}

/// Resets the card at `at` through a [`VerifyHook`]; `on_read` gets what the hook sees.
fn reset_with_verify_hook(
    h: &FakeHost,
    access: &'static str,
    (at, card): (&str, &SimDevice),
    on_read: impl FnOnce(&Seen, PathBuf) -> Box<dyn FnMut() + Send>,
) -> (qcom_reset::Result<session::Report>, Seen) {
    let seen = Seen::default();
    let node = group_node(h, at);
    let mut backend = Some(VerifyHook {
        name: access,
        inner: card.clone(),
        node: node.clone(),
        seq_writes: if at == MODEM { 1 } else { 3 },
        on_read: Some(on_read(&seen, node)),
        seen: seen.clone(),
    });
    let r = session::reset(
        &h.host,
        &Request::new(bdf(at)),
        &mut move |_, own: &qcom_reset::host::own::Ownership| {
            // The VFIO backend takes a descriptor of the held group (access::open).
            if access == "vfio" {
                drop(own.group_fd());
            }
            Ok(Box::new(backend.take().unwrap()))
        },
        access,
    );
    (r, seen)
}

/// Records whether the group is held at each verification read.
fn note_held(seen: &Seen, node: PathBuf) -> Box<dyn FnMut() + Send> {
    let reads = seen.reads_held.clone();
    Box::new(move || reads.lock().unwrap().push(holds(&node)))
}

/// Issue 20: the verification only reads, for up to 1 s (WLAN) or 8 s (modem), so once a BAR
/// read answers (the BAR decodes at the kernel's address: the header is whole) the session
/// lets the VFIO group go (a VM starting then opens the card instead of failing with EBUSY) and takes it
/// back for the restore's writes. The modem's link drop reset its function: its first
/// verification read finds the header gone and repairs it with the group held (a VM must not
/// save a broken header as the state to put back), then reads on with it let go.
#[test]
fn the_group_is_let_go_once_the_card_is_settled_and_held_for_every_write() {
    capture_logs();
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    h.add(FakeDevice::modem(MODEM));
    let said_let_go = || {
        this_threads_log()
            .matches("VFIO group let go while the verification only reads")
            .count()
    };
    for (at, family) in [(WLAN, Family::Wlan), (MODEM, Family::Modem)] {
        let before = said_let_go();
        let card = sim(family, Faults::default());
        let (r, seen) = reset_with_verify_hook(&h, "sysfs", (at, &card), note_held);
        let r = r.unwrap();
        let reads = seen.reads_held.lock().unwrap().clone();
        // Held until a read shows the card settled, let go for every read after.
        let free = reads.iter().position(|held| !held);
        assert!(reads[0] && free.is_some(), "{at}: {reads:?}");
        assert!(
            reads[free.unwrap()..].iter().all(|held| !held),
            "{at}: held again: {reads:?}"
        );
        let writes = seen.writes_held.lock().unwrap().clone();
        assert!(
            !writes.is_empty() && writes.iter().all(|held| *held),
            "{at}: a config write without the group: {writes:?}"
        );
        assert_eq!(r.verdict().unwrap().health.to_string(), "clean");
        assert!(
            r.reset().unwrap().restored.command.is_some(),
            "PCI_COMMAND restored: {:?}",
            r.reset().unwrap().restored
        );
        assert!(!holds(&group_node(&h, at)), "let go at the end");
        assert!(!record_path(&h, at).exists());
        // The admin is told once that a VM may open the card now.
        assert_eq!(said_let_go(), before + 1, "{at}");
        if at == MODEM {
            assert!(
                !r.reset().unwrap().restored.config.is_empty(),
                "the header was repaired: {:?}",
                r.reset().unwrap().restored
            );
        }
    }
    // Through VFIO the device descriptor keeps the group busy: nothing is let go.
    let card = sim(Family::Wlan, Faults::default());
    let (r, seen) = reset_with_verify_hook(&h, "vfio", (WLAN, &card), note_held);
    r.unwrap();
    let before = said_let_go();
    let reads = seen.reads_held.lock().unwrap().clone();
    assert!(
        reads.iter().all(|held| *held),
        "VFIO access keeps its group: {reads:?}"
    );
    assert_eq!(said_let_go(), before, "nothing let go, nothing said");
}

/// Issue 20: a VM that opens the card while the verification has let the group go keeps it: no
/// verdict (the registers are its own now), not one config write after, and the
/// `driver_override` hold put back. The fake node cannot answer EBUSY, so a directory in its
/// place makes the open fail: an owner the session cannot name, whose card's power is left as
/// it is (the VM lab's `own` shows the kernel's EBUSY, the VM named and power/control restored).
#[test]
fn a_vm_that_opens_the_card_during_the_verification_keeps_it_untouched() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let (e, seen) = reset_with_verify_hook(&h, "sysfs", (WLAN, &card), |seen, node| {
        let (reads, after) = (seen.reads_held.clone(), seen.after.clone());
        Box::new(move || {
            let mut reads = reads.lock().unwrap();
            reads.push(holds(&node));
            // The first read the group is let go for: the VM opens it.
            if reads.len() == 2 {
                fs::remove_file(&node).unwrap();
                fs::create_dir(&node).unwrap();
                *after.lock().unwrap() = Some(0);
            }
        })
    });
    let e = e.unwrap_err();
    assert!(matches!(e, Error::Taken { .. }), "{e}");
    assert!(e.to_string().contains("Is a directory"), "{e}");
    assert_eq!(
        *seen.after.lock().unwrap(),
        Some(0),
        "config writes after the VM's open"
    );
    assert_eq!(
        h.read(WLAN, "power/control"),
        "on",
        "an unknown owner's power is left"
    );
    assert_eq!(
        h.read(WLAN, "driver_override"),
        "",
        "the session's hold is not left behind"
    );
    assert!(
        !record_path(&h, WLAN).exists(),
        "nothing left to restore for us"
    );
}

/// Issue 20 review: with CONFIG_IO_STRICT_DEVMEM (Debian's kernels) a VM that maps the BAR
/// during the verification makes the kernel revoke the session's sysfs mapping (SIGBUS, which
/// `io::revoke` turns into all-ones reads). The session stops reading at once and ends taken,
/// with no verdict and no config write after, even though the group could be taken back.
#[test]
fn a_revoked_bar_mapping_ends_the_session_as_taken() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let (e, seen) = reset_with_verify_hook(&h, "sysfs", (WLAN, &card), |seen, _| {
        let (revoked, after) = (seen.revoked.clone(), seen.after.clone());
        let mut n = 0;
        Box::new(move || {
            n += 1;
            if n == 2 {
                revoked.store(true, std::sync::atomic::Ordering::SeqCst);
                *after.lock().unwrap() = Some(0);
            }
        })
    });
    let e = e.unwrap_err();
    assert!(e.to_string().contains("claimed its BAR"), "{e}");
    assert_eq!(
        *seen.after.lock().unwrap(),
        Some(0),
        "config writes after the revocation"
    );
    assert!(!record_path(&h, WLAN).exists());
}

/// The kernel's answer to a group open while someone holds it, as the session's opener sees it
/// (a fake /dev cannot give EBUSY). `Holder::take` makes pid 4242 (`comm`) hold the group's
/// /dev/vfio node in the fake /proc and the opener answer EBUSY; `Holder::let_go` undoes both.
#[derive(Clone)]
struct Holder {
    busy: Arc<std::sync::atomic::AtomicBool>,
    pid_dir: PathBuf,
    node: PathBuf,
    comm: String,
}

impl Holder {
    fn new(h: &mut FakeHost, bdf_s: &str, comm: &str) -> Holder {
        let group = fs::read_link(h.host.sysfs.root.join(bdf_s).join("iommu_group")).unwrap();
        let holder = Holder {
            busy: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            pid_dir: h.root().join("proc/4242"),
            node: PathBuf::from("/dev/vfio").join(group.file_name().unwrap()),
            comm: comm.into(),
        };
        let b = holder.busy.clone();
        h.host.open_group = qcom_reset::host::own::GroupOpener::new(move |p| {
            if b.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(16)); // EBUSY
            }
            fs::File::options().read(true).write(true).open(p)
        });
        holder
    }

    fn take(&self) {
        fs::create_dir_all(self.pid_dir.join("fd")).unwrap();
        fs::write(self.pid_dir.join("comm"), format!("{}\n", self.comm)).unwrap();
        let _ = symlink(&self.node, self.pid_dir.join("fd/7"));
        self.busy.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn let_go(&self) {
        self.busy.store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = fs::remove_dir_all(&self.pid_dir);
    }
}

/// Issue 20 review: a VM opens the card (the kernel's EBUSY names it) while the verification
/// has let the group go, and the card stops answering under it: the session stops reading at
/// once, ends `taken` by that VM, writes no config word after, and still puts the host's
/// `power/control` back (vfio-pci holds a runtime-PM reference while the VM has the card).
#[test]
fn a_vm_named_by_ebusy_keeps_the_card_and_polling_stops_at_once() {
    capture_logs();
    let mut h = FakeHost::new();
    h.add(FakeDevice::default());
    let vm = Holder::new(&mut h, WLAN, "qemu-system-x86");
    let card = sim(Family::Wlan, Faults::default());
    let (e, seen) = reset_with_verify_hook(&h, "sysfs", (WLAN, &card), |seen, _| {
        let (reads, after, dead) = (
            seen.reads_held.clone(),
            seen.after.clone(),
            seen.dead.clone(),
        );
        Box::new(move || {
            let mut reads = reads.lock().unwrap();
            reads.push(false);
            if reads.len() == 2 {
                vm.take();
                dead.store(true, std::sync::atomic::Ordering::SeqCst);
                *after.lock().unwrap() = Some(0);
            }
        })
    });
    let e = e.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Taken {
                by: qcom_reset::session::Lost::Opened(_),
                ..
            }
        ) && e.to_string().contains("pid 4242 (qemu-system-x86)"),
        "{e}"
    );
    assert_eq!(
        seen.reads_held.lock().unwrap().len(),
        2,
        "reads after the VM took the card"
    );
    // The admin reads what was left to the VM: its config space, not the host's power policy.
    let log = this_threads_log();
    assert!(
        log.contains("/dev/vfio/12: its config space is left to it"),
        "{log}"
    );
    assert_eq!(
        *seen.after.lock().unwrap(),
        Some(0),
        "config writes after the VM's open"
    );
    assert_eq!(
        h.read(WLAN, "power/control"),
        "auto",
        "the host's power policy is put back"
    );
    assert!(!record_path(&h, WLAN).exists());
}

/// Issue 20 review: another qcom-reset session (a sibling function's, `status`) that opened the
/// group while it was let go is waited for, up to the lock wait, not taken for a VM; one that
/// outlasts the wait ends the session `taken`, named.
#[test]
fn a_sibling_session_holding_the_group_is_waited_for_up_to_the_lock_wait() {
    let mut h = FakeHost::new();
    h.add(FakeDevice::default());
    let sibling = Holder::new(&mut h, WLAN, "qcom-reset");
    let card = sim(Family::Wlan, Faults::default());
    // Held from the second verification read for 100 ms (the lock wait is 200 ms).
    let s = sibling.clone();
    let (r, _) = reset_with_verify_hook(&h, "sysfs", (WLAN, &card), move |_, _| {
        let mut n = 0;
        Box::new(move || {
            n += 1;
            if n == 2 {
                s.take();
                let s = s.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    s.let_go();
                });
            }
        })
    });
    let r = r.unwrap();
    assert_eq!(r.verdict().unwrap().health.to_string(), "clean");
    assert!(
        r.reset().unwrap().restored.command.is_some(),
        "{:?}",
        r.reset().unwrap().restored
    );
    // A sibling that never lets go.
    let started = std::time::Instant::now();
    let s = sibling.clone();
    let (e, _) = reset_with_verify_hook(&h, "sysfs", (WLAN, &card), move |_, _| {
        Box::new(move || s.take())
    });
    let e = e.unwrap_err();
    assert!(e.to_string().contains("pid 4242 (qcom-reset)"), "{e}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "waited {:?}",
        started.elapsed()
    );
    sibling.let_go();
}

/// The dry run plans the steps the real run then takes, in its order: the same session steps
/// (the register operations aside, which a healthy pretend card answers otherwise) and writes
/// the same registers in the same order. Cases: behind a guarded port on vfio-pci, a killed session's record left,
/// the kernel's `device_specific` made first, a modem whose runtime PM is already off.
#[test]
fn a_dry_run_plans_the_steps_the_real_run_takes() {
    let port_host = || host_behind_port(FakeDevice::default());
    let killed = || {
        let h = FakeHost::new();
        h.add(FakeDevice::default());
        let card = sim(Family::Wlan, Faults::default());
        leave_killed_session(&h, WLAN, &card, Vec::new());
        (h, card)
    };
    let kernel = || {
        let h = FakeHost::new();
        h.add(FakeDevice {
            reset_method: Some("bus device_specific"),
            ..Default::default()
        });
        h
    };
    let modem_on = || {
        let h = FakeHost::new();
        h.add(FakeDevice::modem(MODEM));
        fs::write(h.host.sysfs.root.join(MODEM).join("power/control"), "on").unwrap();
        h
    };
    let (killed_host, killed_card) = killed();
    let cases: Vec<(&str, FakeHost, SimDevice, &str)> = vec![
        (
            "port",
            port_host(),
            sim(Family::Wlan, Faults::default()),
            WLAN,
        ),
        ("killed", killed_host, killed_card, WLAN),
        (
            "kernel",
            kernel(),
            sim(Family::Wlan, Faults::default()),
            WLAN,
        ),
        (
            "modem",
            modem_on(),
            sim(Family::Modem, Faults::default()),
            MODEM,
        ),
    ];
    for (name, h, card, at) in cases {
        let via = card.name();
        let reset = |dry_run| {
            let c = card.clone();
            let req = Request {
                dry_run,
                ..Request::new(bdf(at))
            };
            session::reset(&h.host, &req, &mut move |_, _| Ok(Box::new(c.clone())), via)
        };
        let plan = reset(true).unwrap();
        let ran = reset(false).unwrap();
        let taken = &ran.reset().unwrap().steps;
        let planned: Vec<_> = plan
            .plan()
            .iter()
            .filter(|s| !matches!(s, session::Step::Register(_)))
            .cloned()
            .collect();
        let at = bdf(at);
        assert_eq!(planned.first(), Some(&session::Step::Lock(at)), "{name}");
        assert_eq!(planned.last(), Some(&session::Step::Unlock(at)), "{name}");
        assert_eq!(&planned[1..planned.len() - 1], &taken[..], "{name}");
        // The registers written, in order: a read-modify-write keeps the bits the card holds,
        // which the pretend card of the plan holds at 0.
        let writes = |ops: &[qcom_reset::device::regio::Op]| -> Vec<u32> {
            ops.iter()
                .filter_map(|o| match o {
                    qcom_reset::device::regio::Op::Write { offset, .. } => Some(*offset),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(writes(&plan.ops), writes(&ran.ops), "{name}");
        // Both lists come from the same conditions: what they say is checked here once.
        let masked = session::Step::MaskPort {
            port: bdf(PORT),
            hotplug: true,
            surprise_down: true,
        };
        let expect: &[session::Step] = match name {
            "port" => &[masked, session::Step::RestorePort(bdf(PORT))],
            "killed" => &[session::Step::Recover, session::Step::PowerOn],
            "kernel" => &[
                session::Step::OnlyDeviceSpecific,
                session::Step::KernelReset,
                session::Step::PutBackMethods("bus device_specific".into()),
            ],
            _ => &[],
        };
        for step in expect {
            assert!(taken.contains(step), "{name}: {step:?} not in {taken:?}");
        }
        let woke = taken.contains(&session::Step::PowerOn);
        assert_eq!(woke, name != "modem", "{name}: power/control already on");
    }
}

/// A dry run refuses what the real run would refuse: a port whose reaction to the link drop
/// the request does not allow, a crash record it cannot read.
#[test]
fn a_dry_run_refuses_what_the_real_run_refuses() {
    let h = behind_a_polled_slot();
    let card = sim(Family::Wlan, Faults::default());
    let dry = Request {
        dry_run: true,
        ..Request::new(bdf(WLAN))
    };
    let e = reset_with(&h, &dry, &card).unwrap_err();
    assert!(matches!(e, Error::PciehpPolls { .. }), "{e}");
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    fs::write(record_path(&h, WLAN), "{ torn").unwrap();
    let e = reset_with(&h, &dry, &card).unwrap_err();
    assert!(matches!(e, Error::BadRecord { .. }), "{e}");
    assert_eq!(config_writes(&card), 0);
}

/// Review finding (stop 34): a session that ends between the kernel reset's `reset_method` swap
/// and its unswap (an error, a panic) puts the kernel's list back at restore. Before, the
/// restore removed the record and the card kept `device_specific` as its only method.
#[test]
fn a_session_ending_with_the_methods_swapped_puts_them_back() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        reset_method: Some("bus device_specific"),
        ..Default::default()
    });
    let mut s = begin_wlan_session(&h, session::guard::Writes::Allowed);
    s.swap_reset_method("bus device_specific".into()).unwrap();
    assert_eq!(h.read(WLAN, "reset_method"), "device_specific");
    drop(s);
    assert_eq!(h.read(WLAN, "reset_method"), "bus device_specific");
    assert!(!record_path(&h, WLAN).exists(), "everything is back");
}

/// Review finding (stop 34): a dry run that cannot read the upstream port (a user other than
/// root sees 64 bytes of it) still plans, naming what is unknown; the reset itself refuses.
#[test]
fn a_dry_run_names_an_unreadable_port_and_the_reset_refuses() {
    let h = host_behind_port(FakeDevice::default());
    let cfg = h.host.sysfs.root.join(PORT).join("config");
    fs::remove_file(&cfg).unwrap();
    fs::create_dir(&cfg).unwrap();
    let card = sim(Family::Wlan, Faults::default());
    let dry = Request {
        dry_run: true,
        ..Request::new(bdf(WLAN))
    };
    let r = reset_with(&h, &dry, &card).unwrap();
    assert!(
        matches!(r.plan()[1], session::Step::PortUnread(_)),
        "{:?}",
        r.plan()
    );
    assert!(r.port.is_none());
    let e = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap_err();
    assert!(matches!(e, Error::SysfsRead { .. }), "{e}");
    assert_eq!(card.with_model(|m| m.writes.len()), 0, "no register write");
}

/// Review finding (stop 34): a killed session's record names a port other than the card's
/// upstream one now (the bus numbered anew since). The session locks both ports: before, the
/// recovered port's lock stood in for the upstream port's, which was then masked without its
/// own lock, and a second card below it could record the masked values as its baseline.
#[test]
fn a_recovered_port_elsewhere_does_not_stand_in_for_the_upstream_ports_lock() {
    const PORT2: &str = "0000:00:1d.0";
    let h = host_behind_port(FakeDevice::default());
    let other = h.host.sysfs.root.join(PORT2);
    fs::create_dir_all(&other).unwrap();
    fs::copy(
        h.host.sysfs.root.join(PORT).join("config"),
        other.join("config"),
    )
    .unwrap();
    let card = sim(Family::Wlan, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![]);
    record_masked_port_at(&h, PORT2);
    let dry = Request {
        dry_run: true,
        ..Request::new(bdf(WLAN))
    };
    let c = card.clone();
    let plan = session::reset(
        &h.host,
        &dry,
        &mut move |_, _| Ok(Box::new(c.clone())),
        "hooked",
    )
    .unwrap();
    let (run_dir, held) = (h.host.run_dir.clone(), Arc::new(Mutex::new(None)));
    let seen = held.clone();
    let r = reset_changing_at_map(&h, &card, move || {
        let free = DeviceLock::acquire(&run_dir, bdf(PORT), Duration::ZERO).is_ok();
        *seen.lock().unwrap() = Some(!free);
    })
    .unwrap();
    assert_eq!(
        *held.lock().unwrap(),
        Some(true),
        "the upstream port's lock is held while its reports are masked"
    );
    let steps = &r.reset().unwrap().steps;
    for p in [PORT2, PORT] {
        assert!(
            steps.contains(&session::Step::LockPort(bdf(p))),
            "{steps:?}"
        );
    }
    let planned: Vec<_> = plan.plan()[1..plan.plan().len() - 1]
        .iter()
        .filter(|s| !matches!(s, session::Step::Register(_)))
        .cloned()
        .collect();
    assert_eq!(&planned, steps, "the plan foresees both locks");
    assert_eq!(port_regs(&h), (0x1038, 0), "the upstream port is back");
}

/// Mutation run (stop 34): a card whose config space answers with other IDs than sysfs showed
/// gets no header repair when its link drop takes the BARs: config words are put back only
/// onto the function the baseline was taken from (the final restore's, after the verdict, is
/// the only one). It ends `wrong-identity`.
#[test]
fn a_card_answering_with_other_ids_gets_no_header_repair() {
    capture_logs();
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = SimDevice::new(qcom_reset::sim::Model::new(
        Family::Wlan,
        0x17cb,
        0x1107,
        SimState::Crashed,
        Faults::default(),
    ));
    let r = reset_with(&h, &Request::new(bdf(WLAN)), &card).unwrap();
    let v = r.verdict().unwrap();
    assert_eq!(
        v.health,
        qcom_reset::device::verdict::Health::WrongIdentity,
        "{}",
        v.detail
    );
    let log = this_threads_log();
    assert!(!log.contains("header restored"), "{log}");
}

/// Mutation run (stop 34): the line that says why a session writes no more comes with the
/// first word of the loss, not with a repeat of it.
#[test]
fn a_session_says_at_once_that_its_card_was_taken() {
    capture_logs();
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let s = begin_wlan_session(&h, session::guard::Writes::None);
    let e = s.lost(session::Lost::Gone);
    assert!(matches!(e, Error::Taken { .. }), "{e}");
    let log = this_threads_log();
    assert!(
        log.contains(
            "taken by nobody: it left the bus during the session: nothing more is written to it"
        ),
        "{log}"
    );
}

/// A session on the WLAN card of `h` (a simulated card behind it), begun as the library's
/// entry points begin one.
fn begin_wlan_session(h: &FakeHost, writes: session::guard::Writes) -> session::guard::Session {
    let dev = h.host.sysfs.device(bdf(WLAN)).unwrap();
    let own = qcom_reset::host::own::Ownership::take(
        &h.host.dev_vfio,
        &h.host.proc_root,
        &dev,
        &h.host.open_group,
    )
    .unwrap();
    let card = Box::new(sim(Family::Wlan, Faults::default()));
    let (s, _) = session::guard::Session::begin(
        &dev,
        h.host.run_dir.clone(),
        Duration::ZERO,
        own,
        card,
        writes,
    )
    .unwrap();
    s
}

/// Mutation run (stop 34): a lock wait says once whom it waits for, when it begins, not at
/// every 50 ms poll after the first.
#[test]
fn a_lock_wait_says_once_whom_it_waits_for() {
    capture_logs();
    let h = FakeHost::new();
    let _held = DeviceLock::acquire(&h.host.run_dir, bdf(WLAN), Duration::ZERO).unwrap();
    let before = this_threads_log().matches("waiting up to").count();
    let e = DeviceLock::acquire(&h.host.run_dir, bdf(WLAN), Duration::from_millis(180));
    assert!(e.is_err(), "the lock is held");
    assert_eq!(
        this_threads_log().matches("waiting up to").count(),
        before + 1
    );
}
