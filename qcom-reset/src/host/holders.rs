//! Who holds a device through VFIO: any process with `/dev/vfio/<group>` or the function's VFIO
//! cdev open. Found by walking `/proc/*/fd`, like `fuser`, because the kernel exposes no holder
//! list; the proc root is a parameter for tests.
use std::fs;
use std::path::{Path, PathBuf};

use crate::host::sysfs::SysfsDevice;

/// The task name of every qcom-reset process (the kernel's `comm`, the binary's name).
pub const OWN_COMM: &str = "qcom-reset";

/// A process that holds one of a device's VFIO nodes open.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// The node it holds.
    pub path: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}) through {}", self.pid, self.comm, self.path)
    }
}

/// Paths whose open file descriptors give access to the device.
pub fn device_paths(dev: &SysfsDevice) -> crate::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    if let Some(group) = dev.iommu_group()? {
        paths.push(PathBuf::from(format!("/dev/vfio/{group}")));
        paths.push(PathBuf::from(format!("/dev/vfio/noiommu-{group}")));
    }
    for cdev in dev.vfio_cdevs() {
        paths.push(PathBuf::from(format!("/dev/vfio/devices/{cdev}")));
    }
    Ok(paths)
}

/// The processes (but `ignore_pid`) holding any of `paths` open, from `proc_root`'s fd tables.
pub fn find(proc_root: &Path, paths: &[PathBuf], ignore_pid: Option<u32>) -> Vec<Holder> {
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir(proc_root) else {
        return out;
    };
    for p in procs.filter_map(std::result::Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if Some(pid) == ignore_pid {
            continue;
        }
        // A process may exit while we look; its fds simply vanish.
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(std::result::Result::ok) {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if paths.contains(&target) {
                let comm = fs::read_to_string(p.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                out.push(Holder {
                    pid,
                    comm,
                    path: target.display().to_string(),
                });
                break;
            }
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_holding_the_group() {
        let t = tempfile::tempdir().unwrap();
        let mk = |pid: u32, comm: &str, links: &[&str]| {
            let fd = t.path().join(pid.to_string()).join("fd");
            fs::create_dir_all(&fd).unwrap();
            fs::write(
                t.path().join(pid.to_string()).join("comm"),
                format!("{comm}\n"),
            )
            .unwrap();
            for (i, l) in links.iter().enumerate() {
                std::os::unix::fs::symlink(l, fd.join(i.to_string())).unwrap();
            }
        };
        mk(10, "bash", &["/dev/null", "/dev/vfio/vfio"]);
        mk(20, "qemu-system-x86", &["/dev/vfio/vfio", "/dev/vfio/12"]);
        mk(30, "self", &["/dev/vfio/12"]);
        fs::create_dir_all(t.path().join("self")).unwrap();
        let paths = vec![PathBuf::from("/dev/vfio/12")];
        let h = find(t.path(), &paths, Some(30));
        assert_eq!(
            h,
            vec![Holder {
                pid: 20,
                comm: "qemu-system-x86".into(),
                path: "/dev/vfio/12".into()
            }]
        );
        assert!(find(t.path(), &[PathBuf::from("/dev/vfio/13")], None).is_empty());
    }
}
