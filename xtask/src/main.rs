//! `cargo xtask`: the project's own commands. Every one installs what it needs first.
mod fleet;
mod licenses;
mod monitoring;
mod mutants;
mod package;
mod toolchain;
mod vm;

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "qcom-reset's build, test and run commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain (pinned nightly + rust-src, bpf-linker) if missing.
    Setup,
    /// Build qcom-reset (release) with the pinned toolchains: target/release/qcom-reset.
    Build,
    /// Build (release) and run qcom-reset as root; arguments after `--` go to it (default: `run`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The test suite: unit and integration tests, verifier loads when root.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Clippy for the userspace crates and, separately, for the eBPF crate.
    Clippy,
    /// The alert rules (promtool check and unit tests), the Grafana dashboard and the agent's
    /// textfile (through a real node_exporter) against the metric contract; part of `test`.
    Monitoring,
    /// Check every dependency's licence (SPDX, from cargo metadata) against the allowed list.
    Licenses,
    /// Build the Debian package (target/debian/*.deb); `--test` installs, purges and reinstalls
    /// it in a throwaway root and runs lintian.
    Package {
        #[arg(long)]
        test: bool,
    },
    /// A signed apt repository (reprepro) with the static .deb, for fleets to install from.
    Repo {
        /// Where to write it (default target/repo/apt).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The GnuPG key to sign with (from $GNUPGHOME); default: the repository's own test
        /// key in target/repo/gnupg.
        #[arg(long)]
        key_id: Option<String>,
    },
    /// The fleet checks: install, upgrade and remove from the signed repository in a clean
    /// Debian root (mmdebstrap), the Ansible role applied and re-applied there, the Kubernetes
    /// manifests and node-problem-detector plugin validated offline.
    Fleet,
    /// Mutation testing (cargo-mutants) of the reset core and the decision code: fails on any
    /// surviving mutant that docs/testing.md does not explain as equivalent.
    Mutants {
        /// Only mutants in these files (repeatable; default: the reset core and decision code).
        #[arg(long = "file", value_name = "PATH")]
        files: Vec<String>,
        /// Only these test suites against each mutant (repeatable; default all four). CI's run
        /// over `sequence` and `verdict` uses `lib` and `engine`, the suites that exercise them.
        #[arg(long = "suite", value_enum)]
        suites: Vec<mutants::Suite>,
    },
    /// Prove probes, VFIO and the detect->reset->verify loop on Debian kernels under QEMU.
    VmTest {
        /// Kernel: "6.1", "6.12", "7.2" (newest matching Debian package), a package name, or one
        /// the lab builds: "builtin-vfio" (6.12, VFIO built in) or "devspecific" (7.3 with the
        /// Qualcomm device_specific reset expected in 7.4).
        /// Repeatable; default 6.1 and 6.12.
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
        /// Scenario to run (repeatable; default all).
        #[arg(long = "scenario", value_enum)]
        scenarios: Vec<vm::scenarios::Scenario>,
        /// Where the simulated card sits: on the root bus (no kernel reset), behind a PCIe root
        /// port (the kernel's bus reset, unless its SBR-avoid quirk covers the card's IDs: 7.2+
        /// and the stable backports, seen only with the vfio-user card's real IDs), or both.
        #[arg(long, value_enum, default_value_t = TopologyChoice::Both)]
        topology: TopologyChoice,
        /// What the simulated card is to the guest: a vfio-user PCI function with the card's
        /// IDs, config space and BAR0 (QEMU 11 from Debian's trixie-backports, unpacked under the
        /// lab's cache; the default), or the older ivshmem stand-in with profile/BAR overrides
        /// (only where trixie-backports' QEMU cannot be fetched).
        #[arg(long, value_enum, default_value_t = vm::CardKind::VfioUser)]
        card: vm::CardKind,
        /// Echo the guest console.
        #[arg(long)]
        verbose: bool,
    },
    /// Benchmarks in the VM lab against bpftrace in the same guest: attach time, detection
    /// latency percentiles, reset overhead by phase, memory and idle cost, eight cards at once,
    /// a non-target flood.
    BenchLab {
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// Releases of the WLAN card (each reset and verified) for the latency percentiles.
        #[arg(long, default_value_t = 100)]
        releases: usize,
        /// Seconds the agent sits idle while its CPU time and wakeups are counted.
        #[arg(long = "idle", default_value_t = 60)]
        idle_s: u64,
        /// Print the table from a saved guest console (…/runs/<kernel>/bench.log) instead.
        #[arg(long, value_name = "LOG")]
        from_log: Option<PathBuf>,
        /// Measure this static qcom-reset binary instead of the tree's (a "before": an older
        /// commit built with `cargo build --release --target x86_64-unknown-linux-musl`).
        #[arg(long, value_name = "BINARY")]
        agent: Option<PathBuf>,
    },
    /// The WLAN loop scenario, narrated: how the product works without the hardware.
    Demo {
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// The simulated card: the vfio-user PCI function with the real IDs (default), or the
        /// ivshmem stand-in.
        #[arg(long, value_enum, default_value_t = vm::CardKind::VfioUser)]
        card: vm::CardKind,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TopologyChoice {
    RootBus,
    RootPort,
    Both,
}

impl TopologyChoice {
    fn topologies(self) -> &'static [vm::scenarios::Topology] {
        use vm::scenarios::Topology;
        match self {
            TopologyChoice::RootBus => &[Topology::RootBus],
            TopologyChoice::RootPort => &[Topology::RootPort],
            TopologyChoice::Both => &Topology::ALL,
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo` of the pinned toolchain, in the workspace (never the default toolchain's cargo that
/// started xtask: it may be older than the product's `rust-version`).
fn cargo() -> Command {
    let mut c = toolchain::pinned_cargo();
    c.current_dir(workspace_root());
    c
}

/// The release binary, built with the pinned toolchains (installed first when missing).
pub(crate) fn build_release() -> anyhow::Result<PathBuf> {
    toolchain::ensure_ebpf()?;
    toolchain::run(cargo().args(["build", "--release", "--package", "qcom-reset", "--bins"]))?;
    Ok(workspace_root().join("target/release/qcom-reset"))
}

/// The static (musl) release binary: what the .deb ships, so it runs on any Debian, Ubuntu or
/// Proxmox release whatever the build host's glibc.
pub(crate) fn build_static() -> anyhow::Result<PathBuf> {
    toolchain::ensure_ebpf()?;
    toolchain::ensure_musl()?;
    let target = toolchain::MUSL;
    toolchain::run(
        cargo()
            .args(["build", "--release", "--target", target, "-p", "qcom-reset"])
            .args(["--bin", "qcom-reset"]),
    )?;
    Ok(workspace_root()
        .join("target")
        .join(target)
        .join("release/qcom-reset"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => toolchain::ensure_ebpf(),
        Cmd::Build => {
            let bin = build_release()?;
            println!("{}", bin.display());
            Ok(())
        }
        Cmd::Run { args } => run(args),
        Cmd::Test { args } => test(&args),
        Cmd::Monitoring => monitoring::run(),
        Cmd::Repo { out, key_id } => fleet::repo::run(out, key_id),
        Cmd::Fleet => fleet::run(),
        Cmd::VmTest {
            kernels,
            scenarios,
            topology,
            card,
            verbose,
        } => vm::vm_test(&kernels, &scenarios, topology.topologies(), card, verbose),
        Cmd::Demo { kernel, card } => vm::demo(&kernel, card),
        Cmd::BenchLab {
            kernel,
            releases,
            idle_s,
            from_log,
            agent,
        } => vm::bench::bench_lab(&vm::bench::Options {
            kernel,
            releases,
            idle_s,
            from_log,
            agent,
        }),
        Cmd::Mutants { files, suites } => mutants::run(&files, &suites),
        Cmd::Package { test } => package::run(test),
        Cmd::Licenses => licenses::check(),
        Cmd::Clippy => clippy(),
    }
}

/// `cargo xtask run`: the release build, run as root (through sudo when not), `run` by default.
fn run(args: Vec<String>) -> anyhow::Result<()> {
    let bin = build_release()?;
    let args = if args.is_empty() {
        vec!["run".to_string()]
    } else {
        args
    };
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: qcom-reset needs root; re-running under sudo");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    let status = cmd
        .args(&args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// `cargo xtask test`: every crate's tests with the simulator's vfio-user server, then the
/// monitoring checks.
fn test(args: &[String]) -> anyhow::Result<()> {
    toolchain::ensure_ebpf()?;
    // The simulator's vfio-user server (the VM lab's card) is tested with the rest.
    toolchain::run(
        cargo()
            .args(["test", "--features", "qcom-reset/vfio-user"])
            .args(args),
    )?;
    monitoring::run()
}

/// `cargo xtask clippy`: the userspace crates, then the eBPF crate on its own.
fn clippy() -> anyhow::Result<()> {
    toolchain::ensure_ebpf()?;
    toolchain::run(cargo().args([
        "clippy",
        "--all-targets",
        "--features",
        "qcom-reset/vfio-user",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Separately, so the `user` feature (aya, std) never unifies into the eBPF build.
    toolchain::run(
        toolchain::toolchain_cargo(toolchain::EBPF_NIGHTLY)
            .current_dir(workspace_root())
            .args([
                "clippy",
                "--package",
                "qcom-reset-ebpf",
                "--bins",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"",
            ),
    )
}
