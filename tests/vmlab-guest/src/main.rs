//! Runs inside the VM lab's guest, as QEMU would use a device:
//! - `vfio-cycle BDF [HOLD_MS]` opens it through its VFIO group (container, type1 IOMMU, device
//!   fd: the kernel runs vfio_pci_core_enable), keeps it open HOLD_MS, then closes it
//!   (vfio_pci_core_disable);
//! - `vfio-graceful BDF HOLD_MS GROUP_MS` does the same but, like a QEMU shutting down
//!   gracefully, keeps the group open GROUP_MS after closing the device;
//! - `port-regs BDF` prints the registers of its upstream port that a reset guards (Slot
//!   Control, AER Uncorrectable Error Mask, DPC) as one `VMLAB port {json}` line;
//! - for `cargo xtask bench-lab`: `until PATTERN LOG CMD...` starts CMD (output to LOG), prints
//!   the milliseconds until LOG holds PATTERN and its pid, and leaves it running; `stamp` copies
//!   stdin lines, each followed by the CLOCK_MONOTONIC nanoseconds it arrived at; `now` prints
//!   CLOCK_MONOTONIC nanoseconds.
use std::time::{Duration, Instant};

use qcom_reset::backend::VfioBackend;
use qcom_reset::bdf::Bdf;
use qcom_reset::sysfs::PciSysfs;

const USAGE: &str = "usage: vmlab-guest vfio-cycle BDF [HOLD_MS] | vfio-graceful BDF HOLD_MS GROUP_MS | port-regs BDF | until PATTERN LOG CMD... | stamp | now";

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

fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Starts `cmd` with its output in `log`, waits (60 s at most) until `log` holds `pattern`.
fn until(pattern: &str, log: &str, cmd: &[String]) -> anyhow::Result<()> {
    use std::process::{Command, Stdio};
    let out = std::fs::File::create(log)?;
    let t = Instant::now();
    let child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    while !std::fs::read_to_string(log)?.contains(pattern) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "{pattern:?} not in {log} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    println!("{:.1} {}", t.elapsed().as_secs_f64() * 1000.0, child.id());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("now") => {
            println!("{}", monotonic_ns());
            return Ok(());
        }
        Some("stamp") => {
            use std::io::{BufRead as _, Write as _};
            let mut out = std::io::stdout().lock();
            for line in std::io::stdin().lock().lines() {
                writeln!(out, "{} {}", line?, monotonic_ns())?;
                out.flush()?;
            }
            return Ok(());
        }
        Some("until") if args.len() > 4 => return until(&args[2], &args[3], &args[4..]),
        _ => {}
    }
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
            let port =
                upstream(&dev).ok_or_else(|| anyhow::anyhow!("{bdf} has no upstream port"))?;
            let mut cfg = SysfsConfig::open(&port.path("config"), false)?;
            let state = PortState::read(port.bdf, &mut cfg)?;
            println!("VMLAB port {}", serde_json::to_string(&state)?);
        }
        _ => anyhow::bail!(USAGE),
    }
    Ok(())
}
