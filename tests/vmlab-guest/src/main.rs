//! Runs inside the VM lab's guest. `vfio-cycle BDF [HOLD_MS]` opens the device through its VFIO
//! group exactly as QEMU does (container, type1 IOMMU, device fd: the kernel runs
//! vfio_pci_core_enable), keeps it open HOLD_MS, then closes it (vfio_pci_core_disable).
use std::time::{Duration, Instant};

use qcom_reset::backend::VfioBackend;
use qcom_reset::sysfs::PciSysfs;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("vfio-cycle") => {
            let bdf = args
                .get(2)
                .ok_or_else(|| anyhow::anyhow!("usage: vmlab-guest vfio-cycle BDF [HOLD_MS]"))?
                .parse()?;
            let hold: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
            let dev = PciSysfs::default().device(bdf)?;
            let t = Instant::now();
            let backend = VfioBackend::open(&dev)?;
            println!(
                "vmlab-guest: opened {bdf} through VFIO in {:?} (pid {})",
                t.elapsed(),
                std::process::id()
            );
            std::thread::sleep(Duration::from_millis(hold));
            let t = Instant::now();
            drop(backend);
            println!("vmlab-guest: closed {bdf} in {:?}", t.elapsed());
            Ok(())
        }
        _ => anyhow::bail!("usage: vmlab-guest vfio-cycle BDF [HOLD_MS]"),
    }
}
