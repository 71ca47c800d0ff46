//! Serves the firmware simulator behind a shared-memory file, e.g. the backing store of a QEMU
//! ivshmem-plain BAR, so the real qcom-reset in a guest resets a simulated card through a real
//! PCI BAR. Writes a JSON report (writes received, conformance with the reviewed sequence, state).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use qcom_reset::devices;
use qcom_reset::sim::{Faults, Model, SimState, shm};

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
    #[arg(long)]
    shm: PathBuf,
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

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let p = devices::by_name(&a.profile).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown profile {:?}; known: {}",
            a.profile,
            devices::profile_names()
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
    eprintln!(
        "qcom-reset-sim: {} ({}) in state {:?} on {}, faults: {shown}",
        p.name,
        p.family.name(),
        a.state,
        a.shm.display()
    );
    shm::serve(
        &a.shm,
        a.size,
        Model::new(p.family, p.vendor, p.device, a.state, faults),
        &a.report,
        &|| STOP.load(Ordering::SeqCst),
    )
}
