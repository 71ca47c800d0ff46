//! Putting back what a session changed or a reset lost, in the kernel's order; and what a
//! killed session's record left, for a card that is present or gone.
use std::time::Duration;

use tracing::warn;

use super::guard::{HOLD_OVERRIDE, Restored, Session};
use super::owner::Lost;
use super::port;
use super::record::{self, Record};
use super::step::Step;
use crate::access::Backend;
use crate::bdf::Bdf;
use crate::host::lock::DeviceLock;
use crate::host::sysfs::{Override, SysfsDevice};
use crate::pci::*;
use crate::{Error, GuardFailure, Result};

impl Session {
    /// Puts back everything the session changed or the reset lost; idempotent. The record is
    /// removed only by the session that wrote it and only once everything is back.
    pub fn restore(&mut self) -> Restored {
        if let Some(r) = &self.restored {
            return r.clone();
        }
        let mut r = Restored {
            config: std::mem::take(&mut self.repaired),
            ..Restored::default()
        };
        if let Some(b) = self.baseline.clone() {
            let mode = if self.link_dropped {
                Words::All
            } else {
                Words::None
            };
            // A group the verification let go comes back first; failing that, its new holder
            // keeps the card as it is.
            let _ = self.take_back();
            let lost = self.lost_to();
            let steps = put_back(&self.dev, self.backend.as_mut(), lost, &b, mode, &mut r);
            self.steps.extend(steps);
            // The kernel's reset ended (an error, a panic) before its list was put back.
            if let Some(m) = &b.reset_method {
                match self.dev.write("reset_method", m) {
                    Ok(()) => self.took(Step::PutBackMethods(m.clone())),
                    Err(e) => r.errors.push(e.to_string()),
                }
            }
            report(self.bdf, &r);
            if r.errors.is_empty() {
                record::remove(&self.run_dir, self.bdf);
            }
        }
        self.restored = Some(r.clone());
        r
    }

    /// Restores the record a killed session left for this device, if any, and returns it with
    /// the original `driver_override` it carried (the baseline keeps that, not our hold).
    /// Refused when the card belongs to a host driver (the record waits) and when anything
    /// could not be put back (the record stays for a person to finish).
    pub(super) fn recover(&mut self) -> Result<(Option<Restored>, Option<Option<Override>>)> {
        let path = record::path(&self.run_dir, self.bdf);
        let Some(mut rec) = record::load(&self.run_dir, self.bdf)? else {
            return Ok((None, None));
        };
        // The port first, whoever has the card now: its masked hotplug events and Surprise Down
        // hide every later unplug and link failure of the slot.
        let port = self.recover_port(&mut rec)?;
        if let Some(driver) = self.watch.host_driver() {
            return Err(Error::RecordWaits {
                bdf: self.bdf,
                path,
                driver: driver.to_string(),
            });
        }
        if rec.driver_override.is_none() {
            rec.driver_override = original_override(&self.dev)?;
            record::save(&self.run_dir, &rec)?;
        }
        self.hold_off_drivers()?;
        let bars = self.dev.bar_starts().unwrap_or_default();
        let mode = if rec.bars_match(&bars) {
            Words::All
        } else {
            Words::AllButBars
        };
        let mut r = Restored {
            port,
            ..Restored::default()
        };
        put_back(
            &self.dev,
            self.backend.as_mut(),
            self.watch.lost(),
            &rec,
            mode,
            &mut r,
        );
        if let Some(m) = &rec.reset_method
            && let Err(e) = self.dev.write("reset_method", m)
        {
            r.errors.push(e.to_string());
        }
        warn!(
            bdf = %self.bdf,
            "recovered the state a killed qcom-reset (pid {}) left: PCI_COMMAND {:?}, power/control {:?}, config [{}], port [{}]{}",
            rec.pid,
            r.command,
            r.power_control,
            r.config.join(", "),
            r.port.join(", "),
            if r.errors.is_empty() { String::new() } else { format!("; errors: {}", r.errors.join("; ")) }
        );
        if !r.errors.is_empty() {
            // The card is not held off its drivers while the record waits for a person.
            release_drivers(&self.dev, &rec, &mut Restored::default());
            return Err(Error::RecoveryIncomplete {
                bdf: self.bdf,
                path,
                left: r.errors.join("; "),
            });
        }
        self.took(Step::Recover);
        Ok((Some(r), Some(rec.driver_override)))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.restore();
    }
}

impl Session {
    /// Restores a killed session's port values by address under the port's lock and takes them
    /// out of its record, so they are back even while the rest of the record waits.
    pub(super) fn recover_port(&mut self, rec: &mut Record) -> Result<Vec<String>> {
        let Some(p) = rec.port.clone() else {
            return Ok(Vec::new());
        };
        self.lock_port(p.port)?;
        match restore_port(&self.dev, &p) {
            Ok(done) => {
                rec.port = None;
                record::save(&self.run_dir, rec)?;
                Ok(done)
            }
            Err(e) => Err(Error::RecoveryIncomplete {
                bdf: self.bdf,
                path: record::path(&self.run_dir, self.bdf),
                left: format!("upstream port: {e}"),
            }),
        }
    }
}

/// A killed session's record for a card that is no longer on the bus: its port values go back
/// by address (the slot's hotplug events are what lets the card come back) and the record goes
/// with them; the card's own config and power state left with it.
pub fn recover_absent(
    run_dir: &std::path::Path,
    sysfs: &crate::host::sysfs::PciSysfs,
    bdf: Bdf,
) -> Result<Restored> {
    let path = record::path(run_dir, bdf);
    let Some(rec) = record::load(run_dir, bdf)? else {
        return Ok(Restored::default());
    };
    let dev = SysfsDevice {
        bdf,
        dir: sysfs.root.join(bdf.to_string()),
    };
    let mut r = Restored::default();
    if let Some(p) = &rec.port {
        let _lock = DeviceLock::acquire(run_dir, p.port, Duration::ZERO)?;
        r.port = restore_port(&dev, p).map_err(|e| Error::RecoveryIncomplete {
            bdf,
            path: path.clone(),
            left: format!("upstream port: {e}"),
        })?;
    }
    warn!(bdf = %bdf, "a killed qcom-reset (pid {}) left a record for a card no longer on the bus: port [{}] restored, record removed", rec.pid, r.port.join(", "));
    record::remove(run_dir, bdf);
    Ok(r)
}

/// The override to record: the current one, unless it is a killed session's hold whose record
/// is gone (then nothing was set before it).
pub(super) fn original_override(dev: &SysfsDevice) -> Result<Option<Override>> {
    Ok(dev.driver_override()?.map(|o| match o {
        Override::Driver(d) if d == HOLD_OVERRIDE => Override::Unset,
        o => o,
    }))
}

pub(super) fn report(bdf: Bdf, r: &Restored) {
    for e in &r.errors {
        warn!(bdf = %bdf, "post: restore failed: {e}");
    }
    if !r.config.is_empty() {
        warn!(bdf = %bdf, "post: the link dropped; config restored: {}", r.config.join(", "));
    }
}

/// Which saved config words go back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Words {
    /// The link did not drop: config space is as the session found it but for PCI_COMMAND.
    None,
    /// After a link drop, every saved word (the kernel's `pci_restore_state`).
    All,
    /// A killed session's record whose BAR addresses the kernel no longer assigns.
    AllButBars,
}

/// Restores a record in the kernel's order: config words and PCI_COMMAND (unless a new driver
/// has the card: its config space is its own), the upstream port by its recorded address (the
/// card may be gone), then `power/control`, then the `driver_override` the session replaced.
/// Returns the steps it took.
pub(super) fn put_back(
    dev: &SysfsDevice,
    backend: &mut dyn Backend,
    lost: Option<Lost>,
    b: &Record,
    mode: Words,
    r: &mut Restored,
) -> Vec<Step> {
    let mut steps = Vec::new();
    match &lost {
        None => {
            restore_config(backend, b, mode, r);
            steps.push(Step::RestoreConfig(backend.name()));
        }
        Some(l) => {
            let left = match l {
                Lost::Opened(_) => "its config space is left to it",
                _ => "its config space and power are left to it",
            };
            warn!(bdf = %b.bdf, "the card was taken by {l}: {left}");
            r.taken_by = Some(l.to_string());
        }
    }
    if let Some(p) = &b.port {
        match restore_port(dev, p) {
            Ok(done) => r.port = done,
            Err(e) => r.errors.push(format!("upstream port: {e}")),
        }
        steps.push(Step::RestorePort(p.port));
    }
    // vfio-pci holds a runtime-PM reference while a VFIO user has the card open: its
    // power/control policy is still the host's to put back. A driver's card is the driver's.
    if matches!(lost, None | Some(Lost::Opened(_)))
        && let Some(p) = &b.power_control
    {
        match dev.write("power/control", p) {
            Ok(()) => r.power_control = Some(p.clone()),
            Err(e) => r.errors.push(e.to_string()),
        }
        steps.push(Step::RestorePower(p.clone()));
    }
    if b.driver_override.is_some() {
        steps.push(Step::ReleaseDrivers);
    }
    release_drivers(dev, b, r);
    steps
}

/// Puts the recorded `driver_override` back, unless someone set another one since (libvirt's
/// reattach does): that one is theirs.
pub(super) fn release_drivers(dev: &SysfsDevice, b: &Record, r: &mut Restored) {
    let Some(original) = &b.driver_override else {
        return;
    };
    if !dev.present() {
        return;
    }
    match dev.driver_override() {
        Ok(Some(Override::Driver(d))) if d == HOLD_OVERRIDE => {
            if let Err(e) = dev.write("driver_override", original.sysfs_value()) {
                r.errors.push(e.to_string());
            }
        }
        Ok(_) => {}
        Err(e) => r.errors.push(e.to_string()),
    }
}

/// Writes back the saved words that differ, then PCI_COMMAND as recorded. A register with a
/// non-zero reset value (Device Control's MPS, a small BAR's type bits, Link Control 2) is
/// restored like any other.
pub(super) fn restore_config(backend: &mut dyn Backend, b: &Record, mode: Words, r: &mut Restored) {
    let words: Vec<(u16, u16)> = match mode {
        Words::None => Vec::new(),
        Words::All => b.config.clone(),
        Words::AllButBars => b
            .config
            .iter()
            .copied()
            .filter(|(off, _)| !record::BAR_WORDS.contains(off))
            .collect(),
    };
    let differ = differing(backend, words);
    write_back(backend, differ, b.command, r);
}

/// The saved words that read otherwise now, as (offset, now, saved), in `pci_restore_state`'s
/// order: the PCIe control words (all above the 64-byte header) first, in the order of the
/// capability (Device Control before Link Control before their "2"s), then the header from the
/// top down.
pub(super) fn differing(
    backend: &mut dyn Backend,
    mut words: Vec<(u16, u16)>,
) -> Vec<(u16, u16, u16)> {
    words.sort_by_key(|&(off, _)| {
        if off >= 0x40 {
            (false, i32::from(off))
        } else {
            (true, -i32::from(off))
        }
    });
    words
        .into_iter()
        .filter_map(|(off, want)| {
            let now = backend.config_read16(off).ok()?;
            (now != want).then_some((off, now, want))
        })
        .collect()
}

/// Writes `differ` back with decoding off, then `command` last: a BAR is never moved while the
/// card decodes, and the card never decodes before its PCIe control words are back. Each word
/// is read back; returns the offsets that did not take.
pub(super) fn write_back(
    backend: &mut dyn Backend,
    differ: Vec<(u16, u16, u16)>,
    command: Option<u16>,
    r: &mut Restored,
) -> Vec<u16> {
    let mut not_taken = Vec::new();
    if !differ.is_empty() {
        let cmd = backend.config_read16(PCI_COMMAND).unwrap_or(0);
        if let Err(e) = backend.config_write16(PCI_COMMAND, cmd & !DECODE_AND_MASTER) {
            r.errors.push(format!("PCI_COMMAND (decoding off): {e}"));
        }
    }
    for (off, now, want) in differ {
        if let Err(e) = backend.config_write16(off, want) {
            r.errors.push(format!("config {off:#04x}: {e}"));
            continue;
        }
        match backend.config_read16(off) {
            Ok(v) if v == want => r
                .config
                .push(format!("{off:#04x}: {now:#06x} -> {want:#06x}")),
            Ok(v) => {
                not_taken.push(off);
                r.not_taken
                    .push(format!("{off:#04x} reads {v:#06x}, not {want:#06x}"));
            }
            Err(e) => r.errors.push(format!("config {off:#04x} (read back): {e}")),
        }
    }
    if let Some(cmd) = command {
        match backend.config_write16(PCI_COMMAND, cmd) {
            Ok(()) => r.command = Some(cmd),
            Err(e) => r.errors.push(format!("PCI_COMMAND: {e}")),
        }
    }
    not_taken
}

/// The port's sysfs config for masking, checked to be the bridge above the card now.
pub(super) fn port_config(
    dev: &SysfsDevice,
    want: Bdf,
) -> std::result::Result<crate::pci::SysfsConfig, GuardFailure> {
    let p = port::upstream(dev)
        .filter(|p| p.bdf == want)
        .ok_or(GuardFailure::NotAbove)?;
    crate::pci::SysfsConfig::open(&p.path("config"), true).map_err(GuardFailure::Io)
}

/// Restores the port by its recorded address, checked by its IDs: the card below it may have
/// left the bus (that is when the port's hotplug events matter most).
pub(super) fn restore_port(
    dev: &SysfsDevice,
    p: &port::PortRecord,
) -> std::result::Result<Vec<String>, String> {
    let path = dev.sibling(p.port).path("config");
    let mut cfg = crate::pci::SysfsConfig::open(&path, true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    p.same_port(&mut cfg)?;
    p.restore(&mut cfg)
}

/// PCI_COMMAND I/O, memory and bus-master enables.
pub(super) const DECODE_AND_MASTER: u16 = 0x0007;
pub(super) const ALL_ONES16: u16 = 0xffff;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Family;
    use crate::sim::{Faults, Model, SimDevice, SimState};

    /// A backend that logs its config writes.
    struct Logged {
        inner: SimDevice,
        writes: Vec<(u16, u16)>,
    }

    impl Backend for Logged {
        fn name(&self) -> &'static str {
            "logged"
        }
        fn config_read16(&mut self, o: u16) -> std::io::Result<u16> {
            self.inner.config_read16(o)
        }
        fn config_write16(&mut self, o: u16, v: u16) -> std::io::Result<()> {
            self.writes.push((o, v));
            self.inner.config_write16(o, v)
        }
        fn map_bar(
            &mut self,
            bar: u8,
        ) -> crate::Result<(Box<dyn crate::device::regio::RegisterIo>, u64)> {
            self.inner.map_bar(bar)
        }
    }

    fn card() -> Logged {
        let mut dev = SimDevice::new(Model::new(
            Family::Wlan,
            0x17cb,
            0x1103,
            SimState::Mission,
            Faults::default(),
        ));
        dev.config_write16(PCI_COMMAND, 0x0406).unwrap();
        dev.config_write16(0x3c, 0x0105).unwrap(); // interrupt line changed: pin stays 1
        dev.config_write16(0x12, 0).unwrap();
        dev.config_write16(0x58, 0x2810).unwrap(); // Device Control: MPS back to 128
        Logged {
            inner: dev,
            writes: Vec::new(),
        }
    }

    fn rec() -> Record {
        Record {
            bdf: "0000:03:00.0".parse().unwrap(),
            pid: 1,
            command: Some(0x0400),
            power_control: None,
            config: vec![
                (0x10, 0x0004),
                (0x12, 0xfe00),
                (0x3c, 0x010b),
                (0x58, 0x2830),
            ],
            port: None,
            driver_override: None,
            bar_starts: Vec::new(),
            reset_method: None,
        }
    }

    /// After a link drop every saved word that differs goes back, whatever it reads now (a
    /// register with a non-zero reset value such as Device Control at 0x58 or a BAR's type
    /// bits is no exception), decoding off first, the PCIe words, then the header from the top
    /// down, PCI_COMMAND last: `pci_restore_state`'s order.
    #[test]
    fn after_a_link_drop_every_saved_word_goes_back_in_the_kernels_order() {
        let mut c = card();
        let mut r = Restored::default();
        restore_config(&mut c, &rec(), Words::All, &mut r);
        // 0x10 reads as saved: not written. 0x3c reads 0x0105 (not 0): written all the same.
        assert_eq!(
            c.writes,
            [
                (4, 0x0400),
                (0x58, 0x2830),
                (0x3c, 0x010b),
                (0x12, 0xfe00),
                (4, 0x0400)
            ]
        );
        assert_eq!(r.command, Some(0x0400));
        assert_eq!(c.inner.config_read16(0x3c).unwrap(), 0x010b);
        assert_eq!(
            r.config,
            [
                "0x58: 0x2810 -> 0x2830",
                "0x3c: 0x0105 -> 0x010b",
                "0x12: 0x0000 -> 0xfe00"
            ]
        );
    }

    /// The kernel writes the PCIe capability's control words in its own order (Device Control,
    /// Link Control, then Device Control 2, Link Control 2), then the header from the top down.
    #[test]
    fn the_pcie_words_go_back_in_capability_order_before_the_header() {
        let mut c = card();
        for (off, v) in [(0x58, 0x2810), (0x60, 0x0000), (0x78, 0x0000)] {
            c.inner.config_write16(off, v).unwrap();
        }
        let mut b = rec();
        b.config = vec![
            (0x78, 0x0010),
            (0x12, 0xfe00),
            (0x58, 0x2830),
            (0x60, 0x0040),
        ];
        let mut r = Restored::default();
        restore_config(&mut c, &b, Words::All, &mut r);
        let order: Vec<u16> = c.writes.iter().map(|&(o, _)| o).collect();
        assert_eq!(order, [4, 0x58, 0x60, 0x78, 0x12, 4], "{r:?}");
    }

    /// Without a link drop config space is the session's baseline but for PCI_COMMAND: only
    /// that goes back. A killed session's record whose BARs the kernel moved keeps its BAR
    /// words to itself.
    #[test]
    fn without_a_link_drop_only_the_command_goes_back_and_moved_bars_never() {
        let mut c = card();
        let mut r = Restored::default();
        restore_config(&mut c, &rec(), Words::None, &mut r);
        assert_eq!(c.writes, [(4, 0x0400)]);
        assert!(r.config.is_empty());
        let mut c = card();
        let mut r = Restored::default();
        restore_config(&mut c, &rec(), Words::AllButBars, &mut r);
        assert!(
            !c.writes.iter().any(|&(o, _)| (0x10..0x28).contains(&o)),
            "{:?}",
            c.writes
        );
        assert_eq!(
            c.writes,
            [(4, 0x0400), (0x58, 0x2830), (0x3c, 0x010b), (4, 0x0400)]
        );
        assert!(
            !rec().bars_match(&[]),
            "a record without addresses never matches"
        );
        let with = Record {
            bar_starts: vec![0xfe00_0000, 0],
            ..rec()
        };
        assert!(with.bars_match(&[0xfe00_0000, 0]) && !with.bars_match(&[0xfd00_0000, 0]));
    }
}
