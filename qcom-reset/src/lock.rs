//! The per-device lock every command that writes to a device takes (`reset`, `status`, the
//! agent, the hook scripts through the CLI), so two writers never interleave register sequences.
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
        let lock_err = |source| Error::Lock {
            path: path.clone(),
            err: source,
        };
        fs::create_dir_all(run_dir).map_err(lock_err)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        let deadline = Instant::now() + wait;
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(DeviceLock { _file: file, path }),
                Err(e) if e == rustix::io::Errno::WOULDBLOCK && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                    return Err(Error::Busy { bdf, path });
                }
                Err(e) => return Err(lock_err(e.into())),
            }
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
