//! The Ansible role (dist/ansible/roles/qcom_reset) against a clean Debian root, through
//! Ansible's chroot connection (Debian's `ansible` package): `--check` on the fresh root
//! changes nothing, the role applies (repository, package, drop-in, hook settings), applies
//! again with nothing changed, and `--check` then reports nothing to change.
use std::process::Command;

use anyhow::{Context as _, ensure};

use super::REPO_IN_ROOT;
use super::repo::{KEYRING, Repo};
use super::root::DebianRoot;
use crate::workspace_root;

pub fn check(repo: &Repo) -> anyhow::Result<()> {
    if Command::new("ansible-playbook")
        .arg("--version")
        .output()
        .is_err()
    {
        crate::vm::apt_install(&["ansible"])?;
    }
    let root = DebianRoot::new()?;
    // The repository's server, as the role's hosts reach it.
    root.copy_in(&repo.dir, REPO_IN_ROOT)?;
    let play = |check: bool| play(&root, repo, check);
    let dry = play(true)?;
    ensure!(
        !root.path("/usr/bin/qcom-reset").exists(),
        "--check installed the package ({dry:?})"
    );
    let first = play(false)?;
    ensure!(
        first.changed > 0,
        "the first run changed nothing: {first:?}"
    );
    applied(&root)?;
    let again = play(false)?;
    ensure!(
        again.changed == 0,
        "the second run changed something: {again:?}"
    );
    let check = play(true)?;
    ensure!(
        check.changed == 0,
        "--check after the run would change something: {check:?}"
    );
    println!(
        "fleet: Ansible role: --check on a fresh host changed nothing, applied ({} changed), re-applied and --check with 0 changed",
        first.changed
    );
    Ok(())
}

/// One run of the role's test play over the root's chroot, `--check` or for real.
fn play(root: &DebianRoot, repo: &Repo, check: bool) -> anyhow::Result<Recap> {
    let mut cmd = Command::new("ansible-playbook");
    cmd.arg("-i")
        .arg(format!("{},", root.root.display()))
        .args(["-c", "community.general.chroot"])
        .arg(workspace_root().join("dist/ansible/tests/chroot.yml"))
        .env(
            "ANSIBLE_ROLES_PATH",
            workspace_root().join("dist/ansible/roles"),
        )
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_HOST_KEY_CHECKING", "0")
        .env("QCOM_RESET_TEST_KEYRING", repo.dir.join(KEYRING));
    if check {
        cmd.arg("--check");
    }
    let out = cmd.output().context("running ansible-playbook")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "ansible-playbook{} failed:\n{text}{}",
        if check { " --check" } else { "" },
        String::from_utf8_lossy(&out.stderr)
    );
    Recap::of(&text)
}

/// What the role applied: its drop-in, which the agent accepts, and the hook settings.
fn applied(root: &DebianRoot) -> anyhow::Result<()> {
    let dropin = std::fs::read_to_string(root.path("/etc/qcom-reset/conf.d/50-ansible.toml"))?;
    for want in [
        "debounce_ms = 300",
        "[devices.\"0000:03:00.0\"]",
        "enabled = false",
        "experimental = [\"sdx55\"]",
    ] {
        ensure!(
            dropin.contains(want),
            "the drop-in lacks {want:?}:\n{dropin}"
        );
    }
    root.sh("qcom-reset run --check-config")?;
    let defaults = std::fs::read_to_string(root.path("/etc/default/qcom-reset"))?;
    ensure!(
        defaults.contains("\nQCOM_RESET_PRESTART=never"),
        "{defaults}"
    );
    Ok(())
}

/// The PLAY RECAP line of the one host.
#[derive(Debug)]
struct Recap {
    changed: u32,
}

impl Recap {
    fn of(text: &str) -> anyhow::Result<Recap> {
        let line = text
            .lines()
            .skip_while(|l| !l.starts_with("PLAY RECAP"))
            .nth(1)
            .context("no PLAY RECAP")?;
        let field = |name: &str| -> anyhow::Result<u32> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .with_context(|| format!("no {name}= in {line:?}"))?
                .parse()
                .context("a count")
        };
        ensure!(
            field("failed")? == 0 && field("unreachable")? == 0,
            "{line}"
        );
        Ok(Recap {
            changed: field("changed")?,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_recap_is_read_and_failures_refused() {
        let ok = "PLAY RECAP *****\n/var/tmp/x/root : ok=9 changed=4 unreachable=0 failed=0 skipped=6 rescued=0 ignored=0\n";
        assert_eq!(super::Recap::of(ok).unwrap().changed, 4);
        assert!(super::Recap::of(&ok.replace("failed=0", "failed=1")).is_err());
        assert!(super::Recap::of("no recap").is_err());
    }
}
