//! Runs inside the VM lab's guest, as QEMU would use a device:
//! - `vfio-cycle BDF [HOLD_MS]` opens it through its VFIO group (container, type1 IOMMU, device
//!   fd: the kernel runs vfio_pci_core_enable), keeps it open HOLD_MS, then closes it
//!   (vfio_pci_core_disable);
//! - `vfio-graceful BDF HOLD_MS GROUP_MS` does the same but, like a QEMU shutting down
//!   gracefully, keeps the group open GROUP_MS after closing the device;
//! - `port-regs BDF` prints the registers of its upstream port that a reset guards (Slot
//!   Control, AER Uncorrectable Error Mask, DPC) as one `VMLAB port {json}` line.
use std::time::{Duration, Instant};

use qcom_reset::backend::VfioBackend;
use qcom_reset::bdf::Bdf;
use qcom_reset::sysfs::PciSysfs;

const USAGE: &str = "usage: vmlab-guest vfio-cycle BDF [HOLD_MS] | vfio-graceful BDF HOLD_MS GROUP_MS | port-regs BDF";

fn ms(arg: Option<&String>) -> anyhow::Result<Duration> {
    Ok(Duration::from_millis(
        arg.map(|s| s.parse()).transpose()?.unwrap_or(0),
    ))
}

fn open(bdf: Bdf) -> anyhow::Result<VfioBackend> {
    let dev = PciSysfs::default().device(bdf)?;
    let t = Instant::now();
    let backend = VfioBackend::open(&dev)?;
    println!(
        "vmlab-guest: opened {bdf} through VFIO in {:?} (pid {})",
        t.elapsed(),
        std::process::id()
    );
    Ok(backend)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let bdf: Bdf = args.get(2).ok_or_else(|| anyhow::anyhow!(USAGE))?.parse()?;
    match args.get(1).map(String::as_str) {
        Some("vfio-cycle") => {
            let backend = open(bdf)?;
            std::thread::sleep(ms(args.get(3))?);
            let t = Instant::now();
            drop(backend);
            println!("vmlab-guest: closed {bdf} in {:?}", t.elapsed());
        }
        Some("vfio-graceful") => {
            let backend = open(bdf)?;
            std::thread::sleep(ms(args.get(3))?);
            let group = backend.close_device();
            println!("vmlab-guest: closed the device {bdf}, keeping its group");
            std::thread::sleep(ms(args.get(4))?);
            drop(group);
            println!("vmlab-guest: closed the group of {bdf}");
        }
        Some("port-regs") => {
            use qcom_reset::session::port::{PortState, SysfsConfig, upstream};
            let dev = PciSysfs::default().device(bdf)?;
            let port = upstream(&dev).ok_or_else(|| anyhow::anyhow!("{bdf} has no upstream port"))?;
            let mut cfg = SysfsConfig::open(&port.path("config"), false)?;
            let state = PortState::read(port.bdf, &mut cfg)?;
            println!("VMLAB port {}", serde_json::to_string(&state)?);
        }
        _ => anyhow::bail!(USAGE),
    }
    Ok(())
}
