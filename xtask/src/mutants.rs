//! `cargo xtask mutants`: cargo-mutants over the code that decides whether and how a device is
//! written. A mutant that no test kills is a wrong sequence or decision the tests would let
//! through; it fails the run unless docs/testing.md lists it, word for word, as equivalent.
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::{cargo, toolchain, workspace_root};

pub const MUTANTS_VERSION: &str = "27.1.0";

/// The reset core and the decision code.
const CORE: [&str; 21] = [
    "qcom-reset/src/device/family.rs",
    "qcom-reset/src/device/sequence.rs",
    "qcom-reset/src/device/verdict.rs",
    "qcom-reset/src/session/mod.rs",
    "qcom-reset/src/session/check.rs",
    "qcom-reset/src/session/target.rs",
    "qcom-reset/src/session/reset.rs",
    "qcom-reset/src/session/kernel.rs",
    "qcom-reset/src/session/plan.rs",
    "qcom-reset/src/session/step.rs",
    "qcom-reset/src/session/status.rs",
    "qcom-reset/src/session/guard.rs",
    "qcom-reset/src/session/owner.rs",
    "qcom-reset/src/session/restore.rs",
    "qcom-reset/src/host/own.rs",
    "qcom-reset/src/session/port.rs",
    "qcom-reset/src/session/record.rs",
    "qcom-reset/src/host/holders.rs",
    "qcom-reset/src/host/lock.rs",
    "qcom-reset/src/agent/policy.rs",
    "qcom-reset/src/probes/events.rs",
];

/// A test suite a mutant is run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Lib,
    Engine,
    Agent,
    Safety,
    /// The binary as users meet it: exit statuses, JSON errors, `health`.
    Cli,
}

impl Suite {
    const ALL: [Suite; 5] = [
        Suite::Lib,
        Suite::Engine,
        Suite::Agent,
        Suite::Safety,
        Suite::Cli,
    ];

    fn args(self) -> &'static [&'static str] {
        match self {
            Suite::Lib => &["--lib"],
            Suite::Engine => &["--test", "engine"],
            Suite::Agent => &["--test", "agent"],
            Suite::Safety => &["--test", "safety"],
            Suite::Cli => &["--test", "cli"],
        }
    }
}

pub fn run(files: &[String], suites: &[Suite]) -> anyhow::Result<()> {
    toolchain::ensure_ebpf()?;
    toolchain::ensure_cargo_tool(
        "cargo-mutants",
        &["mutants", "--version"],
        "cargo-mutants",
        MUTANTS_VERSION,
    )?;
    let files: Vec<String> = if files.is_empty() {
        CORE.map(String::from).to_vec()
    } else {
        files.to_vec()
    };
    let out = workspace_root().join("target/mutants");
    std::fs::create_dir_all(&out)?;
    let mut cmd = cargo();
    // The `mutants` profile (no debug info) links each mutant's test binaries about three
    // times faster than `test`: about 11 s a mutant here instead of 30-45.
    cmd.args(["mutants", "--package", "qcom-reset", "--timeout", "120"])
        .args(["--profile", "mutants"])
        .arg("--output")
        .arg(&out);
    for f in &files {
        cmd.args(["--file", f]);
    }
    // The suites that exercise these files; the VM lab and the root-only verifier do not run here.
    let suites = if suites.is_empty() {
        &Suite::ALL[..]
    } else {
        suites
    };
    cmd.arg("--");
    for s in suites {
        cmd.args(s.args());
    }
    // cargo-mutants exits non-zero when mutants survive; the verdict is ours, from its lists.
    let status = cmd.status().context("running cargo mutants")?;
    let missed = read_list(&out.join("mutants.out/missed.txt"));
    let timeouts = read_list(&out.join("mutants.out/timeout.txt"));
    let caught = read_list(&out.join("mutants.out/caught.txt")).len();
    let explained = std::fs::read_to_string(workspace_root().join("docs/testing.md"))?;
    let unexplained: Vec<&String> = missed
        .iter()
        .filter(|m| !explained.contains(m.as_str()))
        .collect();
    println!(
        "mutants: {caught} caught, {} missed ({} explained as equivalent in docs/testing.md), {} timed out (counted as caught)",
        missed.len(),
        missed.len() - unexplained.len(),
        timeouts.len()
    );
    for m in &unexplained {
        println!("MISSED {m}");
    }
    if !unexplained.is_empty() {
        bail!(
            "{} mutant(s) survive: add a test that kills each, or explain it in docs/testing.md",
            unexplained.len()
        );
    }
    if caught == 0 && !status.success() {
        bail!("cargo mutants failed before testing any mutant ({status})");
    }
    Ok(())
}

fn read_list(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}
