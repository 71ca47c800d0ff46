//! `--kernel builtin-vfio`: a small kernel built from Debian's `linux-source-6.12` binary package
//! (the source tarball; plain source packages are not served here) with VFIO built in
//! (`CONFIG_VFIO_PCI_CORE=y`, as Ubuntu-derived kernels such as Proxmox VE's have it). The pinned
//! 6.12.95 predates the June 2026 stable fix, so `needs_reset` is also the 1-bit bitfield those
//! hosts have. Built once and cached; about 15 minutes on 2 cores.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};

use super::host::{self, Apt, BASE_SUITES, Kernel};
use crate::toolchain::run;

pub const NAME: &str = "builtin-vfio";
const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// bookworm-backports' build; later ones carry the stable fix that made `needs_reset` a bool.
const SOURCE_VERSION: &str = "6.12.95-1~bpo12+1";
const FRAGMENT: &str = include_str!("builtin-vfio.config");
const BUILD_DEPS: &[&str] = &[
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "dwarves",
    "make",
    "gcc",
];

/// The cached kernel, built first if the cache lacks it or its configuration changed.
pub fn kernel() -> anyhow::Result<Kernel> {
    let dir = host::cache_dir().join("kernels").join(NAME);
    let stamp = dir.join("fragment.config");
    let vmlinux = dir.join("vmlinux");
    let fresh = vmlinux.exists()
        && std::fs::read_to_string(&stamp)
            .is_ok_and(|s| s == format!("{SOURCE_VERSION}\n{FRAGMENT}"));
    if !fresh {
        build(&dir)?;
        std::fs::write(&stamp, format!("{SOURCE_VERSION}\n{FRAGMENT}"))?;
    }
    let version = std::fs::read_to_string(dir.join("release"))?
        .trim()
        .to_string();
    Ok(Kernel {
        package: format!("{SOURCE_PACKAGE} {SOURCE_VERSION}, VFIO built in"),
        version,
        root: dir.join("root"),
        vmlinux,
        vfio_builtin: true,
    })
}

fn build(dir: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    host::apt_install(BUILD_DEPS)?;
    let src = unpack_source()?;
    let out = dir.join("build");
    std::fs::create_dir_all(&out)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", out.display()))
            .args(args);
        c
    };
    run(&mut make(&["-s", "tinyconfig"]))?;
    let mut config = std::fs::read_to_string(out.join(".config"))?;
    config.push_str(FRAGMENT);
    std::fs::write(out.join(".config"), config)?;
    run(&mut make(&["-s", "olddefconfig"]))?;
    let config = std::fs::read_to_string(out.join(".config"))?;
    let lost: Vec<&str> = wanted_options()
        .filter(|o| !config.lines().any(|l| l == *o))
        .collect();
    ensure!(
        lost.is_empty(),
        "kconfig dropped {lost:?} (a dependency is missing from builtin-vfio.config)"
    );
    let jobs = format!(
        "-j{}",
        std::thread::available_parallelism().map_or(2, |n| n.get())
    );
    eprintln!(
        "xtask: building {SOURCE_PACKAGE} {SOURCE_VERSION} with VFIO built in (cached after)"
    );
    run(&mut make(&["-s", &jobs, "vmlinux", "modules"]))?;
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    run(&mut make(&[
        "-s",
        "modules_install",
        &format!("INSTALL_MOD_PATH={}", root.display()),
        "DEPMOD=/sbin/depmod",
    ]))?;
    let release = String::from_utf8(make(&["-s", "kernelrelease"]).output()?.stdout)?;
    std::fs::write(dir.join("release"), &release)?;
    std::fs::copy(out.join("vmlinux"), dir.join("vmlinux"))?;
    eprintln!(
        "xtask: kernel {} built in {:.0} s",
        release.trim(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The `CONFIG_X=y` lines of the fragment: each must still be set after olddefconfig.
fn wanted_options() -> impl Iterator<Item = &'static str> {
    FRAGMENT
        .lines()
        .filter(|l| l.starts_with("CONFIG_") && l.ends_with("=y"))
}

/// The source tree, unpacked once from the package's tarball (its version in a stamp beside it).
fn unpack_source() -> anyhow::Result<std::path::PathBuf> {
    let base = host::cache_dir().join("src");
    let tree = base.join(SOURCE_PACKAGE);
    let stamp = base.join(format!("{SOURCE_PACKAGE}.version"));
    if tree.join("Makefile").exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|v| v == SOURCE_VERSION)
    {
        return Ok(tree);
    }
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&base)?;
    let apt = Apt::new("bookworm", BASE_SUITES)?;
    apt.update()?;
    run(apt
        .cmd("apt-get")
        .args([
            "download",
            "-qq",
            &format!("{SOURCE_PACKAGE}={SOURCE_VERSION}"),
        ])
        .current_dir(&base))?;
    let deb = std::fs::read_dir(&base)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{SOURCE_PACKAGE}_")) && n.ends_with(".deb")
            })
        })
        .with_context(|| format!("downloaded {SOURCE_PACKAGE} .deb not found"))?;
    let unpacked = base.join("deb");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let tarball = unpacked.join(format!("usr/src/{SOURCE_PACKAGE}.tar.xz"));
    let tmp = base.join("unpacking");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tmp))?;
    std::fs::rename(tmp.join(SOURCE_PACKAGE), &tree)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_file(&deb);
    if !tree.join("Makefile").exists() {
        bail!("{} has no kernel tree", tarball.display());
    }
    std::fs::write(&stamp, SOURCE_VERSION)?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_builds_vfio_in_with_btf_and_kprobes() {
        let wanted: Vec<&str> = wanted_options().collect();
        for o in [
            "CONFIG_VFIO_PCI_CORE=y",
            "CONFIG_VFIO_PCI=y",
            "CONFIG_DEBUG_INFO_BTF=y",
            "CONFIG_KPROBES=y",
            "CONFIG_PVH=y",
            "CONFIG_PID_NS=y",
        ] {
            assert!(wanted.contains(&o), "{o} missing");
        }
        assert!(
            !FRAGMENT.lines().any(|l| l.ends_with("=m")),
            "nothing as a module"
        );
    }
}
