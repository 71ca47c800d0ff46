//! The Kubernetes side, validated offline: the DaemonSet and node-problem-detector manifests
//! against the API's schemas (`kubernetes-validate`, from PyPI, in a venv under target/), the
//! NPD plugin configuration shipped on its own and inside the ConfigMap the same, its rule
//! running `qcom-reset health`, and the DaemonSet's capabilities exactly the unit's.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, ensure};

use crate::{toolchain, workspace_root};

const VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the manifests are held to.
const KUBERNETES: &str = "1.30";
const DIR: &str = "dist/kubernetes";

pub fn check() -> anyhow::Result<()> {
    let venv = venv()?;
    let dir = workspace_root().join(DIR);
    toolchain::run(
        Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", KUBERNETES])
            .arg(dir.join("daemonset.yaml"))
            .arg(dir.join("node-problem-detector.yaml")),
    )
    .context("kubernetes-validate")?;
    let plugin: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("qcom-reset-monitor.json"),
    )?)
    .context("qcom-reset-monitor.json")?;
    let embedded = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['qcom-reset-monitor.json'])",
        ])
        .arg(dir.join("node-problem-detector.yaml"))
        .output()?;
    let embedded: serde_json::Value = serde_json::from_slice(&embedded.stdout)
        .context("the ConfigMap's qcom-reset-monitor.json")?;
    ensure!(
        plugin == embedded,
        "the NPD plugin file and the ConfigMap's copy differ"
    );
    let rule = &plugin["rules"][0];
    ensure!(
        plugin["plugin"] == "custom"
            && rule["args"] == serde_json::json!(["health"])
            && rule["condition"] == plugin["conditions"][0]["type"],
        "the NPD rule does not run `qcom-reset health` for its condition: {rule}"
    );
    same_capabilities()?;
    println!(
        "fleet: Kubernetes manifests valid for {KUBERNETES} (strict), NPD plugin runs `qcom-reset health`, DaemonSet capabilities = the unit's"
    );
    Ok(())
}

/// The container's added capabilities are the unit's bounding set, no more and no fewer.
fn same_capabilities() -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(workspace_root().join("dist/qcom-reset.service"))?;
    let mut want: Vec<String> = crate::vm::sandbox::directive(&unit, "CapabilityBoundingSet")?
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    let ds = std::fs::read_to_string(workspace_root().join(DIR).join("daemonset.yaml"))?;
    let line = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .context("the DaemonSet adds no capabilities")?;
    let mut have: Vec<String> = line
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_string())
        .collect();
    want.sort();
    have.sort();
    ensure!(
        want == have,
        "DaemonSet capabilities {have:?}, the unit's {want:?}"
    );
    Ok(())
}

/// A venv with kubernetes-validate (its schemas included), made once.
fn venv() -> anyhow::Result<PathBuf> {
    let venv = workspace_root().join("target/fleet/venv");
    let stamp = venv.join(VALIDATE);
    if stamp.exists() {
        return Ok(venv);
    }
    eprintln!(
        "xtask: installing {VALIDATE} into {} (PyPI)",
        venv.display()
    );
    toolchain::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    toolchain::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", VALIDATE]))?;
    std::fs::write(stamp, "")?;
    Ok(venv)
}
