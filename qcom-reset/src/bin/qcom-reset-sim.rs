//! Serves the firmware simulator to a QEMU guest, so the real qcom-reset in it resets a simulated
//! card: as a whole vfio-user PCI function (`--vfio-user`: the card's IDs, config space and
//! BAR0), or behind a shared-memory file, the backing store of an ivshmem-plain BAR (`--shm`,
//! for QEMU before 10.1). Writes a JSON report (writes received, conformance with the reviewed
//! sequence, state, and the resets the kernel delivered).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use qcom_reset::device;
use qcom_reset::sim::{Faults, LinkDrop, Model, SimState, shm};

#[derive(Parser)]
#[command(
    name = "qcom-reset-sim",
    version,
    about = "Register-level firmware simulator served over shared memory"
)]
struct Args {
    /// Device profile to simulate.
    #[arg(long, default_value = "wcn6855")]
    profile: String,
    /// Shared-memory file (created and sized if needed), e.g. /dev/shm/qcom-reset-sim.
    #[arg(
        long,
        required_unless_present = "vfio_user",
        conflicts_with = "vfio_user"
    )]
    shm: Option<PathBuf>,
    /// vfio-user socket to listen on for one QEMU `vfio-user-pci` client.
    #[arg(long)]
    vfio_user: Option<PathBuf>,
    /// IDs to present instead of the profile's, VVVV:DDDD (a sibling the device table lacks).
    #[arg(long, value_parser = parse_ids)]
    ids: Option<(u16, u16)>,
    /// What a link drop does to config space (vfio-user only: with `--shm` it is QEMU's).
    #[arg(long, value_enum, default_value_t = LinkDrop::FunctionReset)]
    link_drop: LinkDrop,
    /// QEMU puts the card on its root bus (vfio-user only): it presents it as a root-complex
    /// integrated endpoint and keeps Link Control (2) itself, so a restore cannot owe them.
    #[arg(long)]
    root_bus: bool,
    /// Size of the file in bytes (QEMU's memory-backend-file size).
    #[arg(long, default_value_t = 1 << 20)]
    size: u64,
    /// JSON report, rewritten whenever something changes.
    #[arg(long)]
    report: PathBuf,
    /// The state the previous owner left the card in (a killed VM: `mission`).
    #[arg(long, value_enum, default_value_t = SimState::Mission)]
    state: SimState,
    /// Faults to inject, comma-separated.
    #[arg(long, default_value = "", long_help = Faults::NAMES)]
    fault: String,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn parse_ids(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not VVVV:DDDD (hex vendor and device IDs)");
    let (v, d) = s.split_once(':').ok_or_else(bad)?;
    let hex = |x: &str| u16::from_str_radix(x, 16).map_err(|_| bad());
    Ok((hex(v)?, hex(d)?))
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let p = device::by_name(&a.profile).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown profile {:?}; known: {}",
            a.profile,
            device::profile_names()
        )
    })?;
    let faults = Faults::parse(&a.fault).map_err(anyhow::Error::msg)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let shown = if a.fault.is_empty() {
        "none"
    } else {
        a.fault.as_str()
    };
    let (vendor, device) = a.ids.unwrap_or((p.vendor, p.device));
    let mut model = Model::new(p.family, vendor, device, a.state, faults);
    let stop: &'static (dyn Fn() -> bool + Sync) = &stopped;
    let (on, path) = match (&a.vfio_user, &a.shm) {
        (Some(socket), _) => ("vfio-user socket", socket),
        (None, Some(file)) => ("shared memory", file),
        (None, None) => unreachable!("clap requires one of --shm and --vfio-user"),
    };
    eprintln!(
        "qcom-reset-sim: {} ({}, {:04x}:{:04x}) in state {:?} on {on} {}, faults: {shown}",
        p.name,
        p.family.name(),
        vendor,
        device,
        a.state,
        path.display()
    );
    if a.vfio_user.is_some() {
        model.link_drop = a.link_drop;
        if a.root_bus {
            model.cfg.links_emulated();
        }
        return serve_vfio_user(path, model, &a.report, stop);
    }
    shm::serve(path, a.size, model, &a.report, stop)
}

#[cfg(feature = "vfio-user")]
fn serve_vfio_user(
    socket: &std::path::Path,
    model: Model,
    report: &std::path::Path,
    stop: &'static (dyn Fn() -> bool + Sync),
) -> anyhow::Result<()> {
    let card = qcom_reset::sim::vfio_user::Card::new(model);
    qcom_reset::sim::vfio_user::serve(socket, card, report, stop)
}

#[cfg(not(feature = "vfio-user"))]
fn serve_vfio_user(
    _: &std::path::Path,
    _: Model,
    _: &std::path::Path,
    _: &'static (dyn Fn() -> bool + Sync),
) -> anyhow::Result<()> {
    anyhow::bail!(
        "this qcom-reset-sim was built without vfio-user; fix: cargo build --features vfio-user --bin qcom-reset-sim"
    )
}
