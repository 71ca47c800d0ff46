//! The binary: what each subcommand does with its arguments and how it prints; the preflight
//! checks; the man pages and completions.
pub mod check;
pub mod cli;
mod man;
mod power_cycle;
mod reset;
mod run;
mod status;
mod trace;
use std::time::Duration;

use qcom_reset::Error;
use qcom_reset::bdf::Bdf;
use qcom_reset::config::{Config, DeviceConfig};
use qcom_reset::device::OptIn;
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::host::sysfs::PciSysfs;

use cli::{Cli, Command, DeviceArgs, HostArgs};

pub fn host(a: &HostArgs) -> Host {
    Host {
        sysfs: PciSysfs {
            root: a.sysfs_root.clone(),
        },
        dev_vfio: a.dev_vfio.clone(),
        proc_root: a.proc_root.clone(),
        run_dir: a.run_dir.clone(),
        lock_wait: Duration::from_secs(30),
        open_group: Default::default(),
    }
}

fn require_root() -> Result<(), Error> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    let host = host(&cli.host);
    match cli.command {
        Command::Check { json } => trace::check_cmd(&host, json),
        Command::Trace(a) => trace::trace_cmd(&host, a),
        Command::Reset(a) => reset::reset_cmd(&host, a),
        Command::Status(a) => status::status_cmd(&host, a),
        Command::Health(a) => status::health_cmd(&host, a),
        Command::Run(a) => run::run_cmd(host, a),
        Command::PowerCycle(a) => power_cycle::power_cycle_cmd(&host, a),
        Command::GenerateAssets { dir } => man::generate_assets(&dir),
    }
}

fn config_default_path() -> std::path::PathBuf {
    std::path::PathBuf::from(qcom_reset::config::DEFAULT_PATH)
}

/// systemd's readiness protocol (Type=notify); a no-op outside systemd.
fn sd_notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("sd_notify: {e}");
    }
}

fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// The configuration the one-shot commands honour: the given file, or the default when present.
fn device_config(path: Option<std::path::PathBuf>) -> anyhow::Result<Config> {
    let explicit = path.is_some();
    Ok(Config::load(
        &path.unwrap_or_else(config_default_path),
        explicit,
    )?)
}

/// The device's profile and BAR: the command line's over the configuration's.
fn resolve(host: &Host, cfg: &Config, bdf: Bdf, a: &DeviceArgs) -> DeviceConfig {
    let ids = host.sysfs.device(bdf).and_then(|d| d.ids()).ok();
    cfg.resolve(bdf, ids, a.profile.as_deref(), a.bar)
}

/// The experimental profiles a one-shot command may use: all with `--experimental`, else the
/// configuration's list.
fn opt_in(cfg: &Config, flag: bool) -> OptIn {
    if flag {
        OptIn::all()
    } else {
        cfg.experimental.clone()
    }
}

/// "reviewed (upstream quirk: yes)" or "experimental, not opted in (...)", for `status`. A
/// profile the configuration or `--profile` names for the device is opted in.
fn profile_status(p: &qcom_reset::device::DeviceProfile, opt_in: &OptIn, named: bool) -> String {
    use qcom_reset::device::Status as ProfileStatus;
    let upstream = if p.upstream { "yes" } else { "no" };
    let quirk = p.quirk.map(|q| format!("; {q}")).unwrap_or_default();
    match p.status {
        ProfileStatus::Reviewed => format!("reviewed (upstream quirk: {upstream}){quirk}"),
        ProfileStatus::Experimental if named || opt_in.allows(p) => {
            format!("experimental, opted in (upstream quirk: {upstream}){quirk}")
        }
        ProfileStatus::Experimental => format!(
            "experimental, not opted in: nothing is written until experimental = [\"{}\"] (config) or --experimental{quirk}",
            p.name
        ),
    }
}
