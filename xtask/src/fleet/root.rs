//! A clean Debian root for the fleet tests: made once with mmdebstrap (bookworm, apt, python3
//! and python3-apt, which Ansible's apt module needs on the managed host) into a cached tarball, unpacked anew for
//! each test, /proc mounted, discarded after.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};

use crate::toolchain;

pub struct DebianRoot {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    proc_mounted: bool,
}

impl DebianRoot {
    pub fn new() -> anyhow::Result<DebianRoot> {
        let tar = tarball()?;
        let dir = tempfile::tempdir_in("/var/tmp")?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root)?;
        toolchain::run(
            Command::new("tar")
                .arg("-xf")
                .arg(&tar)
                .arg("-C")
                .arg(&root),
        )?;
        toolchain::run(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(root.join("proc")),
        )?;
        Ok(DebianRoot {
            _dir: dir,
            root,
            proc_mounted: true,
        })
    }

    /// Runs `script` with sh inside the root; its output, or an error with it.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self.sh_status(script)?;
        ensure!(out.0, "in the Debian root, `{script}` failed:\n{}", out.1);
        Ok(out.1)
    }

    /// Runs `script` inside the root: whether it succeeded, and its output.
    pub fn sh_status(&self, script: &str) -> anyhow::Result<(bool, String)> {
        chroot_sh(&self.root, script)
    }

    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Copies a host directory into the root (replacing what was there).
    pub fn copy_in(&self, from: &Path, to: &str) -> anyhow::Result<()> {
        let dest = self.path(to);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(dest.parent().context("no parent")?)?;
        toolchain::run(Command::new("cp").arg("-a").arg(from).arg(&dest))
    }
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        if self.proc_mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.root.join("proc"))
                .status();
        }
    }
}

/// bookworm with apt, python3 and python3-apt, made by mmdebstrap on first use (about 100 MB of packages).
fn tarball() -> anyhow::Result<PathBuf> {
    let dir = crate::vm::cache_dir().join("fleet");
    let tar = dir.join("bookworm-root-2.tar");
    if tar.exists() {
        return Ok(tar);
    }
    if Command::new("mmdebstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        crate::vm::apt_install(&["mmdebstrap"])?;
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "xtask: making a clean Debian root with mmdebstrap (bookworm, apt, python3; a minute or two, cached after)"
    );
    let tmp = dir.join("bookworm-root-2.tmp.tar");
    toolchain::run(
        Command::new("mmdebstrap")
            .args([
                "--quiet",
                "--variant=apt",
                "--include=python3,python3-apt",
                "bookworm",
            ])
            .arg(&tmp),
    )
    .context("mmdebstrap")?;
    std::fs::rename(&tmp, &tar)?;
    Ok(tar)
}

/// Runs `script` with sh chrooted into `root` (apt and dpkg without questions): whether it
/// succeeded, and its output.
pub fn chroot_sh(root: &Path, script: &str) -> anyhow::Result<(bool, String)> {
    let out = Command::new("chroot")
        .arg(root)
        .args(["sh", "-c", script])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}
