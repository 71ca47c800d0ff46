//! Exclusive ownership of a device for a whole session. A device bound to vfio-pci is owned by
//! holding its VFIO group open: the kernel makes that open exclusive (EBUSY while QEMU or any
//! process holds the group, or has bound the device's iommufd cdev), opening the group alone
//! runs no kernel reset, and a VM that tries to start meanwhile fails cleanly instead of sharing
//! a card mid-reset. The `/proc` scan only names who holds it (and sees a cdev opened but not
//! yet bound). What the group does not block is an unbind from vfio-pci: the session checks the
//! driver before its sequence and leaves config space alone if a new driver took the device.
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::host::holders;
use crate::host::sysfs::SysfsDevice;
use crate::{Error, Result};

/// Why the VFIO group of a card bound to vfio-pci could not be held (EBUSY, a holder, is
/// `Error::Held`).
#[derive(Debug)]
pub enum NotOwnable {
    /// The card is on vfio-pci but has no IOMMU group.
    NoIommuGroup,
    /// The group node does not exist.
    NoGroupNode(PathBuf),
    /// The group node cannot be opened (other than EBUSY).
    Open {
        /// The group node.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
}

impl std::fmt::Display for NotOwnable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotOwnable::NoIommuGroup => {
                f.write_str("it is bound to vfio-pci but has no IOMMU group")
            }
            NotOwnable::NoGroupNode(p) => write!(
                f,
                "{} does not exist (is /dev mounted and vfio loaded?)",
                p.display()
            ),
            NotOwnable::Open { path, err } => write!(f, "cannot open {}: {err}", path.display()),
        }
    }
}

/// How a group node is opened: for real, or by a test's stand-in (a fake /dev cannot answer
/// the kernel's EBUSY).
#[derive(Clone)]
pub struct GroupOpener(std::sync::Arc<OpenFn>);

type OpenFn = dyn Fn(&Path) -> std::io::Result<File> + Send + Sync;

impl GroupOpener {
    /// Opens group nodes with `open` (tests give a fake).
    pub fn new(open: impl Fn(&Path) -> std::io::Result<File> + Send + Sync + 'static) -> Self {
        GroupOpener(std::sync::Arc::new(open))
    }
}

impl Default for GroupOpener {
    fn default() -> Self {
        GroupOpener::new(|p| File::options().read(true).write(true).open(p))
    }
}

impl std::fmt::Debug for GroupOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupOpener")
    }
}

/// What a session holds so nothing else can open the device while it writes.
#[derive(Debug)]
pub struct Ownership {
    /// The VFIO group; None for a device on no driver (nothing can open it through VFIO) or,
    /// with `--force`, on another driver.
    group: Option<Group>,
    /// The driver the card had when it was owned: the one the session expects throughout.
    driver: Option<String>,
    /// A descriptor of the group was handed out (the VFIO access path): it keeps the group busy
    /// whatever this session closes, so the group is never let go.
    lent: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Group {
    path: PathBuf,
    /// Open while the session owns the card; None while it is let go ([`Ownership::let_go`]).
    file: Option<File>,
    /// Where holders are named from when it cannot be taken back.
    proc_root: PathBuf,
    /// The device's nodes, for naming a holder.
    dev: SysfsDevice,
    opener: GroupOpener,
}

impl Ownership {
    /// Owns `dev`: opens its VFIO group when it is bound to vfio-pci. Fails closed: a group that
    /// cannot be opened, for any reason, means the device is not ours to write.
    pub fn take(
        dev_vfio: &Path,
        proc_root: &Path,
        dev: &SysfsDevice,
        opener: &GroupOpener,
    ) -> Result<Ownership> {
        let driver = dev.driver()?;
        if driver.as_deref() != Some("vfio-pci") {
            return Ok(Ownership {
                group: None,
                driver,
                lent: Default::default(),
            });
        }
        let Some(group) = dev.iommu_group()? else {
            return Err(Error::NotOwned {
                bdf: dev.bdf,
                why: NotOwnable::NoIommuGroup,
            });
        };
        let mut g = Group {
            path: group_node(dev_vfio, &group),
            file: None,
            proc_root: proc_root.to_path_buf(),
            dev: dev.clone(),
            opener: opener.clone(),
        };
        g.open()?;
        Ok(Ownership {
            group: Some(g),
            driver,
            lent: Default::default(),
        })
    }

    /// A second descriptor of the held group, for the VFIO access path (the group stays owned
    /// by this session: exclusivity belongs to the open, not to one descriptor).
    pub fn group_fd(&self) -> Option<std::io::Result<OwnedFd>> {
        let file = self.group.as_ref()?.file.as_ref()?;
        self.lent.store(true, std::sync::atomic::Ordering::Relaxed);
        Some(file.try_clone().map(OwnedFd::from))
    }

    /// Lets the group go while the session only reads (its verification polls for up to 8 s),
    /// so a VM that starts meanwhile opens the card instead of failing with EBUSY. True when a
    /// group was let go; [`Ownership::take_back`] must succeed before the session writes again.
    /// Never once a descriptor was handed out ([`Ownership::group_fd`]): the VFIO backend's
    /// keeps the group busy, and closing it would run the kernel's release path.
    pub fn let_go(&mut self) -> bool {
        if !self.can_let_go() {
            return false;
        }
        match &mut self.group {
            Some(g) if g.file.is_some() => {
                g.file = None;
                true
            }
            _ => false,
        }
    }

    /// Whether a held group could be let go: one is held and no descriptor of it was lent.
    pub fn can_let_go(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.file.is_some())
            && !self.lent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the group is let go now.
    pub fn is_let_go(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.file.is_none())
    }

    /// Takes a let-go group back: an error (a VM opened it meanwhile: EBUSY, with its holder
    /// named) means the card is no longer the session's to write.
    pub fn take_back(&mut self) -> Result<()> {
        match &mut self.group {
            Some(g) if g.file.is_none() => g.open(),
            _ => Ok(()),
        }
    }

    /// The driver the card had when it was owned.
    pub fn driver(&self) -> Option<&str> {
        self.driver.as_deref()
    }

    /// The held group's path, for logs.
    pub fn group_path(&self) -> Option<&Path> {
        self.group.as_ref().map(|g| g.path.as_path())
    }
}

impl Group {
    /// Opens the group node. Fails closed: a group that cannot be opened, for any reason, means
    /// the device is not ours to write.
    fn open(&mut self) -> Result<()> {
        let (bdf, path) = (self.dev.bdf, &self.path);
        let not_owned = |why| Error::NotOwned { bdf, why };
        match (self.opener.0)(path) {
            Ok(f) => {
                self.file = Some(f);
                Ok(())
            }
            Err(e) => Err(match refusal(&e) {
                Refusal::Held => {
                    let paths =
                        holders::device_paths(&self.dev).unwrap_or_else(|_| vec![path.clone()]);
                    held(bdf, &self.proc_root, &paths, path)
                }
                Refusal::Missing => not_owned(NotOwnable::NoGroupNode(path.clone())),
                Refusal::Other => not_owned(NotOwnable::Open {
                    path: path.clone(),
                    err: e,
                }),
            }),
        }
    }
}

/// Why a group open failed, as far as ownership is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// EBUSY: the kernel says another process holds the group (or a bound cdev).
    Held,
    Missing,
    Other,
}

fn refusal(e: &std::io::Error) -> Refusal {
    if e.raw_os_error() == Some(libc::EBUSY) {
        Refusal::Held
    } else if e.kind() == ErrorKind::NotFound {
        Refusal::Missing
    } else {
        Refusal::Other
    }
}

/// The group's node: `/dev/vfio/N`, or `/dev/vfio/noiommu-N` for a group vfio created in
/// no-IOMMU mode (`enable_unsafe_noiommu_mode`).
fn group_node(dev_vfio: &Path, group: &str) -> PathBuf {
    let plain = dev_vfio.join(group);
    let noiommu = dev_vfio.join(format!("noiommu-{group}"));
    if !plain.exists() && noiommu.exists() {
        noiommu
    } else {
        plain
    }
}

/// Who holds the device, from `/proc`; the kernel's EBUSY is the proof, this only names it.
/// Another qcom-reset session (a hook's `reset`, or this agent's session on another function
/// of the same IOMMU group) is told apart from a VM: it ends by itself.
fn held(bdf: crate::bdf::Bdf, proc_root: &Path, paths: &[PathBuf], group: &Path) -> Error {
    let found = holders::find(proc_root, paths, None);
    let ours = |h: &&holders::Holder| h.pid == std::process::id() || h.comm == holders::OWN_COMM;
    if let Some(h) = found.iter().find(ours) {
        return Error::HeldBySession {
            bdf,
            holder: h.to_string(),
        };
    }
    let holder = match found.first() {
        Some(h) => h.to_string(),
        None => format!(
            "a process not visible in {} (another PID namespace?) through {}",
            proc_root.display(),
            group.display()
        ),
    };
    Error::Held { bdf, holder }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_means_held_and_every_other_failure_fails_closed() {
        use std::io::Error as E;
        assert_eq!(refusal(&E::from_raw_os_error(libc::EBUSY)), Refusal::Held);
        assert_eq!(
            refusal(&E::from_raw_os_error(libc::ENOENT)),
            Refusal::Missing
        );
        assert_eq!(refusal(&E::from_raw_os_error(libc::EACCES)), Refusal::Other);
        assert_eq!(refusal(&E::from_raw_os_error(libc::EISDIR)), Refusal::Other);
    }

    #[test]
    fn the_holder_is_named_or_said_to_be_invisible() {
        let proc = tempfile::tempdir().unwrap();
        let group = Path::new("/dev/vfio/12");
        let paths = vec![group.to_path_buf()];
        let bdf = "0000:03:00.0".parse().unwrap();
        let unseen = held(bdf, proc.path(), &paths, group).to_string();
        assert!(
            unseen.contains("not visible") && unseen.contains("/dev/vfio/12"),
            "{unseen}"
        );
        let hold = |pid: u32, comm: &str| {
            let fd = proc.path().join(format!("{pid}/fd"));
            std::fs::create_dir_all(&fd).unwrap();
            std::fs::write(proc.path().join(format!("{pid}/comm")), format!("{comm}\n")).unwrap();
            std::os::unix::fs::symlink(group, fd.join("9")).unwrap();
        };
        hold(4242, "qemu-system-x86");
        let e = held(bdf, proc.path(), &paths, group);
        assert!(matches!(e, Error::Held { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("pid 4242 (qemu-system-x86) through /dev/vfio/12")
                && e.to_string().contains("stop or detach the VM"),
            "{e}"
        );
        // Issue 17: another qcom-reset session is no VM to stop.
        hold(4343, "qcom-reset");
        let e = held(bdf, proc.path(), &paths, group);
        assert!(
            matches!(e, Error::HeldBySession { .. }) && e.to_string().contains("wait for it"),
            "{e}"
        );
    }

    /// A no-IOMMU group's node is `noiommu-N`: owned through it, not reported missing.
    #[test]
    fn a_noiommu_group_is_owned_through_its_own_node() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(group_node(d.path(), "7"), d.path().join("7"));
        std::fs::write(d.path().join("noiommu-7"), "").unwrap();
        assert_eq!(group_node(d.path(), "7"), d.path().join("noiommu-7"));
    }
}
