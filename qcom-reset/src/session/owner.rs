//! Whether the card is still the session's: the driver and bus it had, the VFIO group held,
//! every write checked first; the verification's stretch with the group let go.
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::guard::Session;
use crate::device::regio::RegisterIo;
use crate::device::regs::*;
use crate::host::sysfs::SysfsDevice;
use crate::{Error, Result};

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
    /// Its driver cannot be read.
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
    pub(super) fn host_driver(&self) -> Option<&str> {
        self.driver.as_deref().filter(|d| *d != "vfio-pci")
    }
}

pub(super) fn node(dev: &SysfsDevice) -> Option<u64> {
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

impl Session {
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
    pub(super) fn lost_to(&self) -> Option<Lost> {
        self.taken.clone().or_else(|| self.watch.lost())
    }

    /// Starts the verification: it only reads (up to 8 s), so the VFIO group is let
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
    pub(super) fn own_again(&mut self) -> Result<()> {
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
}
