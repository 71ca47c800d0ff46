//! Command-line interface.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use qcom_reset::access::Access;
use qcom_reset::bdf::Bdf;
use qcom_reset::probes::FlavourChoice;

#[derive(Parser, Debug)]
#[command(
    name = "qcom-reset",
    version,
    about = "Detects failed PCI resets of Qualcomm WCN6855/WCN7850 WLAN and SDX62/SDX65 modems released by VFIO, and resets them through their BAR registers",
    after_long_help = format!("{}\n{}", qcom_reset::device::help_table(), qcom_reset::exit::Exit::table())
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub host: HostArgs,
}

/// Where host state lives; the hidden roots let tests and containers point elsewhere.
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    /// Directory for per-device locks (shared by every qcom-reset process).
    #[arg(long, global = true, default_value = qcom_reset::host::lock::DEFAULT_RUN_DIR, env = "QCOM_RESET_RUN_DIR")]
    pub run_dir: PathBuf,
    #[arg(long, global = true, default_value = qcom_reset::host::sysfs::DEFAULT_ROOT, hide = true)]
    pub sysfs_root: PathBuf,
    #[arg(long, global = true, default_value = "/proc", hide = true)]
    pub proc_root: PathBuf,
    #[arg(long, global = true, default_value = "/dev/vfio", hide = true)]
    pub dev_vfio: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Live reset events: every reset attempt, VFIO opens and releases of target devices.
    Trace(TraceArgs),
    /// Preflight checks: can this host trace and reset? One line per check, exit 0 when tracing can work.
    Check {
        /// One JSON array of the checks on stdout (errors too become JSON).
        #[arg(long)]
        json: bool,
    },
    /// Reset one device now through its BAR registers (or the kernel's device_specific reset).
    Reset(ResetArgs),
    /// Show target devices: driver, holder, power, reset methods, health verdict with raw registers.
    /// Takes the device's lock and owns it while reading: for monitoring use `health`.
    Status(StatusArgs),
    /// Read-only health for monitoring, hooks and fleet tooling: the agent's last verdict per
    /// card and whether it runs with its probes attached. Takes no lock, opens no device, writes
    /// nothing, never wakes a suspended card.
    #[command(after_long_help = qcom_reset::health::EXIT_HELP)]
    Health(HealthArgs),
    /// The auto-remediation agent: trace releases and failed resets, reset targets left stuck.
    Run(RunArgs),
    /// For a card off the link ("rev ff"): cut and restore its slot's power from user space
    /// (hotplug slot power, or D3cold of its port), then reset and verify it as `reset` does.
    /// Only for a target alone below its port.
    PowerCycle(PowerCycleArgs),
    /// Write the man pages (one per subcommand) and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

impl Command {
    /// Whether the output is JSON, errors included.
    pub fn json(&self) -> bool {
        match self {
            Command::Check { json } => *json,
            Command::Trace(a) => a.json,
            Command::Reset(a) => a.json,
            Command::Status(a) => a.json,
            Command::Health(a) => a.json,
            Command::PowerCycle(a) => a.json,
            Command::Run(_) | Command::GenerateAssets { .. } => false,
        }
    }
}

#[derive(Args, Debug)]
pub struct PowerCycleArgs {
    /// PCI address, e.g. 0000:03:00.0
    pub bdf: Bdf,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// How to cut the power; `d3cold` also without firmware power resources (then only a
    /// remove/rescan).
    #[arg(long, value_enum, default_value_t = qcom_reset::session::power::Choice::Auto)]
    pub method: qcom_reset::session::power::Choice,
    /// Print the plan and touch nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop after the power cycle (no reset and verify).
    #[arg(long)]
    pub no_reset: bool,
    /// Allow an experimental profile for the reset after the cycle; the config's
    /// `experimental` list allows it too.
    #[arg(long)]
    pub experimental: bool,
    /// The plan or the reset's report as JSON on stdout (errors too become JSON).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// Cards to report (default: every target present).
    pub bdf: Vec<Bdf>,
    /// One JSON object on stdout: the agent and each card (errors too become JSON).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Configuration file (default /etc/qcom-reset/config.toml; missing = all defaults), with
    /// the drop-ins `conf.d/*.toml` beside it applied in name order.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Check the configuration and its drop-ins, and exit (0 when valid, 78 when not).
    #[arg(long)]
    pub check_config: bool,
    /// Log what would be done, never write to a device.
    #[arg(long)]
    pub observe_only: bool,
    /// Serve Prometheus metrics on 127.0.0.1:PORT.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// JSON-lines log of events and actions.
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
    /// Attempt history file.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// Global kill switch: no action while this file exists.
    #[arg(long, value_name = "PATH")]
    pub kill_switch: Option<PathBuf>,
    /// Probe flavour: kprobes where the kernel has them, else fentry/fexit (auto), or force one.
    #[arg(long, value_enum)]
    pub flavour: Option<FlavourChoice>,
    /// How to reach config space and the BAR: sysfs, VFIO under lockdown (auto), or force one.
    #[arg(long, value_enum)]
    pub access: Option<Access>,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Trace every PCI device, not only the supported Qualcomm ones.
    #[arg(long)]
    pub all: bool,
    /// One JSON object per line (schema: docs/events.md).
    #[arg(long)]
    pub json: bool,
    /// Probe flavour: kprobes where the kernel has them, else fentry/fexit (auto), or force one.
    #[arg(long, value_enum, default_value_t = FlavourChoice::Auto)]
    pub flavour: FlavourChoice,
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Treat the device as this profile even if its IDs are not in the table.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// BAR holding the registers (default: the profile's, BAR0).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..6))]
    pub bar: Option<u8>,
    /// How to reach config space and the BAR.
    #[arg(long, value_enum, default_value_t = Access::Auto)]
    pub access: Access,
    /// Configuration whose `[[device]]` rules, per-address profiles and `experimental` list
    /// apply (default /etc/qcom-reset/config.toml when present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ResetArgs {
    /// PCI address, e.g. 0000:03:00.0
    pub bdf: Bdf,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print every step the reset would take, register operations (offset, value, delay)
    /// included, and touch nothing; refused where what it reads shows the reset would be
    /// (DPC, pciehp polling, a corrupt crash record).
    #[arg(long)]
    pub dry_run: bool,
    /// For hook scripts: a device that is not a target is a no-op (exit 0), not an error.
    #[arg(long)]
    pub only_targets: bool,
    /// Reset even when bound to a driver other than vfio-pci. Never overrides a holder.
    #[arg(long)]
    pub force: bool,
    /// Use the register sequence even where the kernel has its own device_specific reset.
    #[arg(long)]
    pub ignore_kernel_reset: bool,
    /// Allow an experimental profile (a sibling of the reviewed parts, see `qcom-reset --help`)
    /// for this reset; the config's `experimental` list allows it too.
    #[arg(long)]
    pub experimental: bool,
    /// Reset even when DPC on the upstream port would contain the link drop.
    #[arg(long)]
    pub allow_dpc: bool,
    /// Reset even when the upstream port's hotplug/Surprise Down reports cannot be masked
    /// (e.g. lockdown refuses config writes).
    #[arg(long)]
    pub allow_unguarded_link_drop: bool,
    /// The reset's report as JSON on stdout (errors too become JSON).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One device (default: every target device present).
    pub bdf: Option<Bdf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// One JSON array of the devices on stdout (errors too become JSON).
    #[arg(long)]
    pub json: bool,
    /// Read the registers even when that means opening the device through VFIO (`--access vfio`,
    /// or `auto` under lockdown): the kernel resets the device at every VFIO open and close.
    #[arg(long)]
    pub registers: bool,
}
