//! The bootstrap. xtask itself builds with whatever stable toolchain rustup has as default (there
//! is deliberately no rust-toolchain.toml: with `RUSTUP_AUTO_INSTALL=0` a pin there stops every
//! `cargo` in the tree before xtask can install it). xtask then installs, idempotently and
//! silently when present, the pinned userspace toolchain, the pinned eBPF nightly with rust-src,
//! and bpf-linker built against that nightly's own LLVM (no distro ships LLVM 23; toolchain.md has
//! the verified recipe), and runs every build with the pinned toolchain named explicitly.
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The userspace toolchain (aya 0.16 needs rustc >= 1.98; `rust-version` in the manifests says so
/// to a plain `cargo build` on an older default).
pub const PINNED: &str = "1.99.1";
/// Keep in step with `EBPF_NIGHTLY` in qcom-reset/build.rs.
pub const EBPF_NIGHTLY: &str = "nightly-2026-10-29";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Static guest binaries for the VM lab.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// `cargo` of the pinned toolchain, with the variables the outer (default-toolchain) cargo set
/// for xtask removed so they cannot leak its rustc into the build.
pub fn pinned_cargo() -> Command {
    toolchain_cargo(PINNED)
}

pub fn toolchain_cargo(toolchain: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", toolchain, "cargo"]);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
    ] {
        c.env_remove(var);
    }
    c
}

fn quiet(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Whether `toolchain` is installed with every one of `components`.
fn toolchain_ready(toolchain: &str, components: &[&str]) -> anyhow::Result<bool> {
    let installed = quiet(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(toolchain)) {
        return Ok(false);
    }
    let comps = quiet(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    Ok(components
        .iter()
        .all(|want| comps.lines().any(|l| l.starts_with(want))))
}

fn install_toolchain(toolchain: &str, components: &str, why: &str) -> anyhow::Result<()> {
    eprintln!("xtask: installing {toolchain} with {components} ({why})");
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        components,
    ]))
    .with_context(|| {
        format!(
            "could not install {toolchain}; check network access to the Rust distribution server"
        )
    })
}

/// The pinned userspace toolchain with clippy and rustfmt.
pub fn ensure_pinned() -> anyhow::Result<()> {
    require_rustup()?;
    if !toolchain_ready(PINNED, &["clippy", "rustfmt"])? {
        install_toolchain(PINNED, "clippy,rustfmt", "userspace toolchain")?;
    }
    Ok(())
}

fn bpf_linker_ready() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn require_rustup() -> anyhow::Result<()> {
    if Command::new("rustup")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!(
            "rustup not found: install it from your distribution (package rustup) so the pinned eBPF nightly can be installed"
        );
    }
    Ok(())
}

/// Makes sure both toolchains and bpf-linker are present; prints only when it installs something.
pub fn ensure_ebpf() -> anyhow::Result<()> {
    ensure_pinned()?;
    if !toolchain_ready(EBPF_NIGHTLY, &["rust-src", "clippy"])? {
        install_toolchain(EBPF_NIGHTLY, "rust-src,clippy", "eBPF toolchain")?;
    }
    if !bpf_linker_ready() {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against {EBPF_NIGHTLY}'s LLVM (about 2 minutes)"
        );
        let sysroot = quiet(
            Command::new("rustc")
                .arg(format!("+{EBPF_NIGHTLY}"))
                .args(["--print", "sysroot"]),
        )?;
        let sysroot = sysroot.trim();
        let lib = std::fs::read_dir(format!("{sysroot}/lib"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
            .context("the nightly ships no libLLVM-*.so")?;
        let lib = lib
            .trim_start_matches("lib")
            .trim_end_matches(".so")
            .to_string();
        let major = lib
            .trim_start_matches("LLVM-")
            .split('-')
            .next()
            .unwrap_or_default()
            .to_string();
        run(toolchain_cargo(EBPF_NIGHTLY)
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major},no-llvm-linking")])
            .env(
                "RUSTFLAGS",
                format!("-L {sysroot}/lib -l dylib={lib} -C link-arg=-Wl,-rpath,{sysroot}/lib"),
            ))
        .context("could not build bpf-linker; see the cargo output above")?;
    }
    Ok(())
}

/// The static-binary target the VM lab's guests need.
pub fn ensure_musl() -> anyhow::Result<()> {
    ensure_pinned()?;
    let installed = quiet(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        PINNED,
    ]))?;
    if !installed.lines().any(|l| l.trim() == MUSL) {
        eprintln!("xtask: adding the {MUSL} target to {PINNED} (static guest binaries)");
        run(Command::new("rustup").args(["target", "add", MUSL, "--toolchain", PINNED]))?;
    }
    Ok(())
}

/// Installs a cargo subcommand at a pinned version with the pinned toolchain, unless
/// `<bin> --version` (run as `<bin> <version_arg...>`) already reports that version.
pub fn ensure_cargo_tool(
    bin: &str,
    version_args: &[&str],
    krate: &str,
    version: &str,
) -> anyhow::Result<()> {
    let have = Command::new(bin)
        .args(version_args)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(version));
    if !have {
        eprintln!("xtask: installing {krate} {version} (a few minutes)");
        run(pinned_cargo().args(["install", "--locked", krate, "--version", version]))?;
    }
    Ok(())
}
