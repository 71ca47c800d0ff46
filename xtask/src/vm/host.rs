//! Host side of the VM lab: packages (QEMU from bookworm-backports, busybox-static, kmod) and
//! Debian kernel packages, fetched through a private apt configuration so the machine's own
//! sources are never changed, and cached between runs.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::toolchain::run;

/// Release lists searched for kernels, in order; the later ones only when asked for.
pub const BASE_SUITES: &[&str] = &["bookworm", "bookworm-updates", "bookworm-backports"];
/// bullseye for its 5.10, which the lab boots to prove `check` refuses kernels before 5.15.
const EXTRA_SUITES: &[&str] = &["trixie", "trixie-backports", "sid", "bullseye"];

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("qcom-reset-vmlab")
}

/// A private apt configuration rooted in the cache.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    pub fn new(name: &str, suites: &[&str]) -> anyhow::Result<Apt> {
        let dir = cache_dir().join("apt").join(name);
        std::fs::create_dir_all(dir.join("lists/partial"))?;
        let mut list = String::new();
        for s in suites {
            list.push_str(&format!("deb http://deb.debian.org/debian {s} main\n"));
        }
        for s in suites
            .iter()
            .filter(|s| ["bookworm", "bullseye"].contains(s))
        {
            list.push_str(&format!(
                "deb http://deb.debian.org/debian-security {s}-security main\n"
            ));
        }
        // New suites need a fresh `apt-get update`, whatever the stamp says.
        if std::fs::read_to_string(dir.join("sources.list"))
            .ok()
            .as_deref()
            != Some(list.as_str())
        {
            let _ = std::fs::remove_file(dir.join("updated"));
        }
        std::fs::write(dir.join("sources.list"), list)?;
        Ok(Apt { dir })
    }

    fn opts(&self) -> Vec<String> {
        vec![
            "-o".into(),
            format!(
                "Dir::Etc::SourceList={}",
                self.dir.join("sources.list").display()
            ),
            "-o".into(),
            "Dir::Etc::SourceParts=/nonexistent".into(),
            "-o".into(),
            format!("Dir::State::Lists={}", self.dir.join("lists").display()),
        ]
    }

    pub fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(self.opts()).env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    /// `apt-get update`, at most once an hour.
    pub fn update(&self) -> anyhow::Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() < 3600));
        if !fresh {
            run(self.cmd("apt-get").args(["update", "-qq"]))
                .context("apt-get update (private lists)")?;
            std::fs::write(stamp, "")?;
        }
        Ok(())
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages through the private apt configuration (bookworm).
pub fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    if !rustix_is_root() {
        bail!("installing {pkgs:?} needs root");
    }
    let apt = Apt::new("bookworm", BASE_SUITES)?;
    apt.update()?;
    run(apt
        .cmd("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(pkgs))
}

/// Installs QEMU, busybox-static, kmod, xz and zstd when missing.
pub fn ensure_packages() -> anyhow::Result<()> {
    let qemu_ok = have("qemu-system-x86_64") && Path::new("/usr/share/qemu/qboot.rom").exists();
    let tools_ok = Path::new("/bin/busybox").exists()
        && have("depmod")
        && have("modprobe")
        && have("xz")
        && have("zstd");
    if qemu_ok && tools_ok {
        return Ok(());
    }
    if !rustix_is_root() {
        bail!(
            "the VM lab needs packages (qemu-system-x86, busybox-static, kmod); run as root once to install them"
        );
    }
    eprintln!(
        "xtask: installing the VM lab's packages (QEMU from bookworm-backports, busybox-static, kmod)"
    );
    let apt = Apt::new("bookworm", BASE_SUITES)?;
    apt.update()?;
    if !qemu_ok {
        // From backports: bookworm's QEMU 7.2 would remove this machine's qemu-utils 10.0.
        run(apt.cmd("apt-get").args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
        ]))?;
    }
    run(apt.cmd("apt-get").args([
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "busybox-static",
        "kmod",
        "xz-utils",
        "zstd",
    ]))
}

fn rustix_is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An unpacked kernel: modules tree, version string and the ELF vmlinux for PVH boot.
pub struct Kernel {
    pub package: String,
    pub version: String,
    pub root: PathBuf,
    pub vmlinux: PathBuf,
    /// `CONFIG_VFIO_PCI_CORE=y`: nothing to load or unload.
    pub vfio_builtin: bool,
    /// The Qualcomm device-specific reset (the lab's 7.4 stand-in): the kernel resets the card
    /// at every VFIO open and release.
    pub device_specific: bool,
}

impl Kernel {
    /// (major, minor) of the release, e.g. (6, 1) for "6.1.0-57-amd64".
    pub fn major_minor(&self) -> (u32, u32) {
        let mut it = self.version.split(|c: char| !c.is_ascii_digit());
        let mut num = || it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (num(), num())
    }
}

/// Resolves "6.1", "6.12", "7.2" (newest matching amd64 image) or a full package name.
fn resolve(apt: &Apt, wanted: &str) -> anyhow::Result<Option<String>> {
    if wanted.starts_with("linux-image-") {
        let out = apt
            .cmd("apt-cache")
            .args(["show", "--no-all-versions", wanted])
            .output()?;
        return Ok(out
            .status
            .success()
            .then(|| wanted.to_string())
            .filter(|_| !out.stdout.is_empty()));
    }
    let out = apt
        .cmd("apt-cache")
        .args([
            "search",
            "--names-only",
            &format!("^linux-image-{}[.-].*-amd64$", regex_escape(wanted)),
        ])
        .output()?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| {
            !n.contains("-dbg")
                && !n.contains("unsigned")
                && !n.contains("-rt-")
                && !n.contains("cloud")
        })
        .collect();
    names.sort_by_key(|n| version_key(n));
    Ok(names.pop())
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

/// Sorts "linux-image-6.1.0-41-amd64" before "linux-image-6.1.0-56-amd64".
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn fetch_kernel(wanted: &str) -> anyhow::Result<Kernel> {
    let (apt, package) = find_package(wanted)?;
    let version = package.trim_start_matches("linux-image-").to_string();
    let kdir = cache_dir().join("kernels").join(&version);
    let vmlinux = kdir.join("vmlinux");
    if !vmlinux.exists() {
        let root = kdir.join("root");
        unpack(&apt, &package, &version, &root)?;
        // /boot up to 6.x; the modules directory from 7.x.
        let vmlinuz = [
            format!("boot/vmlinuz-{version}"),
            format!("lib/modules/{version}/vmlinuz"),
        ]
        .into_iter()
        .map(|p| root.join(p))
        .find(|p| p.exists())
        .context("the kernel package has no vmlinuz")?;
        extract_vmlinux(&vmlinuz, &vmlinux)?;
    }
    Ok(Kernel {
        package,
        root: kdir.join("root"),
        vmlinux,
        version,
        vfio_builtin: false,
        device_specific: false,
    })
}

/// The newest kernel package matching `wanted`: bookworm first, then every suite.
fn find_package(wanted: &str) -> anyhow::Result<(Apt, String)> {
    let base = Apt::new("bookworm", BASE_SUITES)?;
    base.update()?;
    if let Some(p) = resolve(&base, wanted)? {
        return Ok((base, p));
    }
    let all: Vec<&str> = BASE_SUITES.iter().chain(EXTRA_SUITES).copied().collect();
    let wide = Apt::new("wide", &all)?;
    wide.update()?;
    let p = resolve(&wide, wanted)?.with_context(|| {
        format!(
            "no Debian kernel package matches {wanted:?} in bullseye, bookworm, trixie or sid (or a kernel the lab builds: --kernel builtin-vfio, --kernel devspecific)"
        )
    })?;
    Ok((wide, p))
}

/// The kernel's packages unpacked into `root`, its modules indexed.
fn unpack(apt: &Apt, package: &str, version: &str, root: &Path) -> anyhow::Result<()> {
    // From 7.x Debian splits the image into linux-binary-* (vmlinuz) and linux-modules-*.
    let parts: Vec<String> = [
        package.to_string(),
        format!("linux-binary-{version}"),
        format!("linux-modules-{version}"),
    ]
    .into_iter()
    .filter(|p| {
        apt.cmd("apt-cache")
            .args(["show", "--no-all-versions", p])
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
    })
    .collect();
    eprintln!(
        "xtask: fetching {} (about 100 MB, a minute or two; cached after)",
        parts.join(" ")
    );
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    for part in &parts {
        run(apt
            .cmd("apt-get")
            .args(["download", "-qq", part])
            .current_dir(&debs))?;
        let deb = std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{part}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("downloaded {part} .deb not found"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
    }
    // Kernels from trixie on ship modules under /usr/lib (merged /usr); depmod and modprobe
    // -d look under lib/.
    if !root.join("lib/modules").exists() && root.join("usr/lib/modules").exists() {
        std::fs::create_dir_all(root.join("lib"))?;
        std::os::unix::fs::symlink("../usr/lib/modules", root.join("lib/modules"))?;
    }
    // 7.x packages ship only the binary indexes; depmod warns for each missing text one.
    let mods = root.join("lib/modules").join(version);
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if !mods.join(f).exists() {
            std::fs::write(mods.join(f), "")?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(root).arg(version))?;
    Ok(())
}

/// The uncompressed ELF inside a bzImage (xz on 6.1, zstd on 6.12+), for PVH boot: it skips
/// about 7 s of in-guest decompression under TCG.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    for (magic, cmd) in [
        (&b"\xfd7zXZ\x00"[..], &["xz", "-dc", "--single-stream"][..]),
        (&b"\x28\xb5\x2f\xfd"[..], &["zstd", "-dcq"][..]),
    ] {
        let mut from = 0;
        while let Some(pos) = data[from..].windows(magic.len()).position(|w| w == magic) {
            let off = from + pos;
            let tmp = out.with_extension("part");
            std::fs::write(&tmp, &data[off..])?;
            let o = Command::new(cmd[0])
                .args(&cmd[1..])
                .stdin(std::fs::File::open(&tmp)?)
                .output()?;
            let _ = std::fs::remove_file(&tmp);
            if o.stdout.starts_with(b"\x7fELF") {
                std::fs::write(out, &o.stdout)?;
                return Ok(());
            }
            from = off + 1;
        }
    }
    bail!(
        "no xz- or zstd-compressed ELF found in {}",
        bzimage.display()
    )
}

/// QEMU with the vfio-user client (>= 10.1): Debian trixie-backports' build, unpacked with
/// mmdebstrap into a root of its own under the cache (about 250 MiB, under a minute once) and
/// run through that root's dynamic loader, so the machine's own QEMU and apt sources stay as
/// they are. Returns the root.
pub fn vfio_user_qemu() -> anyhow::Result<PathBuf> {
    let root = cache_dir().join("qemu-vfio-user");
    let done = root.join(".qcom-reset-vmlab-complete");
    if done.exists() {
        return Ok(root);
    }
    if !rustix_is_root() {
        bail!("the VM lab's vfio-user QEMU is unpacked with mmdebstrap, which needs root once");
    }
    if !have("mmdebstrap") {
        apt_install(&["mmdebstrap"])?;
    }
    eprintln!(
        "xtask: unpacking QEMU 11 (trixie-backports, with the vfio-user client) into {} (once, about a minute)",
        root.display()
    );
    let _ = std::fs::remove_dir_all(&root);
    // mmdebstrap resolves the target's absolute path: its parent must exist (a fresh cache).
    std::fs::create_dir_all(cache_dir())?;
    run(Command::new("mmdebstrap")
        .args([
            "--variant=apt",
            "--mode=root",
            "--quiet",
            "--aptopt=APT::Default-Release \"trixie-backports\"",
            "--aptopt=APT::Install-Recommends \"false\"",
            "--include=qemu-system-x86,qemu-system-data",
            "trixie",
        ])
        .arg(&root)
        .args([
            "deb http://deb.debian.org/debian trixie main",
            "deb http://deb.debian.org/debian trixie-backports main",
        ]))
    .context("mmdebstrap of the vfio-user QEMU root")?;
    std::fs::write(&done, "")?;
    Ok(root)
}
