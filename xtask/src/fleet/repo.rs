//! `cargo xtask repo`: a signed apt repository (reprepro) holding the static .deb, which any
//! Debian, Ubuntu or Proxmox host adds with a `signed-by` keyring and installs from with plain
//! apt. Signed with the key named by `--key-id` from the caller's GnuPG home, or else with a
//! repository key of its own kept in target/repo/gnupg (for trying it out; a fleet signs with
//! its own).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};

use crate::{package, toolchain, workspace_root};

/// The suite hosts name in their sources.
pub const SUITE: &str = "stable";
/// The keyring file the repository ships, for `Signed-By:`.
pub const KEYRING: &str = "qcom-reset-archive-keyring.gpg";

pub struct Repo {
    pub dir: PathBuf,
    gnupg: PathBuf,
    key: String,
}

impl Repo {
    /// A repository in `dir` (made if missing) signed with `key_id`, or with the repository's
    /// own key (made once).
    pub fn open(dir: &Path, key_id: Option<&str>) -> anyhow::Result<Repo> {
        ensure_tools()?;
        std::fs::create_dir_all(dir.join("conf"))?;
        let (gnupg, key) = match key_id {
            Some(k) => (gnupg_home_of_caller(), k.to_string()),
            None => own_key(&workspace_root().join("target/repo/gnupg"))?,
        };
        let conf = format!(
            "Origin: qcom-reset\nLabel: qcom-reset\nCodename: {SUITE}\nArchitectures: amd64\n\
             Components: main\nDescription: qcom-reset, resets for Qualcomm WLAN/modem cards\n\
             SignWith: {key}\n"
        );
        std::fs::write(dir.join("conf/distributions"), conf)?;
        let repo = Repo {
            dir: dir.to_path_buf(),
            gnupg,
            key,
        };
        repo.export_key()?;
        Ok(repo)
    }

    /// Adds (or replaces) the package in the suite, and signs the suite again.
    pub fn include(&self, deb: &Path) -> anyhow::Result<()> {
        toolchain::run(
            Command::new("reprepro")
                .env("GNUPGHOME", &self.gnupg)
                .arg("-b")
                .arg(&self.dir)
                .args(["--silent", "includedeb", SUITE])
                .arg(deb),
        )
        .context("reprepro includedeb")
    }

    fn export_key(&self) -> anyhow::Result<()> {
        let out = Command::new("gpg")
            .env("GNUPGHOME", &self.gnupg)
            .args(["--batch", "--export", &self.key])
            .output()
            .context("running gpg --export")?;
        ensure!(
            out.status.success() && !out.stdout.is_empty(),
            "gpg has no public key {}: {}",
            self.key,
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(self.dir.join(KEYRING), out.stdout)?;
        Ok(())
    }
}

fn gnupg_home_of_caller() -> PathBuf {
    std::env::var_os("GNUPGHOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".gnupg")))
        .unwrap_or_else(|| PathBuf::from("/root/.gnupg"))
}

/// The repository's own signing key in `home`, made on first use; its fingerprint.
fn own_key(home: &Path) -> anyhow::Result<(PathBuf, String)> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(home)?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
    let gpg = |args: &[&str]| {
        Command::new("gpg")
            .env("GNUPGHOME", home)
            .arg("--batch")
            .args(args)
            .output()
    };
    let fingerprint = || -> anyhow::Result<Option<String>> {
        let out = gpg(&["--with-colons", "--list-secret-keys"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .map(|l| l.trim_matches(':').to_string()))
    };
    if let Some(f) = fingerprint()? {
        return Ok((home.to_path_buf(), f));
    }
    eprintln!(
        "xtask: making the repository's own signing key in {} (a fleet signs with its own: --key-id)",
        home.display()
    );
    let out = gpg(&[
        "--passphrase",
        "",
        "--quick-gen-key",
        "qcom-reset test archive <archive@qcom-reset.invalid>",
        "ed25519",
        "sign",
        "never",
    ])?;
    ensure!(
        out.status.success(),
        "gpg --quick-gen-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = fingerprint()?.context("gpg made no key")?;
    Ok((home.to_path_buf(), f))
}

fn ensure_tools() -> anyhow::Result<()> {
    let have = |c: &str| Command::new(c).arg("--version").output().is_ok();
    if !have("reprepro") || !have("gpg") {
        crate::vm::apt_install(&["reprepro", "gnupg"])?;
    }
    Ok(())
}

/// `cargo xtask repo`: the .deb built and put in `out` (default target/repo/apt).
pub fn run(out: Option<PathBuf>, key_id: Option<String>) -> anyhow::Result<()> {
    let out = out.unwrap_or_else(|| workspace_root().join("target/repo/apt"));
    let repo = Repo::open(&out, key_id.as_deref())?;
    let deb = package::build_versioned(None)?;
    repo.include(&deb)?;
    println!(
        "{}\n  hosts add: deb [signed-by=/usr/share/keyrings/{KEYRING}] <URL of {}> {SUITE} main\n  with {} as /usr/share/keyrings/{KEYRING}",
        out.display(),
        out.display(),
        out.join(KEYRING).display()
    );
    Ok(())
}
