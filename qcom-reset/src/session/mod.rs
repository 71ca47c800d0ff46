//! One device session, in the order the engine runs it: **own** the device (its VFIO group held
//! open, [`own`]), **recover** what a killed session left ([`record`]), **save** the baseline to
//! disk before the first write, wake it, then (the caller) reset and verify, and **restore**
//! PCI_COMMAND, `power/control` and every config word the reset lost, on every path: errors,
//! panics (drop) and, through the record, SIGKILL.
pub mod own;
pub mod port;
pub mod record;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::warn;

use crate::backend::Backend;
use crate::bdf::Bdf;
use crate::regs::*;
use crate::sysfs::SysfsDevice;
use crate::{Error, Result};
use own::Ownership;
use record::Record;

/// What a session put back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Restored {
    pub command: Option<u16>,
    pub power_control: Option<String>,
    /// Config words the device lost (e.g. its BARs after the WLAN global reset), as
    /// "offset: now -> restored".
    pub config: Vec<String>,
    /// Upstream port registers put back after the link drop (hotplug events, AER mask).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<String>,
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
    pub bdf: Bdf,
    dev: SysfsDevice,
    pub backend: Box<dyn Backend>,
    run_dir: PathBuf,
    baseline: Option<Record>,
    restored: Option<Restored>,
    /// Held until the session ends: nothing else can open the device meanwhile.
    _own: Ownership,
}

impl Session {
    /// Recovers a dead session's record, saves the baseline, wakes the device. Returns what was
    /// recovered, if anything. The caller holds the device's lock.
    pub fn begin(
        dev: &SysfsDevice,
        run_dir: PathBuf,
        own: Ownership,
        mut backend: Box<dyn Backend>,
        writes: Writes,
    ) -> Result<(Session, Option<Restored>)> {
        let on_vfio = own.group_path().is_some();
        let recovered = if writes == Writes::Allowed {
            recover(dev, &run_dir, backend.as_mut(), on_vfio)?
        } else {
            None
        };
        let mut s = Session {
            bdf: dev.bdf,
            dev: dev.clone(),
            backend,
            run_dir,
            baseline: None,
            restored: None,
            _own: own,
        };
        if writes == Writes::None {
            return Ok((s, recovered));
        }
        let command = s
            .backend
            .config_read16(PCI_COMMAND)
            .map_err(|source| Error::SysfsRead {
                path: s.dev.path("config"),
                err: source,
            })?;
        let power = dev.power_control()?;
        let baseline = Record {
            bdf: dev.bdf,
            pid: std::process::id(),
            // All-ones: the link is down and there is no command register to bring back.
            command: (command != 0xffff).then_some(command),
            power_control: power.clone().filter(|p| p != "on"),
            config: record::snapshot(s.backend.as_mut()),
            port: None,
        };
        record::save(&s.run_dir, &baseline)?;
        s.baseline = Some(baseline);
        // vfio-pci lets an unused device idle in D3hot, where MMIO reads all-ones.
        if power.as_deref().is_some_and(|p| p != "on") {
            s.dev.write("power/control", "on")?;
        }
        s.wait_d0()?;
        Ok((s, recovered))
    }

    fn wait_d0(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_millis(200);
        while let Some(state) = self.dev.power_state()?.filter(|st| st != "D0") {
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

    pub fn config_ids(&mut self) -> (u16, u16) {
        let v = self.backend.config_read16(PCI_VENDOR_ID).unwrap_or(0xffff);
        let d = self.backend.config_read16(PCI_DEVICE_ID).unwrap_or(0xffff);
        (v, d)
    }

    /// Whether the device is still ours: vfio-pci can be unbound while only its group is held
    /// (the kernel blocks that only for an open device fd), and a new driver may own it now.
    pub fn still_owned(&self) -> Result<()> {
        if self._own.group_path().is_none() {
            return Ok(());
        }
        match self.dev.driver()?.as_deref() {
            Some("vfio-pci") => Ok(()),
            other => Err(Error::NotOwned {
                bdf: self.bdf,
                why: format!(
                    "it was rebound to {} during the session",
                    other.unwrap_or("no driver")
                ),
            }),
        }
    }

    /// Enables memory decoding (vfio leaves it cleared after release); the saved baseline
    /// brings the old value back.
    pub fn enable_memory(&mut self) -> Result<()> {
        let cmd = self.baseline.as_ref().and_then(|b| b.command).unwrap_or(0);
        self.backend
            .config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY)
            .map_err(|source| Error::SysfsWrite {
                path: self.dev.path("config"),
                err: source,
            })
    }

    /// Masks the upstream port's reports of the coming link drop for the rest of the session:
    /// recorded on disk first, so a SIGKILL leaves the port's values for the next session. On a
    /// failure nothing stays masked (what was written is put back at restore).
    pub fn guard_port(&mut self, rec: port::PortRecord) -> Result<()> {
        let Some(b) = self.baseline.as_mut() else {
            return Ok(()); // observe-only sessions write nothing
        };
        b.port = Some(rec.clone());
        record::save(&self.run_dir, b)?;
        let why = match port_config(&self.dev, rec.port) {
            Ok(mut cfg) => match rec.apply(&mut cfg) {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            },
            Err(e) => e,
        };
        Err(Error::PortGuard {
            bdf: self.bdf,
            port: rec.port,
            why,
        })
    }

    /// Puts back everything the session changed or the reset lost; idempotent.
    pub fn restore(&mut self) -> Restored {
        if let Some(r) = &self.restored {
            return r.clone();
        }
        let on_vfio = self._own.group_path().is_some();
        let mut r = match &self.baseline {
            Some(b) => put_back(&self.dev, self.backend.as_mut(), b, on_vfio),
            None => Restored::default(),
        };
        if let Some(p) = self.baseline.as_ref().and_then(|b| b.port.as_ref()) {
            restore_port(&self.dev, p, &mut r);
        }
        for e in &r.errors {
            warn!(bdf = %self.bdf, "post: restore failed: {e}");
        }
        if !r.config.is_empty() {
            warn!(bdf = %self.bdf, "post: the device lost config words; restored {}", r.config.join(", "));
        }
        // A record whose restore failed stays for the next session to retry; one for a device
        // a new driver took over has nothing left to restore.
        if r.errors.is_empty() || self.still_owned().is_err() {
            record::remove(&self.run_dir, self.bdf);
        }
        self.restored = Some(r.clone());
        r
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Restores a record: config words the device lost (they read 0: a link drop resets them; a
/// word someone else changed is left alone), written with decoding off like the kernel's
/// restore, then PCI_COMMAND, then `power/control`. A device no longer on vfio-pci (unbound
/// while only its group was held) belongs to its new driver: its config space is left alone.
fn put_back(dev: &SysfsDevice, backend: &mut dyn Backend, b: &Record, on_vfio: bool) -> Restored {
    let mut r = Restored::default();
    let driver = dev.driver().ok().flatten();
    if on_vfio && driver.as_deref() != Some("vfio-pci") {
        r.errors.push(format!(
            "the device was rebound to {} during the session: its config space is left to it",
            driver.as_deref().unwrap_or("no driver")
        ));
    } else {
        restore_config(backend, b, &mut r);
    }
    if let Some(p) = &b.power_control {
        match dev.write("power/control", p) {
            Ok(()) => r.power_control = Some(p.clone()),
            Err(e) => r.errors.push(e.to_string()),
        }
    }
    r
}

fn restore_config(backend: &mut dyn Backend, b: &Record, r: &mut Restored) {
    let lost: Vec<(u16, u16, u16)> = b
        .config
        .iter()
        .filter_map(|&(off, want)| {
            let now = backend.config_read16(off as u64).ok()?;
            if now != want && now != 0 && now != 0xffff {
                warn!(bdf = %b.bdf, "config {off:#04x} is {now:#06x}, was {want:#06x}: changed, not lost; left alone");
            }
            (now == 0 && want != 0).then_some((off, now, want))
        })
        .collect();
    if !lost.is_empty() {
        // Decoding off while BARs are half written, as pci_restore_state has it.
        let cmd = backend.config_read16(PCI_COMMAND).unwrap_or(0);
        let _ = backend.config_write16(PCI_COMMAND, cmd & !DECODE_AND_MASTER);
    }
    for (off, now, want) in lost {
        match backend.config_write16(off as u64, want) {
            Ok(()) => r
                .config
                .push(format!("{off:#04x}: {now:#06x} -> {want:#06x}")),
            Err(e) => r.errors.push(format!("config {off:#04x}: {e}")),
        }
    }
    if let Some(cmd) = b.command {
        match backend.config_write16(PCI_COMMAND, cmd) {
            Ok(()) => r.command = Some(cmd),
            Err(e) => r.errors.push(format!("PCI_COMMAND: {e}")),
        }
    }
}

/// The port's sysfs config, checked to be the bridge the record names.
fn port_config(dev: &SysfsDevice, want: Bdf) -> std::result::Result<port::SysfsConfig, String> {
    let p = port::upstream(dev)
        .filter(|p| p.bdf == want)
        .ok_or_else(|| format!("{want} is no longer the bridge above {}", dev.bdf))?;
    port::SysfsConfig::open(&p.path("config"), true)
        .map_err(|e| format!("{}: {e}", p.path("config").display()))
}

fn restore_port(dev: &SysfsDevice, p: &port::PortRecord, r: &mut Restored) {
    match port_config(dev, p.port).and_then(|mut cfg| p.restore(&mut cfg)) {
        Ok(done) => r.port = done,
        Err(e) => r.errors.push(format!("upstream port: {e}")),
    }
}

/// PCI_COMMAND I/O, memory and bus-master enables.
const DECODE_AND_MASTER: u16 = 0x0007;

/// Restores and removes the record a killed session left for this device, if any.
fn recover(
    dev: &SysfsDevice,
    run_dir: &std::path::Path,
    backend: &mut dyn Backend,
    on_vfio: bool,
) -> Result<Option<Restored>> {
    let Some(rec) = record::load(run_dir, dev.bdf)? else {
        return Ok(None);
    };
    let mut r = put_back(dev, backend, &rec, on_vfio);
    if let Some(p) = &rec.port {
        restore_port(dev, p, &mut r);
    }
    warn!(
        bdf = %dev.bdf,
        "recovered the state a killed qcom-reset (pid {}) left: PCI_COMMAND {:?}, power/control {:?}, config [{}], port [{}]{}",
        rec.pid,
        r.command,
        r.power_control,
        r.config.join(", "),
        r.port.join(", "),
        if r.errors.is_empty() { String::new() } else { format!("; errors: {}", r.errors.join("; ")) }
    );
    if r.errors.is_empty() {
        record::remove(run_dir, dev.bdf);
    }
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Family;
    use crate::sim::{Faults, Model, SimDevice, SimState};

    /// What `f` logged on this thread. One global subscriber writes into a per-thread buffer:
    /// a thread-local subscriber would race the callsite interest cache of the other tests.
    fn logged(f: impl FnOnce()) -> String {
        thread_local!(static LOG: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
        struct ThreadLog;
        impl std::io::Write for ThreadLog {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                LOG.with(|l| l.borrow_mut().extend_from_slice(b));
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_writer(|| ThreadLog)
                .with_ansi(false)
                .try_init();
        });
        LOG.with(|l| l.borrow_mut().clear());
        f();
        LOG.with(|l| String::from_utf8(l.borrow().clone()).unwrap())
    }

    /// Only words that read 0 (lost with the link) are written back; a word someone else
    /// changed is left alone and said so; decoding is off while they are written.
    #[test]
    fn only_lost_words_are_restored_with_decoding_off() {
        let mut dev = SimDevice::new(Model::new(
            Family::Wlan,
            0x17cb,
            0x1103,
            SimState::Mission,
            Faults::default(),
        ));
        dev.config_write16(PCI_COMMAND, 0x0406).unwrap();
        dev.config_write16(0x10, 0x0008).unwrap(); // changed by someone else
        dev.config_write16(0x12, 0).unwrap(); // lost
        let rec = Record {
            bdf: "0000:03:00.0".parse().unwrap(),
            pid: 1,
            command: Some(0x0400),
            power_control: None,
            config: vec![(0x10, 0x0004), (0x12, 0xfe00), (0x3c, 0x010b)],
            port: None,
        };
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
            fn map_bar(&mut self, bar: u8) -> crate::Result<(Box<dyn crate::io::RegisterIo>, u64)> {
                self.inner.map_bar(bar)
            }
        }
        let mut logged_dev = Logged {
            inner: dev.clone(),
            writes: Vec::new(),
        };
        let mut r = Restored::default();
        let log = logged(|| restore_config(&mut logged_dev, &rec, &mut r));
        // I/O, memory and bus master off (0x0406 & !7) before the lost word, then PCI_COMMAND.
        assert_eq!(
            logged_dev.writes,
            [(4, 0x0400), (0x12, 0xfe00), (4, 0x0400)]
        );
        assert_eq!(r.config, ["0x12: 0x0000 -> 0xfe00"]);
        assert_eq!(r.command, Some(0x0400));
        assert_eq!(dev.config_read16(0x10).unwrap(), 0x0008, "left alone");
        assert_eq!(dev.config_read16(0x12).unwrap(), 0xfe00);
        assert!(
            log.contains("config 0x10 is 0x0008, was 0x0004: changed, not lost; left alone")
                && !log.contains("config 0x12 is")
                && !log.contains("config 0x3c is"),
            "{log}"
        );
    }
}
