//! The per-device lock every command that writes to a device takes (`reset`, `status`, the
//! agent, the hook scripts through the CLI), so two writers never interleave register sequences;
//! and the flock it is built on, for host-wide locks (the power cycle's `autoprobe.lock`).
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

use crate::Error;
use crate::bdf::Bdf;

pub const DEFAULT_RUN_DIR: &str = "/run/qcom-reset";

#[derive(Debug)]
pub struct DeviceLock {
    _file: File,
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
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(Some(file)),
            // A deferred Ctrl-C ends the wait: nothing was written yet.
            Err(e)
                if e == rustix::io::Errno::WOULDBLOCK
                    && Instant::now() < deadline
                    && !crate::signals::pending() =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => return Ok(None),
            Err(e) => return Err(lock_err(e.into())),
        }
    }
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
}
