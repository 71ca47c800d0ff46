//! One device session, in the order a reset runs it: **own** the device (its VFIO group held
//! open, [`own`]), **recover** what a killed session left ([`record`]), **save** the baseline to
//! disk before the first write, wake it, then (the caller) reset and verify, and **restore**
//! PCI_COMMAND, `power/control` and every config word the reset lost, on every path: errors,
//! panics (drop) and, through the record, SIGKILL.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::warn;

use super::owner::{Lost, OwnerWatch};
use super::port;
use super::record::{self, Record};
use super::restore::{ALL_ONES16, differing, original_override, port_config, write_back};
use super::step::Step;
use crate::access::Backend;
use crate::bdf::Bdf;
use crate::host::lock::DeviceLock;
use crate::host::own::Ownership;
use crate::host::sysfs::{Override, SysfsDevice};
use crate::pci::*;
use crate::{Error, GuardFailure, Result};

/// The `driver_override` a session puts on its card: no driver has this name, so nothing binds
/// the card by itself meanwhile (autoprobe, vfio-pci's `ids=`/`new_id`, a write to a driver's
/// `bind`) until the session puts the recorded value back. Tools that bind on purpose (libvirt's
/// managed hostdevs, driverctl) write their own override first; [`OwnerWatch`] catches those.
pub const HOLD_OVERRIDE: &str = "qcom-reset-session";

/// What a session put back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Restored {
    /// PCI_COMMAND as put back.
    pub command: Option<u16>,
    /// `power/control` as put back.
    pub power_control: Option<String>,
    /// Config words put back after the link dropped (e.g. its BARs after the WLAN global
    /// reset), as "offset: now -> restored".
    pub config: Vec<String>,
    /// Config words written that read back otherwise (VFIO passes only some words through to
    /// the card, e.g. not Link Control), as "offset reads X, not Y": not restored, not retried.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_taken: Vec<String>,
    /// Upstream port registers put back after the link drop (hotplug events, AER mask).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<String>,
    /// Who took the card during the session: nothing more was written to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken_by: Option<String>,
    /// What could not be put back.
    pub errors: Vec<String>,
}

/// Whether the session may write to the device at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    /// Wake it, enable decoding, reset: the baseline is saved to disk first.
    Allowed,
    /// Observe-only: read what can be read without a single write.
    None,
}

/// Config space, power and the BAR for the duration of a sequence; restores on drop.
pub struct Session {
    /// The card.
    pub bdf: Bdf,
    pub(super) dev: SysfsDevice,
    /// How its registers are reached.
    pub backend: Box<dyn Backend>,
    pub(super) run_dir: PathBuf,
    pub(super) lock_wait: Duration,
    pub(super) watch: OwnerWatch,
    pub(super) baseline: Option<Record>,
    /// The link dropped (or the kernel reset the function): every saved word goes back.
    pub(super) link_dropped: bool,
    /// Config words the header repair put back mid-sequence, for the session's report.
    pub(super) repaired: Vec<String>,
    pub(super) restored: Option<Restored>,
    /// A VM opened the card while its group was let go: nothing more is written to it.
    pub(super) taken: Option<Lost>,
    /// The verification runs (between [`Session::begin_verification`] and
    /// [`Session::take_back`]): the group is let go while the card is settled.
    pub(super) verifying: bool,
    pub(super) said_let_go: bool,
    /// The steps taken, in order, for the report.
    pub(super) steps: Vec<Step>,
    /// The port locks held: the upstream port's while its reports are masked (two targets below
    /// one port never record each other's masked state), and a killed session's recorded port
    /// while it is put back (the same port, unless the bus was numbered anew since).
    pub(super) port_locks: Vec<(Bdf, DeviceLock)>,
    /// Held until the session ends (let go only while the verification reads): nothing else
    /// can open the device while the session writes.
    pub(super) own: Ownership,
}

impl Session {
    /// Recovers a dead session's record, saves the baseline, holds drivers off, wakes the
    /// device. Returns what was recovered, if anything. The caller holds the device's lock.
    pub fn begin(
        dev: &SysfsDevice,
        run_dir: PathBuf,
        lock_wait: Duration,
        own: Ownership,
        backend: Box<dyn Backend>,
        writes: Writes,
    ) -> Result<(Session, Option<Restored>)> {
        let mut s = Session {
            bdf: dev.bdf,
            dev: dev.clone(),
            backend,
            run_dir,
            lock_wait,
            watch: OwnerWatch::new(dev, own.driver()),
            baseline: None,
            link_dropped: false,
            repaired: Vec::new(),
            restored: None,
            taken: None,
            verifying: false,
            said_let_go: false,
            steps: Vec::new(),
            port_locks: Vec::new(),
            own,
        };
        if writes == Writes::None {
            return Ok((s, None));
        }
        if s.own.group_path().is_some() {
            s.took(Step::HoldGroup);
        }
        // Rebound between the ownership check and now: not one write.
        s.still_owned()?;
        let (recovered, original) = s.recover()?;
        s.save_baseline(original)?;
        if s.hold_off_drivers()? {
            s.took(Step::HoldOffDrivers);
        }
        // vfio-pci lets an unused device idle in D3hot, where MMIO reads all-ones.
        if s.baseline
            .as_ref()
            .is_some_and(|b| b.power_control.is_some())
        {
            s.dev.write("power/control", "on")?;
            s.took(Step::PowerOn);
        }
        s.wait_d0()?;
        Ok((s, recovered))
    }

    /// The record on disk before the first write of this session.
    pub(super) fn save_baseline(&mut self, original: Option<Option<Override>>) -> Result<()> {
        let command =
            self.backend
                .config_read16(PCI_COMMAND)
                .map_err(|source| Error::SysfsRead {
                    path: self.dev.path("config"),
                    err: source,
                })?;
        let driver_override = match original {
            Some(o) => o,
            None => original_override(&self.dev)?,
        };
        let resources = self.dev.bar_resources().unwrap_or_default();
        let mut config = record::snapshot(self.backend.as_mut());
        let filled = record::fill_lost_bars(&mut config, &resources);
        for off in filled {
            warn!(bdf = %self.bdf, "BAR word {off:#04x} reads 0 although the kernel assigned an address (a link drop reset the function earlier): recorded with the kernel's address, to put back");
        }
        let baseline = Record {
            bdf: self.bdf,
            pid: std::process::id(),
            // All-ones: the link is down and there is no command register to bring back.
            command: (command != 0xffff).then_some(command),
            power_control: self.dev.power_control()?.filter(|p| p != "on"),
            config,
            port: None,
            driver_override,
            bar_starts: resources.iter().map(|r| r.0).collect(),
            reset_method: None,
        };
        record::save(&self.run_dir, &baseline)?;
        self.baseline = Some(baseline);
        self.took(Step::SaveRecord);
        Ok(())
    }

    /// Sets [`HOLD_OVERRIDE`] once the original is on disk (in the baseline or the record
    /// being recovered). False on a kernel without `driver_override` (before 3.16).
    pub(super) fn hold_off_drivers(&self) -> Result<bool> {
        match self.dev.driver_override()? {
            None => Ok(false),
            Some(_) => self
                .dev
                .write("driver_override", HOLD_OVERRIDE)
                .map(|()| true),
        }
    }

    /// Records a step taken, for the report.
    pub(super) fn took(&mut self, step: Step) {
        self.steps.push(step);
    }

    /// Waits for D0, except for a card off the link: its PMCSR reads all-ones, which the
    /// kernel reports as D3cold (`pci_update_current_state`); the sequence's first read and the
    /// verdict then say "link down" instead of a power state that hides the cause.
    pub(super) fn wait_d0(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_millis(200);
        while let Some(state) = self.dev.power_state()?.filter(|st| st != "D0") {
            if self.config_ids().0 == 0xffff {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotD0 {
                    bdf: self.bdf,
                    state,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The IDs config space answers with now; all-ones while the card is off the link. Through
    /// VFIO the ID registers are vfio-pci's virtualized copy, which answers whatever the link
    /// does, so the class word (passed through, never 0xffff on a real function) decides first
    /// whether anything answered.
    pub fn config_ids(&mut self) -> (u16, u16) {
        if self
            .backend
            .config_read16(PCI_CLASS_DEVICE)
            .unwrap_or(0xffff)
            == 0xffff
        {
            return (0xffff, 0xffff);
        }
        let v = self.backend.config_read16(PCI_VENDOR_ID).unwrap_or(0xffff);
        let d = self.backend.config_read16(PCI_DEVICE_ID).unwrap_or(0xffff);
        (v, d)
    }

    /// The sequence dropped the link (or the kernel reset the function): the config header and
    /// PCIe control words are put back at restore, like `pci_restore_state`.
    pub fn saw_link_drop(&mut self) {
        self.link_dropped = true;
    }

    /// The link is back (config space answers with the card's IDs) but MMIO reads all-ones and
    /// a BAR or memory decoding is gone: the function reset of the link drop took the header.
    /// Puts back every saved word that differs, in `pci_restore_state`'s order (decoding off,
    /// the PCIe control words, the header from the top down), reads them back, then turns
    /// memory decoding on last, so the sequence and its verification go on instead of timing
    /// out into link-down. False when nothing was lost (MMIO reads all-ones for other reasons
    /// too: a register not woken, a hung SoC; and Link Control is saved with ASPM cleared),
    /// when the card is no longer ours or off the bus, or when a word could not be put back
    /// (decoding then stays off: never decode through a half-restored BAR).
    pub fn repair_header(&mut self) -> bool {
        // Owned again for these writes (the verification lets it go again once settled).
        if self.own_again().is_err() {
            return false;
        }
        self.repair_owned_header()
    }

    pub(super) fn repair_owned_header(&mut self) -> bool {
        let Some(b) = self.baseline.clone() else {
            return false;
        };
        if self.watch.lost().is_some() || self.dev.ids().ok() != Some(self.config_ids()) {
            return false;
        }
        let differ = differing(self.backend.as_mut(), b.config.clone());
        let cmd = self
            .backend
            .config_read16(PCI_COMMAND)
            .unwrap_or(ALL_ONES16);
        let bar_lost = differ
            .iter()
            .any(|(off, _, _)| record::BAR_WORDS.contains(off));
        // All-ones: the link went again between the ID check and these reads.
        if cmd == ALL_ONES16 || (!bar_lost && cmd & PCI_COMMAND_MEMORY != 0) {
            return false;
        }
        let mut r = Restored::default();
        let not_taken = write_back(self.backend.as_mut(), differ, None, &mut r);
        // A BAR that did not take must not decode.
        if not_taken.iter().any(|off| record::BAR_WORDS.contains(off)) {
            r.errors.push(format!(
                "a BAR did not take its saved address: {}",
                r.not_taken.join(", ")
            ));
        }
        let ok = r.errors.is_empty();
        if ok {
            let decoding = b.command.unwrap_or(0) | PCI_COMMAND_MEMORY;
            write_back(self.backend.as_mut(), Vec::new(), Some(decoding), &mut r);
        }
        warn!(bdf = %self.bdf, "MMIO reads all-ones while config space answers: the link drop reset the function; header restored [{}]{}{}", r.config.join(", "),
            if r.not_taken.is_empty() { String::new() } else { format!(" (did not take: {})", r.not_taken.join(", ")) },
            if r.errors.is_empty() { String::new() } else { format!(" (failed, decoding left off: {})", r.errors.join(", ")) });
        // What did not take or failed is the final restore's to find again: it re-reads every
        // word after a link drop.
        self.repaired.extend(r.config);
        self.link_dropped = true;
        ok
    }

    /// Enables memory decoding (vfio leaves it cleared after release); the saved baseline
    /// brings the old value back.
    pub fn enable_memory(&mut self) -> Result<()> {
        self.still_owned()?;
        let cmd = self.baseline.as_ref().and_then(|b| b.command).unwrap_or(0);
        self.backend
            .config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY)
            .map_err(|source| Error::SysfsWrite {
                path: self.dev.path("config"),
                err: source,
            })?;
        self.took(Step::EnableMemory(self.backend.name()));
        Ok(())
    }

    /// Takes `port`'s lock for the rest of the session, before its state is read (or a killed
    /// session's port values are put back); once per port.
    pub fn lock_port(&mut self, port: Bdf) -> Result<()> {
        if !self.port_locks.iter().any(|(p, _)| *p == port) {
            let lock = DeviceLock::acquire(&self.run_dir, port, self.lock_wait)?;
            self.port_locks.push((port, lock));
            self.took(Step::LockPort(port));
        }
        Ok(())
    }

    /// Masks the upstream port's reports of the coming link drop for the rest of the session:
    /// recorded on disk first, so a SIGKILL leaves the port's values for the next session. On a
    /// failure nothing stays masked (what was written is put back at restore).
    pub fn guard_port(&mut self, rec: port::PortRecord) -> Result<()> {
        let Some(b) = self.baseline.as_mut() else {
            return Ok(()); // observe-only sessions write nothing
        };
        // Opened before the record names the port: a port that cannot even be opened for
        // writing is refused with nothing recorded.
        let guard_failure = |why| Error::PortGuard {
            bdf: self.bdf,
            port: rec.port,
            why,
        };
        let mut cfg = port_config(&self.dev, rec.port).map_err(guard_failure)?;
        b.port = Some(rec.clone());
        record::save(&self.run_dir, b)?;
        rec.apply(&mut cfg)
            .map_err(|e| guard_failure(GuardFailure::Io(e)))?;
        self.took(Step::mask(&rec));
        Ok(())
    }

    /// Makes `device_specific` the only reset method for one kernel reset, the list it had
    /// in the record first (a SIGKILL in between leaves it for the next session).
    pub fn swap_reset_method(&mut self, methods: String) -> Result<()> {
        let Some(b) = self.baseline.as_mut() else {
            return Ok(());
        };
        b.reset_method = Some(methods);
        record::save(&self.run_dir, b)?;
        self.dev.write("reset_method", "device_specific")?;
        self.took(Step::OnlyDeviceSpecific);
        Ok(())
    }

    /// Puts the swapped list back, then takes it out of the record: a list that cannot be
    /// written back stays there for the restore (and, failing that, for a person).
    pub fn unswap_reset_method(&mut self) -> Result<()> {
        let Some(b) = self.baseline.as_mut() else {
            return Ok(());
        };
        let Some(m) = b.reset_method.clone() else {
            return Ok(());
        };
        self.dev.write("reset_method", &m)?;
        b.reset_method = None;
        record::save(&self.run_dir, b)?;
        self.took(Step::PutBackMethods(m));
        Ok(())
    }
}
