//! `cargo xtask package`: the Debian package admins install, built by cargo-deb from
//! `[package.metadata.deb]` in qcom-reset/Cargo.toml, with man pages and completions generated
//! by the binary itself (clap_mangen, clap_complete). `--test` installs, purges and reinstalls
//! it with the real dpkg in a throwaway root (an overlay of this machine's own root), then runs
//! lintian.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

use crate::{build_static, cargo, toolchain, workspace_root};

pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Builds the .deb and returns its path; `version` replaces the Debian version (the fleet
/// test's upgrade builds a newer one).
pub fn build_versioned(version: Option<&str>) -> anyhow::Result<PathBuf> {
    let bin = build_static()?;
    // cargo-deb reads `target/release/…` assets from target/<triple>/release with --target.
    let assets = bin.with_file_name("assets");
    let _ = std::fs::remove_dir_all(&assets);
    toolchain::run(Command::new(&bin).arg("generate-assets").arg(&assets))?;
    for page in std::fs::read_dir(assets.join("man"))? {
        toolchain::run(Command::new("gzip").arg("-9nf").arg(page?.path()))?;
    }
    toolchain::ensure_cargo_tool("cargo-deb", &["--version"], "cargo-deb", CARGO_DEB_VERSION)?;
    let out = workspace_root().join("target/debian");
    let _ = std::fs::remove_dir_all(&out);
    toolchain::run(
        cargo()
            .args(["deb", "--package", "qcom-reset", "--no-build"])
            .args(["--target", toolchain::MUSL])
            .args(version.map(|v| ["--deb-version", v]).into_iter().flatten())
            .arg("--output")
            .arg(&out),
    )?;
    let deb = std::fs::read_dir(&out)?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("cargo deb wrote no .deb")?;
    println!("{}", deb.display());
    Ok(deb)
}

pub fn run(test: bool) -> anyhow::Result<()> {
    let deb = build_versioned(None)?;
    if test {
        install_test(&deb)?;
        lintian(&deb)?;
    }
    Ok(())
}

/// A copy-on-write root: this machine's root filesystem under an overlay, discarded after.
struct ThrowawayRoot {
    dir: tempfile::TempDir,
    merged: PathBuf,
    mounts: Vec<PathBuf>,
}

impl ThrowawayRoot {
    fn new() -> anyhow::Result<ThrowawayRoot> {
        let dir = tempfile::tempdir_in("/var/tmp")?;
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(d))?;
        }
        let merged = dir.path().join("merged");
        let opts = format!(
            "lowerdir=/,upperdir={},workdir={}",
            dir.path().join("upper").display(),
            dir.path().join("work").display()
        );
        toolchain::run(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&merged),
        )
        .context("mounting the throwaway root (needs root and overlayfs)")?;
        let mut root = ThrowawayRoot {
            dir,
            merged: merged.clone(),
            mounts: vec![merged.clone()],
        };
        for (src, dst) in [("/dev", "dev"), ("/proc", "proc")] {
            let target = merged.join(dst);
            toolchain::run(Command::new("mount").args(["--bind", src]).arg(&target))?;
            root.mounts.push(target);
        }
        std::fs::create_dir_all(merged.join("tmp"))?;
        Ok(root)
    }

    fn sh(&self, script: &str) -> anyhow::Result<String> {
        let (ok, text) = crate::fleet::root::chroot_sh(&self.merged, script)?;
        ensure!(ok, "in the throwaway root, `{script}` failed:\n{text}");
        Ok(text)
    }

    fn exists(&self, p: &str) -> bool {
        self.merged
            .join(p.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    }
}

impl Drop for ThrowawayRoot {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = self.dir.path();
    }
}

const UNIT_LINK: &str = "/etc/systemd/system/multi-user.target.wants/qcom-reset.service";

fn install_test(deb: &Path) -> anyhow::Result<()> {
    // Installed on this machine before its root is overlaid, so the throwaway root has it.
    if Command::new("logrotate").arg("--version").output().is_err() {
        crate::vm::apt_install(&["logrotate"])?;
    }
    let root = ThrowawayRoot::new()?;
    std::fs::copy(deb, root.merged.join("tmp/qcom-reset.deb"))?;
    for round in ["install", "reinstall"] {
        root.sh("dpkg -i /tmp/qcom-reset.deb")?;
        let version = root.sh("qcom-reset --version")?;
        ensure!(
            version.contains(env!("CARGO_PKG_VERSION")),
            "{round}: {version}"
        );
        let conffiles = root.sh("dpkg-query -W -f='${Conffiles}' qcom-reset")?;
        for c in [
            "/etc/qcom-reset/config.toml",
            "/etc/default/qcom-reset",
            "/etc/logrotate.d/qcom-reset",
        ] {
            ensure!(
                conffiles.contains(c),
                "{round}: {c} is not a conffile: {conffiles}"
            );
        }
        // The shipped config passes the unit's ExecStartPre= check.
        root.sh("qcom-reset run --check-config")?;
        for p in [
            UNIT_LINK,
            "/usr/share/man/man8/qcom-reset.8.gz",
            "/usr/share/man/man8/qcom-reset-run.8.gz",
            "/usr/share/man/man8/qcom-reset-health.8.gz",
            "/usr/share/man/man8/qcom-reset-reset.8.gz",
            "/usr/share/man/man5/qcom-reset.toml.5.gz",
            "/usr/share/bash-completion/completions/qcom-reset",
            "/etc/libvirt/hooks/qemu.d/qcom-reset",
            "/usr/share/qcom-reset/proxmox-hookscript.sh",
            "/usr/share/qcom-reset/prometheus/qcom-reset.rules.yml",
            "/usr/share/qcom-reset/grafana/qcom-reset.json",
        ] {
            ensure!(root.exists(p), "{round}: {p} missing after install");
        }
        verify_unit(&root.merged)?;
        rotate(&root)?;
        println!(
            "package: {round} ok (binary runs, unit enabled, conffile, man pages, completions, hooks)"
        );
        root.sh("mkdir -p /var/lib/qcom-reset /var/log/qcom-reset && touch /var/lib/qcom-reset/state.json /var/log/qcom-reset/events.jsonl")?;
        root.sh("dpkg --purge qcom-reset")?;
        for p in [
            UNIT_LINK,
            "/usr/bin/qcom-reset",
            "/etc/qcom-reset/config.toml",
            "/etc/default/qcom-reset",
            "/var/lib/qcom-reset",
            "/var/log/qcom-reset",
        ] {
            ensure!(!root.exists(p), "{round}: {p} left after purge");
        }
        println!("package: purge after {round} ok (nothing left)");
    }
    Ok(())
}

/// The installed logrotate rule, forced once: the journal is rotated and emptied in place.
fn rotate(root: &ThrowawayRoot) -> anyhow::Result<()> {
    root.sh("mkdir -p /var/log/qcom-reset && echo '{\"type\":\"event\"}' > /var/log/qcom-reset/events.jsonl")?;
    root.sh("logrotate --force --state /tmp/logrotate.state /etc/logrotate.d/qcom-reset")?;
    let rotated = root.sh("cat /var/log/qcom-reset/events.jsonl.1")?;
    let current = root.sh("cat /var/log/qcom-reset/events.jsonl")?;
    ensure!(
        rotated.contains("\"event\"") && current.trim().is_empty(),
        "logrotate did not rotate the journal: .1 {rotated:?}, current {current:?}"
    );
    root.sh("rm -f /var/log/qcom-reset/events.jsonl*")?;
    println!("package: logrotate rotates /var/log/qcom-reset/events.jsonl in place");
    Ok(())
}

/// systemd's own check of the installed unit (directives, dependencies, that ExecStart='s
/// binary runs): on a copy that points at the installed root's binary (`--root=` would need a
/// whole systemd tree there). The man page is checked by the install test itself.
fn verify_unit(root: &Path) -> anyhow::Result<()> {
    let installed = root.join("usr/lib/systemd/system/qcom-reset.service");
    let unit = std::fs::read_to_string(&installed)
        .with_context(|| format!("reading {}", installed.display()))?;
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("qcom-reset.service");
    let bin = root.join("usr/bin/qcom-reset");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/qcom-reset", &bin.to_string_lossy()),
    )?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .context("running systemd-analyze")?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    println!("package: systemd-analyze verify of the installed unit: clean");
    security(&copy)
}

/// The unit's exposure as systemd rates it (0 = locked down, 10 = unprotected); issue 20 asks
/// for 3.0 at most with every reset still working (the VM lab runs the agent under the unit's
/// syscall filter and capability bounding set).
const EXPOSURE_LIMIT: f64 = 3.0;

fn security(unit: &Path) -> anyhow::Result<()> {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .context("running systemd-analyze security")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let score = exposure(&text).with_context(|| {
        format!(
            "systemd-analyze security printed no overall exposure: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(
        score <= EXPOSURE_LIMIT,
        "systemd-analyze security rates the unit {score:.1}, above {EXPOSURE_LIMIT:.1}:\n{text}"
    );
    println!(
        "package: systemd-analyze security --offline=true: {score:.1} (limit {EXPOSURE_LIMIT:.1})"
    );
    Ok(())
}

/// The number in "→ Overall exposure level for qcom-reset.service: 3.0 OK 🙂".
fn exposure(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    line.rsplit(':')
        .next()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// lintian over the .deb; every tag it reports must be explained in docs/operations.md.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    if Command::new("lintian").arg("--version").output().is_err() {
        crate::vm::apt_install(&["lintian"])?;
    }
    let out = Command::new("lintian")
        .args([
            "--no-tag-display-limit",
            "--suppress-tags-from-file",
            "/dev/null",
        ])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let explained = std::fs::read_to_string(workspace_root().join("docs/operations.md"))?;
    let unexplained: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .filter(|l| {
            let tag = l.split_whitespace().nth(2).unwrap_or("");
            !explained.contains(&format!("`{tag}`"))
        })
        .collect();
    println!(
        "lintian: {} tag(s), {} unexplained",
        text.lines().count(),
        unexplained.len()
    );
    for l in &unexplained {
        println!("  {l}");
    }
    if !unexplained.is_empty() {
        bail!("lintian reports tags docs/operations.md does not explain");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_overall_exposure_is_read_from_systemd_analyze_output() {
        let text = "✗ PrivateNetwork=   Service has access to the host's network   0.5\n\
                    → Overall exposure level for qcom-reset.service: 3.0 OK 🙂\n";
        assert_eq!(super::exposure(text), Some(3.0));
        let text = "→ Overall exposure level for x.service: 9.6 UNSAFE 😨\n";
        assert_eq!(super::exposure(text), Some(9.6));
        assert_eq!(super::exposure("✗ PrivateNetwork= 0.5\n"), None);
    }
}
