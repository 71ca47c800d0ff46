//! The per-device lock every command that writes to a device takes (`reset`, `status`, the
//! agent, the hook scripts through the CLI), so two writers never interleave register sequences;
//! and the flock it is built on, for host-wide locks (the power cycle's `autoprobe.lock`).
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

use crate::Error;
use crate::bdf::Bdf;

/// Where locks and crash records live.
pub const DEFAULT_RUN_DIR: &str = "/run/qcom-reset";

/// A device's lock (`<run_dir>/<BDF>.lock`), held while the value lives.
#[derive(Debug)]
pub struct DeviceLock {
    _file: File,
    /// The lock file.
    pub path: PathBuf,
}

impl DeviceLock {
    /// Takes the lock, waiting up to `wait` for another holder to finish.
    pub fn acquire(run_dir: &Path, bdf: Bdf, wait: Duration) -> Result<DeviceLock, Error> {
        let path = run_dir.join(format!("{bdf}.lock"));
        match exclusive(&path, wait)? {
            Some(file) => Ok(DeviceLock { _file: file, path }),
            None => Err(Error::Busy { bdf, path }),
        }
    }
}

/// An exclusive flock on `path` (created, with its directory, if missing), waiting up to `wait`
/// for another holder; None when another still holds it then. The kernel releases it when the
/// holder's file closes, also when the holder is killed.
pub fn exclusive(path: &Path, wait: Duration) -> Result<Option<File>, Error> {
    let lock_err = |source| Error::Lock {
        path: path.to_path_buf(),
        err: source,
    };
    fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(lock_err)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(lock_err)?;
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(Some(file)),
            // A deferred Ctrl-C ends the wait: nothing was written yet.
            Err(e)
                if e == rustix::io::Errno::WOULDBLOCK
                    && Instant::now() < deadline
                    && !crate::signals::pending() =>
            {
                if !std::mem::replace(&mut said, true) {
                    tracing::info!(
                        "{}: {}, waiting up to {wait:?}",
                        path.display(),
                        held_by(&file)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => return Ok(None),
            Err(e) => return Err(lock_err(e.into())),
        }
    }
}

/// Who holds the lock on `file`, from /proc/locks (the PID that took it and its name), for the
/// line a wait prints.
fn held_by(file: &File) -> String {
    let holder = rustix::fs::fstat(file).ok().and_then(|st| {
        let locks = fs::read_to_string("/proc/locks").ok()?;
        holder_pid(&locks, st.st_ino)
    });
    match holder {
        Some(pid) => {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("held by PID {pid} ({})", comm.trim())
        }
        None => "held by another process".into(),
    }
}

/// The PID holding a lock on inode `ino` in /proc/locks ("1: FLOCK ADVISORY WRITE 1234
/// 00:1a:5678 0 EOF"); waiters ("1: -> FLOCK …") are not holders.
fn holder_pid(locks: &str, ino: u64) -> Option<u32> {
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [_, kind, _, _, pid, dev_ino, ..] = f.as_slice() else {
            return None;
        };
        let on = dev_ino.rsplit(':').next()?.parse::<u64>().ok()? == ino;
        (*kind != "->" && on).then(|| pid.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let t = tempfile::tempdir().unwrap();
        let bdf: Bdf = "0000:03:00.0".parse().unwrap();
        let a = DeviceLock::acquire(t.path(), bdf, Duration::ZERO).unwrap();
        assert!(matches!(
            DeviceLock::acquire(t.path(), bdf, Duration::from_millis(120)),
            Err(Error::Busy { .. })
        ));
        let other: Bdf = "0000:04:00.0".parse().unwrap();
        DeviceLock::acquire(t.path(), other, Duration::ZERO)
            .expect("other devices are independent");
        drop(a);
        DeviceLock::acquire(t.path(), bdf, Duration::ZERO).expect("free after release");
    }

    #[test]
    fn the_holder_is_named_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:1a:77 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 5151 00:1a:77 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 99 08:01:78 0 EOF\n";
        assert_eq!(holder_pid(locks, 77), Some(4242));
        assert_eq!(holder_pid(locks, 78), Some(99));
        assert_eq!(holder_pid(locks, 79), None);
        assert_eq!(holder_pid("garbage\n", 77), None);
        // This process's own lock, through another open file description.
        let t = tempfile::tempdir().unwrap();
        let held = exclusive(&t.path().join("x.lock"), Duration::ZERO)
            .unwrap()
            .unwrap();
        let other = File::open(t.path().join("x.lock")).unwrap();
        let said = held_by(&other);
        assert!(
            said.starts_with(&format!("held by PID {} (", std::process::id())),
            "{said}"
        );
        drop(held);
    }
}
