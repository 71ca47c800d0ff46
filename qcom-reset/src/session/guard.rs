//! One device session, in the order the engine runs it: **own** the device (its VFIO group held
//! open, [`own`]), **recover** what a killed session left ([`record`]), **save** the baseline to
//! disk before the first write, wake it, then (the caller) reset and verify, and **restore**
//! PCI_COMMAND, `power/control` and every config word the reset lost, on every path: errors,
//! panics (drop) and, through the record, SIGKILL.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use super::port;
use super::record::{self, Record};
use crate::access::Backend;
use crate::bdf::Bdf;
use crate::device::regio::RegisterIo;
use crate::device::regs::*;
use crate::host::lock::DeviceLock;
use crate::host::own::Ownership;
use crate::host::sysfs::{Override, SysfsDevice};
use crate::{Error, GuardFailure, Result};

/// The `driver_override` a session puts on its card: no driver has this name, so nothing binds
/// the card by itself meanwhile (autoprobe, vfio-pci's `ids=`/`new_id`, a write to a driver's
/// `bind`) until the session puts the recorded value back. Tools that bind on purpose (libvirt's
/// managed hostdevs, driverctl) write their own override first; [`OwnerWatch`] catches those.
pub const HOLD_OVERRIDE: &str = "qcom-reset-session";

/// What a session put back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Restored {
    pub command: Option<u16>,
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

/// How a card stopped being the session's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// It left the bus (removed, hot-unplugged, DPC).
    Gone,
    /// It left the bus and came back at the same address: another device instance, whose
    /// group and mappings are not the ones this session holds.
    Replaced,
    /// Another driver (or none, after an unbind) has it now.
    Driver(Option<String>),
    /// A VM (or another VFIO user) opened it while the verification had let its group go.
    Opened(String),
    Unreadable(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Gone => f.write_str("nobody: it left the bus"),
            Lost::Replaced => f.write_str("a re-enumeration: it left the bus and came back"),
            Lost::Driver(Some(d)) => write!(f, "driver {d}"),
            Lost::Driver(None) => f.write_str("an unbind (no driver now)"),
            Lost::Opened(h) => write!(f, "a VFIO user while the verification let it go: {h}"),
            Lost::Unreadable(e) => write!(f, "an unknown owner ({e})"),
        }
    }
}

/// Whether the card still has the driver it had when the session began: vfio-pci with the
/// group held, no driver (held off by [`HOLD_OVERRIDE`]), or the `--force` driver. Checked
/// before every write, since a held group does not stop an unbind (libvirt's managed reattach
/// runs right after QEMU exits).
#[derive(Clone, Debug)]
pub struct OwnerWatch {
    dev: SysfsDevice,
    driver: Option<String>,
    /// The device directory's inode: a function removed and found again at the same address
    /// is a new device (new sysfs node) even when vfio-pci rebinds it through `ids=`.
    node: Option<u64>,
}

impl OwnerWatch {
    /// Watches `dev` for a change from `driver`, the driver it had when it was owned.
    pub fn new(dev: &SysfsDevice, driver: Option<&str>) -> OwnerWatch {
        OwnerWatch {
            dev: dev.clone(),
            driver: driver.map(str::to_string),
            node: node(dev),
        }
    }

    pub fn lost(&self) -> Option<Lost> {
        match node(&self.dev) {
            None => return Some(Lost::Gone),
            n if n != self.node => return Some(Lost::Replaced),
            _ => {}
        }
        match self.dev.driver() {
            Ok(d) if d == self.driver => None,
            Ok(d) => Some(Lost::Driver(d)),
            Err(e) => Some(Lost::Unreadable(e.to_string())),
        }
    }

    /// A killed session's record goes back only onto a card nothing else drives.
    fn recoverable(&self) -> std::result::Result<(), String> {
        match self.driver.as_deref() {
            None | Some("vfio-pci") => Ok(()),
            Some(d) => Err(format!(
                "it is bound to {d} now and its state belongs to that driver"
            )),
        }
    }
}

fn node(dev: &SysfsDevice) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(&dev.dir).ok().map(|m| m.ino())
}

/// The BAR as the session writes it: every write first checks the card is still ours; once it
/// is not, nothing more reaches it (reads give all-ones, delays are skipped) and `lost` says
/// why, for the caller to end the session.
pub struct Guarded<I> {
    inner: I,
    watch: OwnerWatch,
    pub lost: Option<Lost>,
}

impl<I: RegisterIo> Guarded<I> {
    pub fn new(inner: I, watch: OwnerWatch) -> Self {
        Guarded {
            inner,
            watch,
            lost: None,
        }
    }
}

impl<I: RegisterIo> RegisterIo for Guarded<I> {
    fn read32(&mut self, offset: u32) -> u32 {
        if self.lost.is_some() {
            return ALL_ONES;
        }
        self.inner.read32(offset)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        if self.lost.is_none() {
            self.lost = self.watch.lost();
        }
        if self.lost.is_none() {
            self.inner.write32(offset, value);
        }
    }
    fn delay(&mut self, d: Duration) {
        if self.lost.is_none() {
            self.inner.delay(d);
        }
    }
    fn revoked(&self) -> bool {
        self.inner.revoked()
    }
}

/// Config space, power and the BAR for the duration of a sequence; restores on drop.
pub struct Session {
    pub bdf: Bdf,
    dev: SysfsDevice,
    pub backend: Box<dyn Backend>,
    run_dir: PathBuf,
    lock_wait: Duration,
    watch: OwnerWatch,
    baseline: Option<Record>,
    /// The link dropped (or the kernel reset the function): every saved word goes back.
    link_dropped: bool,
    /// Config words the header repair put back mid-sequence, for the session's report.
    repaired: Vec<String>,
    restored: Option<Restored>,
    /// A VM opened the card while its group was let go: nothing more is written to it.
    taken: Option<Lost>,
    /// The verification runs (between [`Session::begin_verification`] and
    /// [`Session::take_back`]): the group is let go while the card is settled.
    verifying: bool,
    said_let_go: bool,
    /// The upstream port's lock while its reports are masked: two targets below one port never
    /// record each other's masked state.
    _port_lock: Option<DeviceLock>,
    /// Held until the session ends (let go only while the verification reads): nothing else
    /// can open the device while the session writes.
    own: Ownership,
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
            _port_lock: None,
            own,
        };
        if writes == Writes::None {
            return Ok((s, None));
        }
        // Rebound between the ownership check and now: not one write.
        s.still_owned()?;
        let (recovered, original) = s.recover()?;
        s.save_baseline(original)?;
        s.hold_off_drivers()?;
        // vfio-pci lets an unused device idle in D3hot, where MMIO reads all-ones.
        if s.baseline
            .as_ref()
            .is_some_and(|b| b.power_control.is_some())
        {
            s.dev.write("power/control", "on")?;
        }
        s.wait_d0()?;
        Ok((s, recovered))
    }

    /// The record on disk before the first write of this session.
    fn save_baseline(&mut self, original: Option<Option<Override>>) -> Result<()> {
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
        Ok(())
    }

    /// Sets [`HOLD_OVERRIDE`] once the original is on disk (in the baseline or the record
    /// being recovered).
    fn hold_off_drivers(&self) -> Result<()> {
        match self.dev.driver_override()? {
            None => Ok(()), // a kernel without driver_override (before 3.16)
            Some(_) => self.dev.write("driver_override", HOLD_OVERRIDE),
        }
    }

    /// Waits for D0, except for a card off the link: its PMCSR reads all-ones, which the
    /// kernel reports as D3cold (`pci_update_current_state`); the sequence's first read and the
    /// verdict then say "link down" instead of a power state that hides the cause.
    fn wait_d0(&mut self) -> Result<()> {
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

    /// What every write of the session checks first.
    pub fn watch(&self) -> OwnerWatch {
        self.watch.clone()
    }

    /// Whether the device is still ours: vfio-pci can be unbound while only its group is held
    /// (the kernel blocks that only for an open device fd), and a new driver may own it now.
    pub fn still_owned(&self) -> Result<()> {
        self.lost_to().map_or(Ok(()), |l| Err(self.lost(l)))
    }

    /// Who has the card now, if not this session.
    fn lost_to(&self) -> Option<Lost> {
        self.taken.clone().or_else(|| self.watch.lost())
    }

    /// Starts the verification: it only reads (every 25 ms, up to 8 s), so the VFIO group is let
    /// go once a BAR read answers ([`Session::let_go_when_settled`]), and a VM
    /// starting meanwhile is not refused with EBUSY. Not when the access goes through VFIO
    /// ([`Ownership::can_let_go`]). True when the group may be let go; [`Session::take_back`]
    /// ends the stretch.
    pub fn begin_verification(&mut self) -> bool {
        self.verifying = self.own.can_let_go();
        self.verifying
    }

    /// After a BAR read that did not give all-ones: the card is settled (its BAR decodes at the
    /// kernel's address, so the header is whole: a VM that opens it now saves that header as
    /// the state vfio-pci puts back at its release), and the group is let go.
    pub fn let_go_when_settled(&mut self) {
        if !self.verifying || self.own.is_let_go() {
            return;
        }
        if self.own.let_go() && !std::mem::replace(&mut self.said_let_go, true) {
            info!(bdf = %self.bdf, "verify: VFIO group let go while the verification only reads (a VM may open the card now)");
        }
    }

    /// Ends the verification's stretch: the group is taken back before the restore. A VM that
    /// opened the card meanwhile keeps it: the session ends without another config write, and
    /// without a verdict (the registers are that VM's now).
    pub fn take_back(&mut self) -> Result<()> {
        self.verifying = false;
        self.own_again()
    }

    /// Who took the card when the kernel revoked the session's BAR mapping (a driver or VFIO
    /// user claimed the BAR): the watch's driver or bus change, the VFIO user holding the
    /// group, or, failing both, an owner this session cannot name. Nothing more is written.
    pub fn claimed(&mut self) -> Lost {
        if let Some(l) = self.lost_to() {
            return l;
        }
        if let Err(Error::Taken { by, .. }) = self.own_again() {
            return by;
        }
        let l = Lost::Opened(
            "an owner that claimed its BAR (the kernel revoked this session's mapping)".into(),
        );
        let _ = self.lost(l.clone());
        self.taken = Some(l.clone());
        l
    }

    /// The owner that took the card, once known: the session reads and writes no more.
    pub fn taken(&self) -> Option<Lost> {
        self.taken.clone()
    }

    /// Reopens a let-go group. Another qcom-reset session that opened it meanwhile (a sibling
    /// function's, `status`) is waited for, up to the lock wait. Failing that, the card is
    /// someone else's: the driver or bus change the watch sees, or else the VFIO user the
    /// kernel's EBUSY names; any other failure fails closed.
    fn own_again(&mut self) -> Result<()> {
        if let Some(l) = self.taken.clone() {
            return Err(Error::Taken {
                bdf: self.bdf,
                by: l,
            });
        }
        let deadline = Instant::now() + self.lock_wait;
        let e = loop {
            match self.own.take_back() {
                Ok(()) => return Ok(()),
                Err(Error::HeldBySession { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => break e,
            }
        };
        let l = self.watch.lost().unwrap_or_else(|| match e {
            Error::Held { holder, .. } | Error::HeldBySession { holder, .. } => {
                Lost::Opened(holder)
            }
            other => Lost::Unreadable(other.to_string()),
        });
        let e = self.lost(l.clone());
        self.taken = Some(l);
        Err(e)
    }

    /// The error that ends a session whose card was taken, with its journal line (once).
    pub fn lost(&self, l: Lost) -> Error {
        if self.taken.as_ref() != Some(&l) {
            warn!(bdf = %self.bdf, "the card was taken by {l} during the session: nothing more is written to it");
        }
        Error::Taken {
            bdf: self.bdf,
            by: l,
        }
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

    fn repair_owned_header(&mut self) -> bool {
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
            })
    }

    /// Takes the upstream port's lock for the rest of the session, before its state is read
    /// (or a killed session's port values are put back); once per session.
    pub fn lock_port(&mut self, port: Bdf) -> Result<()> {
        if self._port_lock.is_none() {
            self._port_lock = Some(DeviceLock::acquire(&self.run_dir, port, self.lock_wait)?);
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
            .map_err(|e| guard_failure(GuardFailure::Io(e)))
    }

    /// Makes `device_specific` the only reset method for one kernel reset, the list it had
    /// in the record first (a SIGKILL in between leaves it for the next session).
    pub fn swap_reset_method(&mut self, methods: String) -> Result<()> {
        let Some(b) = self.baseline.as_mut() else {
            return Ok(());
        };
        b.reset_method = Some(methods);
        record::save(&self.run_dir, b)?;
        self.dev.write("reset_method", "device_specific")
    }

    /// Puts the swapped list back and takes it out of the record.
    pub fn unswap_reset_method(&mut self) -> Result<()> {
        let Some(b) = self.baseline.as_mut() else {
            return Ok(());
        };
        let Some(m) = b.reset_method.take() else {
            return Ok(());
        };
        self.dev.write("reset_method", &m)?;
        record::save(&self.run_dir, b)
    }

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
            put_back(&self.dev, self.backend.as_mut(), lost, &b, mode, &mut r);
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
    fn recover(&mut self) -> Result<(Option<Restored>, Option<Option<Override>>)> {
        let path = record::path(&self.run_dir, self.bdf);
        let Some(mut rec) = record::load(&self.run_dir, self.bdf)? else {
            return Ok((None, None));
        };
        // The port first, whoever has the card now: its masked hotplug events and Surprise Down
        // hide every later unplug and link failure of the slot.
        let port = self.recover_port(&mut rec)?;
        if let Err(why) = self.watch.recoverable() {
            return Err(Error::RecordWaits {
                bdf: self.bdf,
                path,
                why,
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
    fn recover_port(&mut self, rec: &mut Record) -> Result<Vec<String>> {
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
fn original_override(dev: &SysfsDevice) -> Result<Option<Override>> {
    Ok(dev.driver_override()?.map(|o| match o {
        Override::Driver(d) if d == HOLD_OVERRIDE => Override::Unset,
        o => o,
    }))
}

fn report(bdf: Bdf, r: &Restored) {
    for e in &r.errors {
        warn!(bdf = %bdf, "post: restore failed: {e}");
    }
    if !r.config.is_empty() {
        warn!(bdf = %bdf, "post: the link dropped; config restored: {}", r.config.join(", "));
    }
}

/// Which saved config words go back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Words {
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
fn put_back(
    dev: &SysfsDevice,
    backend: &mut dyn Backend,
    lost: Option<Lost>,
    b: &Record,
    mode: Words,
    r: &mut Restored,
) {
    match &lost {
        None => restore_config(backend, b, mode, r),
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
    }
    release_drivers(dev, b, r);
}

/// Puts the recorded `driver_override` back, unless someone set another one since (libvirt's
/// reattach does): that one is theirs.
fn release_drivers(dev: &SysfsDevice, b: &Record, r: &mut Restored) {
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
fn restore_config(backend: &mut dyn Backend, b: &Record, mode: Words, r: &mut Restored) {
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
fn differing(backend: &mut dyn Backend, mut words: Vec<(u16, u16)>) -> Vec<(u16, u16, u16)> {
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
            let now = backend.config_read16(off as u64).ok()?;
            (now != want).then_some((off, now, want))
        })
        .collect()
}

/// Writes `differ` back with decoding off, then `command` last: a BAR is never moved while the
/// card decodes, and the card never decodes before its PCIe control words are back. Each word
/// is read back; returns the offsets that did not take.
fn write_back(
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
        if let Err(e) = backend.config_write16(off as u64, want) {
            r.errors.push(format!("config {off:#04x}: {e}"));
            continue;
        }
        match backend.config_read16(off as u64) {
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
fn port_config(
    dev: &SysfsDevice,
    want: Bdf,
) -> std::result::Result<port::SysfsConfig, GuardFailure> {
    let p = port::upstream(dev)
        .filter(|p| p.bdf == want)
        .ok_or(GuardFailure::NotAbove)?;
    port::SysfsConfig::open(&p.path("config"), true).map_err(GuardFailure::Io)
}

/// Restores the port by its recorded address, checked by its IDs: the card below it may have
/// left the bus (that is when the port's hotplug events matter most).
fn restore_port(
    dev: &SysfsDevice,
    p: &port::PortRecord,
) -> std::result::Result<Vec<String>, String> {
    let path = dev.sibling(p.port).path("config");
    let mut cfg =
        port::SysfsConfig::open(&path, true).map_err(|e| format!("{}: {e}", path.display()))?;
    p.same_port(&mut cfg)?;
    p.restore(&mut cfg)
}

/// PCI_COMMAND I/O, memory and bus-master enables.
const DECODE_AND_MASTER: u16 = 0x0007;
const ALL_ONES16: u16 = 0xffff;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Family;
    use crate::sim::{Faults, Model, SimDevice, SimState};

    /// A backend that logs its config writes.
    struct Logged {
        inner: SimDevice,
        writes: Vec<(u64, u16)>,
    }

    impl Backend for Logged {
        fn name(&self) -> &'static str {
            "logged"
        }
        fn config_read16(&mut self, o: u64) -> std::io::Result<u16> {
            self.inner.config_read16(o)
        }
        fn config_write16(&mut self, o: u64, v: u16) -> std::io::Result<()> {
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
        let order: Vec<u64> = c.writes.iter().map(|&(o, _)| o).collect();
        assert_eq!(order, [4, 0x58, 0x60, 0x78, 0x12, 4], "{:?}", r);
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
