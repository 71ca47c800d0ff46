//! Builds the eBPF object with the pinned nightly (aya-build runs a nested cargo for
//! `bpfel-unknown-none`); `cargo xtask` installs that toolchain and bpf-linker when missing.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Keep in step with `EBPF_NIGHTLY` in xtask/src/toolchain.rs.
const EBPF_NIGHTLY: &str = "nightly-2026-10-29";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "qcom-reset-ebpf")
        .ok_or_else(|| anyhow!("qcom-reset-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .context("ebpf manifest has no parent")?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_NIGHTLY),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the eBPF toolchain",
    )
}
