//! Installs what building the eBPF programs needs, idempotently and silently when present:
//! the pinned nightly with rust-src, and bpf-linker built against that nightly's own LLVM (no
//! distro ships LLVM 23; toolchain.md has the verified recipe).
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Keep in step with `EBPF_NIGHTLY` in qcom-reset/build.rs.
pub const EBPF_NIGHTLY: &str = "nightly-2026-10-29";
pub const BPF_LINKER_VERSION: &str = "0.13.0";

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

fn nightly_ready() -> anyhow::Result<bool> {
    let installed = quiet(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(EBPF_NIGHTLY)) {
        return Ok(false);
    }
    let comps = quiet(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_NIGHTLY,
    ]))?;
    Ok(comps.lines().any(|l| l.starts_with("rust-src")))
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

/// Makes sure the eBPF toolchain is present; prints only when it installs something.
pub fn ensure_ebpf() -> anyhow::Result<()> {
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
    if !nightly_ready()? {
        eprintln!("xtask: installing {EBPF_NIGHTLY} with rust-src (eBPF toolchain)");
        run(Command::new("rustup").args(["toolchain", "install", EBPF_NIGHTLY, "--profile", "minimal", "--component", "rust-src,clippy"]))
            .context("could not install the eBPF nightly; check network access to the Rust distribution server")?;
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
        run(Command::new("cargo")
            .arg(format!("+{EBPF_NIGHTLY}"))
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
    let installed = quiet(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed
        .lines()
        .any(|l| l.trim() == "x86_64-unknown-linux-musl")
    {
        eprintln!("xtask: adding the x86_64-unknown-linux-musl target (static guest binaries)");
        run(Command::new("rustup").args(["target", "add", "x86_64-unknown-linux-musl"]))?;
    }
    Ok(())
}
