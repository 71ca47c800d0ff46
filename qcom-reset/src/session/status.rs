//! A card's state without resetting it: registers read only when nothing else owns the card,
//! and, observe-only, only when reading writes nothing.
use serde::Serialize;

use super::guard::{Restored, Session, Writes};
use super::{Opener, Target, begin_session, inspect};
use crate::device::verdict::{self, Verdict};
use crate::host::Host;
use crate::host::lock::DeviceLock;
use crate::pci::*;
use crate::{Error, Result};

use super::target::Regime;

/// A card's state without resetting it.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// What the host shows about it.
    #[serde(flatten)]
    pub target: Target,
    /// The kernel has `device_specific` for it.
    pub kernel_device_specific: bool,
    /// Its reset regime.
    pub regime: Regime,
    /// The verdict, or why the registers were not read (serialized as `verdict` and `skipped`,
    /// one of them null).
    #[serde(flatten)]
    pub reading: Reading,
}

/// What a status read came to.
#[derive(Clone, Debug)]
pub enum Reading {
    /// The registers were read and judged.
    Judged(Verdict),
    /// They were not read, and why.
    Unread(Unread),
}

impl Serialize for Reading {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let (verdict, skipped) = match self {
            Reading::Judged(v) => (Some(v), None),
            Reading::Unread(u) => (None, Some(u)),
        };
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("verdict", &verdict)?;
        m.serialize_entry("skipped", &skipped)?;
        m.end()
    }
}

impl Status {
    /// The verdict, when the registers were read.
    pub fn verdict(&self) -> Option<&Verdict> {
        match &self.reading {
            Reading::Judged(v) => Some(v),
            Reading::Unread(_) => None,
        }
    }

    /// Why the registers were not read, when they were not.
    pub fn unread(&self) -> Option<&Unread> {
        match &self.reading {
            Reading::Judged(_) => None,
            Reading::Unread(u) => Some(u),
        }
    }
}

/// Why a device's registers were not read (serialized as the sentence alone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Unread {
    /// Something holds the device (a VM's QEMU, another session): its letting go ends this.
    Held(String),
    /// Reading is not for us now: a host driver has it, observe-only cannot wake it, access
    /// through VFIO would reset it.
    Refused(String),
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unread::Held(why) | Unread::Refused(why) => f.write_str(why),
        }
    }
}

impl Unread {
    /// A refusal as the reason: held when something holds the device.
    fn of(e: &Error) -> Unread {
        match e {
            Error::Held { .. } | Error::HeldBySession { .. } => Unread::Held(e.to_string()),
            _ => Unread::Refused(e.to_string()),
        }
    }
}

/// Whether reading a device's registers may change its state on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Wake it (power/control on) and enable memory decoding, restoring both afterwards.
    EnableAndRestore,
    /// Write nothing at all (observe-only): read only if it is already awake and decoding.
    NoWrites,
}

/// A device's state without its registers, and why they were not read.
pub fn unread_status(t: Target, why: Unread) -> Status {
    Status {
        regime: t.regime(),
        kernel_device_specific: t.kernel_has_device_specific(),
        target: t,
        reading: Reading::Unread(why),
    }
}

/// Reads a device's state; registers only when it is safe (not held, vfio-pci or no driver).
pub fn status(host: &Host, t: Target, open: &mut Opener<'_>, mode: ReadMode) -> Result<Status> {
    let again = (Some(t.profile.name), Some(t.profile.bar));
    let (t, _lock, mut session) = match own(host, t, open, mode, again)? {
        Owned::Yes(o) => {
            let o = *o;
            (o.target, o.lock, o.session)
        }
        Owned::No(status) => return Ok(*status),
    };
    let regs = match read_owned(&mut session, &t, mode)? {
        Ok(regs) => regs,
        Err(why) => {
            drop(session);
            return Ok(unread_status(t, why));
        }
    };
    session.restore();
    drop(session);
    let verdict = verdict::judge(&t.expect(false), &regs);
    Ok(judged(t, verdict))
}

/// A card owned for reading (and, by a check-then-reset, for its reset).
pub(super) struct Own {
    /// When owning began, its lock taken: a reset in this session counts its time from here.
    pub since: std::time::Instant,
    pub target: Target,
    pub lock: DeviceLock,
    pub session: Session,
    pub recovered: Option<Restored>,
}

pub(super) enum Owned {
    Yes(Box<Own>),
    /// Not owned, and why: the status that says so.
    No(Box<Status>),
}

/// Owns a card for reading: not while anything holds it or a host driver has it; observe-only
/// only when reading writes nothing. The card is inspected again after the lock wait, with
/// `again`'s profile and BAR: a status keeps the profile it found, a check that may reset asks
/// for the card's own by its IDs (the name's first row may be another device's).
pub(super) fn own(
    host: &Host,
    t: Target,
    open: &mut Opener<'_>,
    mode: ReadMode,
    again: (Option<&str>, Option<u8>),
) -> Result<Owned> {
    let skipped = |t, why| Ok(Owned::No(Box::new(unread_status(t, why))));
    if let Some(e) = t.refusal(false) {
        return skipped(t, Unread::of(&e));
    }
    if mode == ReadMode::NoWrites
        && let Some(p) = t.power_control.clone().filter(|p| p != "on")
    {
        return skipped(
            t,
            Unread::Refused(format!(
                "reading needs power/control=on (it is {p}) and observe-only writes nothing"
            )),
        );
    }
    let lock = DeviceLock::acquire(&host.run_dir, t.bdf, host.lock_wait)?;
    let since = std::time::Instant::now();
    // The wait may have been long: a VM may have opened the card or a host driver taken it.
    let t = inspect(host, t.bdf, again.0, again.1)?;
    if let Some(e) = t.refusal(false) {
        return skipped(t, Unread::of(&e));
    }
    // Owned after the lock: a VM that opened the device meanwhile makes this fail with Held.
    let writes = match mode {
        ReadMode::EnableAndRestore => Writes::Allowed,
        ReadMode::NoWrites => Writes::None,
    };
    match begin_session(host, &t.dev, open, writes) {
        Ok((session, recovered)) => Ok(Owned::Yes(Box::new(Own {
            since,
            target: t,
            lock,
            session,
            recovered,
        }))),
        Err(e @ (Error::Held { .. } | Error::HeldBySession { .. })) => skipped(t, Unread::of(&e)),
        Err(e) => Err(e),
    }
}

/// The card's registers in a session that owns it; what keeps them unread otherwise.
pub(super) fn read_owned(
    session: &mut Session,
    t: &Target,
    mode: ReadMode,
) -> Result<std::result::Result<verdict::Registers, Unread>> {
    let (vendor, device) = session.config_ids();
    let mut regs = verdict::Registers {
        config_vendor: vendor,
        config_device: device,
        ..Default::default()
    };
    if (vendor, device) == (t.vendor, t.device) {
        if mode == ReadMode::NoWrites {
            let cmd = session.backend.config_read16(PCI_COMMAND).unwrap_or(0);
            if cmd & PCI_COMMAND_MEMORY == 0 {
                return Ok(Err(Unread::Refused(format!(
                    "reading needs memory decoding (PCI_COMMAND={cmd:#06x}) and observe-only writes nothing"
                ))));
            }
        } else {
            session.enable_memory()?;
        }
        let (mut bar, len) = session.backend.map_bar(t.profile.bar)?;
        regs = verdict::read_registers(&t.expect(false), vendor, device, bar.as_mut(), len);
    }
    Ok(Ok(regs))
}

/// A status with its verdict.
pub(super) fn judged(t: Target, verdict: Verdict) -> Status {
    Status {
        regime: t.regime(),
        kernel_device_specific: t.kernel_has_device_specific(),
        target: t,
        reading: Reading::Judged(verdict),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::verdict::{Health, Registers};

    /// `status --json`, the journal and the lab read `verdict` and `skipped`, one of them null.
    #[test]
    fn a_reading_serializes_as_a_verdict_or_a_reason_the_other_null() {
        let unread = Reading::Unread(Unread::Held("held by pid 7 (qemu)".into()));
        assert_eq!(
            serde_json::to_value(&unread).unwrap(),
            serde_json::json!({"verdict": null, "skipped": "held by pid 7 (qemu)"})
        );
        let judged = Reading::Judged(Verdict {
            health: Health::Clean,
            expected: "MHI READY",
            detail: "ready".into(),
            registers: Registers::default(),
        });
        let v = serde_json::to_value(&judged).unwrap();
        assert_eq!(v["skipped"], serde_json::Value::Null);
        assert_eq!(v["verdict"]["health"], "clean", "{v}");
    }
}
