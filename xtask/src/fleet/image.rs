//! The agent's container image (dist/kubernetes/Containerfile: the static binary alone, FROM
//! scratch), built with podman (Debian's, installed when missing) and inspected: its entrypoint
//! and command are the DaemonSet's. Not run here: crun cannot set RLIMIT_NOFILE in this
//! machine's sandbox ("setrlimit `RLIMIT_NOFILE`: Operation not permitted").
use std::process::Command;

use anyhow::{Context as _, ensure};

use crate::{build_static, toolchain, workspace_root};

pub const TAG: &str = "localhost/qcom-reset:0.1.0";

pub fn build() -> anyhow::Result<()> {
    if Command::new("podman").arg("--version").output().is_err() {
        crate::vm::apt_install(&["podman"])?;
    }
    let bin = build_static()?;
    let ctx = tempfile::tempdir()?;
    std::fs::copy(&bin, ctx.path().join("qcom-reset"))?;
    let file = workspace_root().join("dist/kubernetes/Containerfile");
    toolchain::run(
        Command::new("podman")
            .args(["build", "--quiet", "-f"])
            .arg(&file)
            .args(["-t", TAG])
            .arg(ctx.path()),
    )
    .context("podman build")?;
    let out = Command::new("podman")
        .args([
            "image",
            "inspect",
            "--format",
            "{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{.Size}}",
            TAG,
        ])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        said.starts_with(r#"["/usr/bin/qcom-reset"] ["run"]"#),
        "the image's entrypoint and command: {said}"
    );
    let ds = std::fs::read_to_string(workspace_root().join("dist/kubernetes/daemonset.yaml"))?;
    ensure!(
        ds.contains(&format!("image: {TAG}")),
        "the DaemonSet does not run {TAG}"
    );
    println!(
        "fleet: image {TAG} built with podman ({} bytes), entrypoint qcom-reset run",
        said.split_whitespace().last().unwrap_or("?")
    );
    Ok(())
}
