//! The guest's initramfs: busybox, the kernel modules a scenario needs (with their dependencies,
//! resolved by the host's modprobe against the unpacked kernel), our static binaries and the
//! scenario's /init, written as an uncompressed newc cpio.
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use super::host::Kernel;
use crate::toolchain::run;

/// Whether the unpacked kernel has module `name` (or has it built in).
pub fn has_module(kernel: &Kernel, name: &str) -> bool {
    Command::new("modprobe")
        .arg("-d")
        .arg(&kernel.root)
        .args(["-S", &kernel.version, "--show-depends", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub struct Initramfs {
    dir: tempfile::TempDir,
}

impl Initramfs {
    pub fn new(kernel: &Kernel, modules: &[&str]) -> anyhow::Result<Initramfs> {
        let dir = tempfile::tempdir()?;
        let st = dir.path();
        for d in ["bin", "dev", "proc", "sys", "tmp", "run", "etc", "mnt"] {
            std::fs::create_dir_all(st.join(d))?;
        }
        symlink("bin", st.join("sbin"))?; // the kernel's request_module runs /sbin/modprobe
        std::fs::copy("/bin/busybox", st.join("bin/busybox"))
            .context("copying /bin/busybox (busybox-static)")?;
        let list = Command::new("/bin/busybox").arg("--list").output()?;
        for applet in String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter(|a| *a != "busybox")
        {
            symlink("busybox", st.join("bin").join(applet))?;
        }
        let kv = &kernel.version;
        let mods = st.join("lib/modules").join(kv);
        std::fs::create_dir_all(&mods)?;
        for m in modules {
            let out = Command::new("modprobe")
                .arg("-d")
                .arg(&kernel.root)
                .args(["-S", kv, "--show-depends", m])
                .output()?;
            if !out.status.success() {
                bail!(
                    "module {m} not found in {}: {}",
                    kernel.package,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Some(ko) = line
                    .strip_prefix("insmod ")
                    .map(|l| l.split_whitespace().next().unwrap_or(""))
                else {
                    continue;
                };
                let rel = Path::new(ko)
                    .strip_prefix(&kernel.root)
                    .context("module outside the kernel tree")?;
                let dest = st.join(
                    rel.to_str()
                        .unwrap()
                        .trim_end_matches(".xz")
                        .trim_end_matches(".zst"),
                );
                std::fs::create_dir_all(dest.parent().unwrap())?;
                let data = match Path::new(ko).extension().and_then(|e| e.to_str()) {
                    Some("xz") => Command::new("xz").args(["-dc", ko]).output()?.stdout,
                    Some("zst") => Command::new("zstd").args(["-dcq", ko]).output()?.stdout,
                    _ => std::fs::read(ko)?,
                };
                std::fs::write(dest, data)?;
            }
        }
        for f in [
            "modules.order",
            "modules.builtin",
            "modules.builtin.modinfo",
        ] {
            let src = kernel.root.join("lib/modules").join(kv).join(f);
            if src.exists() {
                std::fs::copy(src, mods.join(f))?;
            }
        }
        run(Command::new("depmod").arg("-b").arg(st).arg(kv))?;
        Ok(Initramfs { dir })
    }

    pub fn add(&self, src: &Path, dest: &str) -> anyhow::Result<()> {
        let to = self.dir.path().join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
        Ok(())
    }

    pub fn add_text(&self, dest: &str, text: &str, mode: u32) -> anyhow::Result<()> {
        let to = self.dir.path().join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::write(&to, text)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
        let mut ino = 1u32;
        let mut entries = Vec::new();
        walk(self.dir.path(), &mut entries)?;
        for path in entries {
            let rel = path
                .strip_prefix(self.dir.path())?
                .to_str()
                .context("non-UTF-8 path")?
                .to_string();
            let meta = std::fs::symlink_metadata(&path)?;
            let data = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)?
                    .to_str()
                    .context("non-UTF-8 link")?
                    .as_bytes()
                    .to_vec()
            } else if meta.is_file() {
                std::fs::read(&path)?
            } else {
                Vec::new()
            };
            entry(&mut w, ino, meta.mode(), &rel, &data)?;
            ino += 1;
        }
        entry(&mut w, ino, 0, "TRAILER!!!", &[])?;
        w.flush()?;
        Ok(())
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    children.sort();
    for c in children {
        out.push(c.clone());
        if std::fs::symlink_metadata(&c)?.is_dir() {
            walk(&c, out)?;
        }
    }
    Ok(())
}

fn pad4(w: &mut impl std::io::Write, len: usize) -> std::io::Result<()> {
    w.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

/// One newc record (Documentation/driver-api/early-userspace/buffer-format.rst).
fn entry(
    w: &mut impl std::io::Write,
    ino: u32,
    mode: u32,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad4(w, data.len())
}
