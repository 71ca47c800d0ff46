//! Kernels the lab builds itself from Debian's `linux-source-*` binary packages (the source
//! tarballs; plain source packages are not served here): `make tinyconfig` plus a fragment of
//! what the lab needs, VFIO built in. Each is built once and cached (about 15 minutes on 2
//! cores), and rebuilt only when its source version, fragment or patches change.
//!
//! - `builtin-vfio`: 6.12.95 with `CONFIG_VFIO_PCI_CORE=y`, as Ubuntu-derived kernels such as
//!   Proxmox VE's have it. It predates the June 2026 stable fix, so `needs_reset` is also the
//!   1-bit bitfield those hosts have.
//! - `devspecific`: 7.3.4 with the lab's own implementation of the reviewed Qualcomm
//!   device-specific reset (`devspecific-reset.patch`), what mainline is expected to get in 7.4:
//!   the regime hosts move into once they run it.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};

use super::host::{self, Apt, BASE_SUITES, Kernel};
use crate::toolchain::run;

/// A kernel the lab builds.
pub struct Spec {
    pub name: &'static str,
    source_package: &'static str,
    source_version: &'static str,
    /// The Debian suites that carry the source package.
    suites: &'static [&'static str],
    /// Appended to `make tinyconfig`'s .config; later lines win.
    fragments: &'static [&'static str],
    /// Applied with `patch -p1` to a private copy of the tree.
    patches: &'static [&'static str],
    /// Fragment lines this version has no symbol for any more (folded into another option).
    gone: &'static [&'static str],
    /// The patches add the Qualcomm device-specific reset.
    device_specific: bool,
    what: &'static str,
}

const FRAGMENT: &str = include_str!("builtin-vfio.config");
const DEVSPECIFIC_PATCH: &str = include_str!("devspecific-reset.patch");

pub const SPECS: [Spec; 2] = [
    Spec {
        name: "builtin-vfio",
        source_package: "linux-source-6.12",
        // bookworm-backports' build; later ones carry the stable fix that made `needs_reset` a bool.
        source_version: "6.12.95-1~bpo12+1",
        suites: BASE_SUITES,
        fragments: &[FRAGMENT],
        patches: &[],
        gone: &[],
        device_specific: false,
        what: "VFIO built in",
    },
    Spec {
        name: "devspecific",
        source_package: "linux-source-7.3",
        source_version: "7.3.4-1~bpo13+1",
        suites: &["trixie", "trixie-backports"],
        fragments: &[
            FRAGMENT,
            // UIO: the host driver `handover` gives the card to.
            "CONFIG_LOCALVERSION=\"-devspecific\"\nCONFIG_SYSCTL=y\nCONFIG_UIO=y\nCONFIG_UIO_PCI_GENERIC=y\n",
        ],
        patches: &[DEVSPECIFIC_PATCH],
        // 7.3 folded /proc/sys support into SYSCTL.
        gone: &["CONFIG_PROC_SYSCTL=y"],
        device_specific: true,
        what: "VFIO built in, the lab's Qualcomm device_specific reset (the expected 7.4 quirk)",
    },
];

/// The lab-built kernel of this name, if it is one.
pub fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

const BUILD_DEPS: &[&str] = &[
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "dwarves",
    "make",
    "gcc",
    "patch",
];

impl Spec {
    /// What the build depends on: a change to any of it rebuilds.
    fn inputs(&self) -> String {
        let mut s = format!("{}\n", self.source_version);
        for f in self.fragments.iter().chain(self.patches) {
            s.push_str(f);
        }
        s
    }

    fn config(&self) -> String {
        self.fragments.concat()
    }
}
/// The cached kernel, built first if the cache lacks it or its configuration changed.
pub fn kernel(spec: &Spec) -> anyhow::Result<Kernel> {
    let dir = host::cache_dir().join("kernels").join(spec.name);
    let stamp = dir.join("inputs");
    let vmlinux = dir.join("vmlinux");
    let fresh =
        vmlinux.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == spec.inputs());
    if !fresh {
        build(spec, &dir)?;
        std::fs::write(&stamp, spec.inputs())?;
    }
    let version = std::fs::read_to_string(dir.join("release"))?
        .trim()
        .to_string();
    Ok(Kernel {
        package: format!(
            "{} {}, {}",
            spec.source_package, spec.source_version, spec.what
        ),
        version,
        root: dir.join("root"),
        vmlinux,
        vfio_builtin: true,
        device_specific: spec.device_specific,
    })
}

fn build(spec: &Spec, dir: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    host::apt_install(BUILD_DEPS)?;
    let src = source_tree(spec)?;
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
    config.push_str(&spec.config());
    std::fs::write(out.join(".config"), config)?;
    run(&mut make(&["-s", "olddefconfig"]))?;
    let config = std::fs::read_to_string(out.join(".config"))?;
    let wanted = spec.config();
    let lost: Vec<&str> = wanted_options(&wanted)
        .filter(|o| !spec.gone.contains(o) && !config.lines().any(|l| l == *o))
        .collect();
    ensure!(
        lost.is_empty(),
        "kconfig dropped {lost:?} (a dependency is missing from builtin-vfio.config)"
    );
    let jobs = format!(
        "-j{}",
        std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
    );
    eprintln!(
        "xtask: building {} {} ({}; about 15 minutes, cached after)",
        spec.source_package, spec.source_version, spec.what
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
fn wanted_options(config: &str) -> impl Iterator<Item = &str> {
    config
        .lines()
        .filter(|l| l.starts_with("CONFIG_") && l.ends_with("=y"))
}

/// The spec's source tree, unpacked once from the package's tarball and patched (the version
/// and patches in a stamp beside it).
fn source_tree(spec: &Spec) -> anyhow::Result<PathBuf> {
    let base = host::cache_dir().join("src");
    let tree = base.join(spec.name);
    let stamp = base.join(format!("{}.inputs", spec.name));
    let want = format!("{}\n{}", spec.source_version, spec.patches.concat());
    if tree.join("Makefile").exists() && std::fs::read_to_string(&stamp).is_ok_and(|v| v == want) {
        return Ok(tree);
    }
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&base)?;
    let apt = Apt::new(spec.name, spec.suites)?;
    apt.update()?;
    let package = spec.source_package;
    run(apt
        .cmd("apt-get")
        .args([
            "download",
            "-qq",
            &format!("{package}={}", spec.source_version),
        ])
        .current_dir(&base))?;
    let deb = std::fs::read_dir(&base)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("downloaded {package} .deb not found"))?;
    let unpacked = base.join("deb");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let tarball = unpacked.join(format!("usr/src/{package}.tar.xz"));
    let tmp = base.join("unpacking");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tmp))?;
    std::fs::rename(tmp.join(package), &tree)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_file(&deb);
    if !tree.join("Makefile").exists() {
        bail!("{} has no kernel tree", tarball.display());
    }
    for patch in spec.patches {
        let file = base.join(format!("{}.patch", spec.name));
        std::fs::write(&file, patch)?;
        run(Command::new("patch")
            .args(["-p1", "--forward", "--quiet", "-i"])
            .arg(&file)
            .current_dir(&tree))
        .with_context(|| format!("applying {} to {package}", file.display()))?;
    }
    std::fs::write(&stamp, want)?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_builds_vfio_in_with_btf_and_kprobes() {
        let config = spec("builtin-vfio").expect("in the table").config();
        let wanted: Vec<&str> = wanted_options(&config).collect();
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
            !config.lines().any(|l| l.ends_with("=m")),
            "nothing as a module"
        );
    }

    #[test]
    fn the_devspecific_kernel_carries_the_quirk_for_the_three_ids_and_says_what_it_is() {
        let ds = spec("devspecific").expect("in the table");
        let patch = ds.patches.concat();
        assert!(patch.starts_with("qcom-reset VM-lab fixture: NOT an upstream patch"));
        for id in [
            "0x0308, reset_qcom_modem",
            "0x1103, reset_qcom_wlan",
            "0x1107, reset_qcom_wlan",
        ] {
            assert!(
                patch.contains(&format!("+\t{{ PCI_VENDOR_ID_QCOM, {id} }},")),
                "{id} missing from the reset table"
            );
        }
        // The later LOCALVERSION wins in kconfig: the release names the fixture.
        let config = ds.config();
        let last = config
            .lines()
            .rfind(|l| l.starts_with("CONFIG_LOCALVERSION="));
        assert_eq!(last, Some("CONFIG_LOCALVERSION=\"-devspecific\""));
        // A changed patch is a changed kernel.
        assert_ne!(
            ds.inputs(),
            spec("builtin-vfio").expect("in the table").inputs()
        );
        assert!(ds.inputs().contains("reset_qcom_wlan"));
    }
}
