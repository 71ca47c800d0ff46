//! What a session will restore, on disk before its first write: `/run/qcom-reset/<BDF>.json`.
//! A session killed with SIGKILL cannot restore anything itself; the next qcom-reset that takes
//! the device's lock finds the record, restores from it and removes it. The lock proves the
//! writer is gone: it is released only when its process dies or finishes.
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::access::Backend;
use crate::bdf::Bdf;
use crate::host::sysfs::Override;
use crate::pci::*;
use crate::{Error, Result};

use super::port::PortDefect;

/// What is wrong with a record that was read: it does not parse, or it names a register a
/// restore must not write.
#[derive(Debug)]
pub enum RecordDefect {
    /// The file is not the JSON a record is.
    Json(serde_json::Error),
    /// A config-space offset that is not a restorable 16-bit register.
    ConfigOffset(u16),
    /// An upstream port's saved offsets are impossible.
    Port(PortDefect),
}

impl std::fmt::Display for RecordDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordDefect::Json(e) => write!(f, "{e}"),
            RecordDefect::ConfigOffset(off) => {
                write!(f, "config offset {off:#x} is not a restorable register")
            }
            RecordDefect::Port(d) => write!(f, "{d}"),
        }
    }
}

/// Config-space words a reset can lose and the kernel's `pci_restore_state` would put back:
/// cache line size and latency timer, the six BARs, interrupt line/pin.
pub const BAR_WORDS: std::ops::Range<u16> = 0x10..0x28;
const HEADER_WORDS: [u16; 14] = [
    0x0c, 0x0e, 0x10, 0x12, 0x14, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x22, 0x24, 0x3c,
];
/// PCIe capability registers restored like the kernel does: Device Control, Link Control,
/// Device Control 2, Link Control 2 (offsets inside the capability).
const PCIE_WORDS: [u16; 4] = [0x08, PCI_EXP_LNKCTL, 0x28, 0x30];

/// A session's crash record: what it changed, to put back after a SIGKILL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The card.
    pub bdf: Bdf,
    /// The process that wrote it, for the log of whoever restores it.
    pub pid: u32,
    /// PCI_COMMAND before the session; None when config space read all-ones.
    pub command: Option<u16>,
    /// `power/control` before the session, when it had to change it.
    pub power_control: Option<String>,
    /// (offset, value) of every saved config word other than PCI_COMMAND.
    pub config: Vec<(u16, u16)>,
    /// The upstream port's registers the session masked, before it masked them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<super::port::PortRecord>,
    /// `driver_override` before the session held the card off every driver with
    /// [`super::HOLD_OVERRIDE`]; None where the kernel has no such file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_override: Option<Override>,
    /// The kernel's BAR start addresses when the record was taken (`resource`): a record's BAR
    /// words are applied only while the kernel still assigns the same addresses.
    #[serde(default)]
    pub bar_starts: Vec<u64>,
    /// `reset_method` as it was before the kernel's `device_specific` reset was made the only
    /// method for one reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_method: Option<String>,
}

impl Record {
    /// Offsets a record may name: even, inside config space, and never the IDs, PCI_COMMAND or
    /// the status and class registers (nothing a restore writes lives there).
    pub fn validate(&self) -> std::result::Result<(), RecordDefect> {
        if let Some(&(off, _)) = self
            .config
            .iter()
            .find(|(off, _)| !off.is_multiple_of(2) || *off < 0x0c || *off >= 0x1000)
        {
            return Err(RecordDefect::ConfigOffset(off));
        }
        self.port
            .as_ref()
            .map_or(Ok(()), |p| p.validate().map_err(RecordDefect::Port))
    }

    /// Whether the record's BAR words may go back: the kernel's resource table still shows the
    /// addresses it was taken with (a remove/rescan or power cycle may have moved them).
    pub fn bars_match(&self, now: &[u64]) -> bool {
        !self.bar_starts.is_empty() && self.bar_starts == now
    }
}

/// What a crash record is of: both kinds live in the run directory, one file per device,
/// written and read by the one store below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A session's baseline: config words, power control, the port, the driver override.
    Session,
    /// A power cycle's: how the card was taken off the bus, to bring it back.
    PowerCycle,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Kind::Session => ".json",
            Kind::PowerCycle => ".power.json",
        }
    }

    /// The record's file for `bdf`.
    pub fn path(self, run_dir: &Path, bdf: Bdf) -> PathBuf {
        run_dir.join(format!("{bdf}{}", self.suffix()))
    }

    /// Devices with a record of this kind in `run_dir` (left by sessions or cycles that died).
    /// A power-cycle record's name ends in `.json` too, but its stem is no address.
    pub fn pending(self, run_dir: &Path) -> Vec<Bdf> {
        let Ok(rd) = std::fs::read_dir(run_dir) else {
            return Vec::new();
        };
        let mut out: Vec<Bdf> = rd
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(self.suffix())?.parse().ok()
            })
            .collect();
        out.sort();
        out
    }

    /// Removes `bdf`'s record of this kind, if any.
    pub fn remove(self, run_dir: &Path, bdf: Bdf) {
        let _ = std::fs::remove_file(self.path(run_dir, bdf));
    }
}

/// A session record's path.
pub fn path(run_dir: &Path, bdf: Bdf) -> PathBuf {
    Kind::Session.path(run_dir, bdf)
}

/// Reads the words to save; all-ones words (link down) are not saved.
pub fn snapshot(backend: &mut dyn Backend) -> Vec<(u16, u16)> {
    let mut words: Vec<u16> = HEADER_WORDS.to_vec();
    let lnkctl = pcie_capability(backend).map(|cap| {
        words.extend(PCIE_WORDS.iter().map(|w| cap + w));
        cap + PCI_EXP_LNKCTL
    });
    words
        .into_iter()
        .filter_map(|off| {
            let v = backend.config_read16(off).ok()?;
            let v = if Some(off) == lnkctl {
                v & !PCI_EXP_LNKCTL_ASPMC
            } else {
                v
            };
            (v != 0xffff).then_some((off, v))
        })
        .collect()
}

/// `IORESOURCE_MEM` and `IORESOURCE_MEM_64` in a `resource` line's flags.
const IORESOURCE_MEM: u64 = 0x0000_0200;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// Fills in memory BARs whose address reads 0 on the card although the kernel assigned one (a
/// link drop earlier reset the function and nobody put the header back): the baseline then
/// holds what the BAR must hold, and the session's header repair and restore put it there.
/// The kernel's `resource` addresses are CPU addresses; on x86 they are the bus addresses the
/// BARs hold (elsewhere a host bridge may translate, so nothing is filled in there).
pub fn fill_lost_bars(words: &mut [(u16, u16)], resources: &[(u64, u64)]) -> Vec<u16> {
    let mut filled = Vec::new();
    if !cfg!(target_arch = "x86_64") {
        return filled;
    }
    for (i, &(start, flags)) in resources.iter().enumerate().take(6) {
        if start == 0 || flags & IORESOURCE_MEM == 0 {
            continue;
        }
        let lo = 0x10 + 4 * i as u16;
        let mut want = vec![(lo + 2, (start >> 16) as u16)];
        if flags & IORESOURCE_MEM_64 != 0 {
            want.push((lo + 4, (start >> 32) as u16));
            want.push((lo + 6, (start >> 48) as u16));
        }
        let reads = |off: u16| words.iter().find(|w| w.0 == off).map(|w| w.1);
        let lost = reads(lo).is_some_and(|v| v & 0xfff0 == 0)
            && want.iter().all(|&(o, _)| reads(o) == Some(0));
        if !lost || start as u16 & 0xfff0 != 0 {
            continue;
        }
        for (off, v) in want {
            if let Some(w) = words.iter_mut().find(|w| w.0 == off) {
                w.1 = v;
                filled.push(off);
            }
        }
    }
    filled
}

/// Offset of the PCI Express capability of the device behind `backend`.
fn pcie_capability(backend: &mut dyn Backend) -> Option<u16> {
    crate::pci::pcie_capability(&mut |off| backend.config_read16(off))
        .ok()
        .flatten()
}

/// Writes the record atomically before the first device write.
pub fn save(run_dir: &Path, r: &Record) -> Result<()> {
    store(&path(run_dir, r.bdf), r)
}

/// The one record store (session and power-cycle records, the state file): JSON written
/// atomically and durably, readable by root alone.
pub fn store<T: Serialize>(dst: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_vec(value).expect("records serialize");
    write_atomically(dst, &text, 0o600, Durability::Fsync)
}

/// Whether an atomic write also survives a power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory: records that hold what a device needs back.
    Fsync,
    /// Rename only: what is rewritten all the time and worthless after a reboot (the metrics
    /// textfile, the agent's status in /run), so the event loop never waits for a disk.
    Rename,
}

/// The one atomic write: a new temporary file beside `dst` (random name, created exclusively,
/// so a link planted in a directory others can write is never followed; a dot file, so
/// collectors that read `*.prom` never see it), given `mode` whatever the umask, renamed over
/// `dst`. A crash leaves either the old file or the new one, never a torn one.
pub fn write_atomically(dst: &Path, bytes: &[u8], mode: u32, durability: Durability) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |path: &Path, source| Error::RecordWrite {
        path: path.to_path_buf(),
        err: source,
    };
    let dir = dst.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".qcom-reset-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| err(dir, e))?;
    let f = tmp.as_file_mut();
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| match durability {
            Durability::Fsync => f.sync_all(),
            Durability::Rename => Ok(()),
        })
        .map_err(|e| err(tmp.path(), e))?;
    tmp.persist(dst).map_err(|e| err(dst, e.error))?;
    match durability {
        Durability::Fsync => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(dir, e)),
        Durability::Rename => Ok(()),
    }
}

/// A record from the one store, if there is one. An unreadable or unparsable record is an
/// error naming the file: it may hold the only copy of what a device or the host needs back.
pub fn fetch<T: DeserializeOwned>(p: &Path) -> Result<Option<T>> {
    match std::fs::read(p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::BadRecord {
                path: p.to_path_buf(),
                why: RecordDefect::Json(e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::SysfsRead {
            path: p.to_path_buf(),
            err: source,
        }),
    }
}

/// The record a dead session left for `bdf`, if any; one with impossible offsets is refused.
pub fn load(run_dir: &Path, bdf: Bdf) -> Result<Option<Record>> {
    let p = path(run_dir, bdf);
    let rec: Option<Record> = fetch(&p)?;
    if let Some(why) = rec.as_ref().and_then(|r| r.validate().err()) {
        return Err(Error::BadRecord { path: p, why });
    }
    Ok(rec)
}

/// Removes `bdf`'s session record, if any.
pub fn remove(run_dir: &Path, bdf: Bdf) {
    Kind::Session.remove(run_dir, bdf);
}

/// Devices with a session record in `run_dir` (left by sessions that died).
pub fn pending(run_dir: &Path) -> Vec<Bdf> {
    Kind::Session.pending(run_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config space only: a header with a capability list (PM at 0x80, then PCIe at 0x40).
    struct Config([u8; 256]);

    impl Config {
        fn put(&mut self, off: usize, v: u16) {
            self.0[off..off + 2].copy_from_slice(&v.to_le_bytes());
        }
    }

    impl Backend for Config {
        fn name(&self) -> &'static str {
            "config"
        }
        fn config_read16(&mut self, o: u16) -> std::io::Result<u16> {
            let o = o as usize;
            Ok(u16::from_le_bytes([self.0[o], self.0[o + 1]]))
        }
        fn config_write16(&mut self, o: u16, v: u16) -> std::io::Result<()> {
            self.put(o as usize, v);
            Ok(())
        }
        fn map_bar(
            &mut self,
            bar: u8,
        ) -> crate::Result<(Box<dyn crate::device::regio::RegisterIo>, u64)> {
            Err(Error::Map {
                bdf: "0000:00:00.0".parse().unwrap(),
                bar,
                via: "a config-only fake",
                why: crate::access::failure::MapFailure::Unassigned,
            })
        }
    }

    /// A BAR that reads 0 while the kernel assigned it an address (a function reset nobody
    /// repaired) is recorded with the kernel's address, so the next session puts it back
    /// instead of taking 0 for the truth; a BAR that holds an address is left as it reads.
    #[test]
    fn a_lost_bar_is_recorded_with_the_kernels_address() {
        let mut words: Vec<(u16, u16)> = (0x10..0x20).step_by(2).map(|o| (o, 0)).collect();
        words[0].1 = 0x0004; // BAR0's type bits: 64-bit memory
        let res = [
            (0x3_0001_fe00_0000, IORESOURCE_MEM | IORESOURCE_MEM_64), // BAR0 (+ BAR1: upper half)
            (0, 0),
            (0xfd00_0000, IORESOURCE_MEM), // BAR2, 32-bit
            (0x1_0000, 0x101),             // BAR3, I/O: never filled in
        ];
        let filled = fill_lost_bars(&mut words, &res);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(filled, [0x12, 0x14, 0x16, 0x1a]);
            assert_eq!(
                words,
                [
                    (0x10, 0x0004),
                    (0x12, 0xfe00),
                    (0x14, 0x0001),
                    (0x16, 0x0003),
                    (0x18, 0),
                    (0x1a, 0xfd00),
                    (0x1c, 0),
                    (0x1e, 0)
                ]
            );
        }
        let mut held = vec![(0x10, 0x0004), (0x12, 0xfd00), (0x14, 0), (0x16, 0)];
        assert!(fill_lost_bars(&mut held, &res).is_empty());
        assert_eq!(held[1], (0x12, 0xfd00));
    }

    /// A record that cannot be read is an error naming it, never "no record": it may hold the
    /// only copy of what the host needs back.
    #[test]
    fn an_unreadable_record_is_an_error_not_absence() {
        let t = tempfile::tempdir().unwrap();
        let bdf: Bdf = "0000:03:00.0".parse().unwrap();
        assert!(load(t.path(), bdf).unwrap().is_none());
        std::fs::create_dir(path(t.path(), bdf)).unwrap(); // reads fail with EISDIR
        let e = load(t.path(), bdf).unwrap_err();
        assert!(e.to_string().contains("0000:03:00.0.json"), "{e}");
    }

    #[test]
    fn the_snapshot_saves_the_pcie_control_words_with_aspm_cleared() {
        let mut c = Config([0; 256]);
        c.put(0x06, 0x0010); // Status.CAP_LIST
        c.put(0x34, 0x80);
        c.put(0x80, 0x4001); // PM, next 0x40
        c.put(0x40, 0x0010); // PCIe, last
        c.put(0x10, 0xfe00); // BAR0
        c.put(0x40 + 0x08, 0x2810); // Device Control
        c.put(0x40 + 0x10, 0x0143); // Link Control: ASPM L0s|L1 on, CCC, RCB
        c.put(0x40 + 0x28, 0x0400); // Device Control 2
        c.put(0x40 + 0x30, 0x0003); // Link Control 2
        c.put(0x3c, 0xffff); // an all-ones word is not saved
        let s = snapshot(&mut c);
        assert!(s.contains(&(0x10, 0xfe00)), "{s:?}");
        assert!(
            s.contains(&(0x50, 0x0140)),
            "LnkCtl saved without ASPM: {s:?}"
        );
        assert!(s.contains(&(0x48, 0x2810)), "{s:?}");
        assert!(
            s.contains(&(0x68, 0x0400)) && s.contains(&(0x70, 0x0003)),
            "{s:?}"
        );
        assert!(!s.iter().any(|&(o, _)| o == 0x3c), "{s:?}");
        // No capability list: only the header words.
        c.put(0x06, 0);
        assert!(!snapshot(&mut c).iter().any(|&(o, _)| o >= 0x40));
    }
}
