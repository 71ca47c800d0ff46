//! `cargo xtask fleet`: qcom-reset as fleets take it, each with the tool its admins use:
//! - the signed apt repository (`cargo xtask repo`, [`repo`]) installed from with plain apt in a
//!   clean Debian root made by mmdebstrap, upgraded to a newer build, removed and purged;
//! - the Ansible role (dist/ansible) applied to such a root through Ansible's chroot
//!   connection: it applies, applies again with no change, and honours `--check` ([`ansible`]);
//! - the Kubernetes manifests and the node-problem-detector plugin (dist/kubernetes) validated
//!   offline, the DaemonSet's capabilities exactly the unit's ([`kube`]), and its image built
//!   with podman ([`image`]).
mod ansible;
mod image;
mod kube;
pub mod repo;
pub mod root;

use std::path::Path;

use anyhow::{Context as _, ensure};

use crate::package;
use repo::{KEYRING, Repo, SUITE};
use root::DebianRoot;

/// Where the test roots find the repository, and the sources entry that names it.
const REPO_IN_ROOT: &str = "/srv/qcom-reset-apt";

pub fn run() -> anyhow::Result<()> {
    kube::check()?;
    image::build()?;
    let work = tempfile::tempdir_in(crate::workspace_root().join("target"))?;
    let repo = Repo::open(&work.path().join("apt"), None)?;
    let first = keep(&package::build_versioned(Some("0.1.0-1"))?, work.path())?;
    repo.include(&first)?;
    let newer = keep(&package::build_versioned(Some("0.1.0-2"))?, work.path())?;
    install_upgrade_remove(&repo, &newer)?;
    ansible::check(&repo)
}

/// A copy of a freshly built .deb outside target/debian, which the next build empties.
fn keep(deb: &Path, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let to = dir.join(deb.file_name().context("a .deb has a name")?);
    std::fs::copy(deb, &to)?;
    Ok(to)
}

/// The repository in the root at [`REPO_IN_ROOT`], its keyring in /usr/share/keyrings and a
/// deb822 sources entry naming both: what an admin's host gets.
fn add_repository(root: &DebianRoot, repo: &Repo) -> anyhow::Result<()> {
    root.copy_in(&repo.dir, REPO_IN_ROOT)?;
    std::fs::copy(
        repo.dir.join(KEYRING),
        root.path(&format!("/usr/share/keyrings/{KEYRING}")),
    )?;
    std::fs::write(
        root.path("/etc/apt/sources.list.d/qcom-reset.sources"),
        format!(
            "Types: deb\nURIs: file:{REPO_IN_ROOT}\nSuites: {SUITE}\nComponents: main\n\
             Signed-By: /usr/share/keyrings/{KEYRING}\n"
        ),
    )?;
    Ok(())
}

/// apt-get update of the repository alone (the root's Debian sources are not needed).
const UPDATE: &str = "apt-get update -qq -o Dir::Etc::SourceList=/dev/null";

fn install_upgrade_remove(repo: &Repo, newer: &Path) -> anyhow::Result<()> {
    let root = DebianRoot::new()?;
    add_repository(&root, repo)?;
    // Signed-By is what apt trusts: without the keyring the repository is refused.
    std::fs::rename(
        root.path(&format!("/usr/share/keyrings/{KEYRING}")),
        root.path("/tmp/keyring"),
    )?;
    let (ok, said) = root.sh_status(UPDATE)?;
    ensure!(
        !ok || said.contains("NO_PUBKEY") || said.contains("not signed"),
        "apt accepted the repository without its keyring: {said}"
    );
    std::fs::rename(
        root.path("/tmp/keyring"),
        root.path(&format!("/usr/share/keyrings/{KEYRING}")),
    )?;
    root.sh(UPDATE)?;
    root.sh("apt-get install -y -qq qcom-reset")?;
    ensure_version(&root, "0.1.0-1")?;
    root.sh("qcom-reset --version && qcom-reset run --check-config")?;
    root.sh("echo '# kept by the upgrade' >> /etc/qcom-reset/config.toml")?;
    println!("fleet: installed 0.1.0-1 from the signed repository (refused without its keyring)");
    repo.include(newer)?;
    add_repository(&root, repo)?;
    root.sh(UPDATE)?;
    root.sh("apt-get install -y -qq --only-upgrade qcom-reset")?;
    ensure_version(&root, "0.1.0-2")?;
    let conf = root.sh("cat /etc/qcom-reset/config.toml")?;
    ensure!(
        conf.contains("# kept by the upgrade"),
        "the upgrade replaced the admin's config"
    );
    println!("fleet: upgraded to 0.1.0-2, the edited conffile kept");
    root.sh("apt-get remove -y -qq qcom-reset")?;
    ensure!(
        !root.path("/usr/bin/qcom-reset").exists(),
        "remove left the binary"
    );
    ensure!(
        root.path("/etc/qcom-reset/config.toml").exists(),
        "remove took the conffile"
    );
    root.sh("apt-get purge -y -qq qcom-reset")?;
    ensure!(
        !root.path("/etc/qcom-reset/config.toml").exists(),
        "purge left the conffile"
    );
    println!("fleet: removed (conffile kept) and purged (nothing left)");
    Ok(())
}

fn ensure_version(root: &DebianRoot, want: &str) -> anyhow::Result<()> {
    let v = root.sh("dpkg-query -W -f='${Version}' qcom-reset")?;
    ensure!(v.trim() == want, "installed version {v:?}, not {want}");
    Ok(())
}
