//! Runs inside the VM lab's guest, as QEMU would use a device:
//! - `vfio-cycle BDF [HOLD_MS]` opens it through its VFIO group (container, type1 IOMMU, device
//!   fd: the kernel runs vfio_pci_core_enable), keeps it open HOLD_MS, then closes it
//!   (vfio_pci_core_disable);
//! - `wait-count FILE PATTERN N` returns once FILE has N lines containing PATTERN;
//! - `unit-costs BDF` times a 1 ms sleep, a clock read, a config read through VFIO and a BAR0 read,
//!   and prints `VMLAB unit-costs {json}` (µs, p50 and p99, and the clocksource);
//! - `vfio-flood BDF SECONDS` opens and closes it as fast as it can for SECONDS and prints
//!   `VMLAB flood-rate CYCLES NS`;
//! - `vfio-use BDF HOLD_MS` does the same and maps and reads BAR0 in between, as QEMU does;
//! - `vfio-graceful BDF HOLD_MS GROUP_MS` does the same but, like a QEMU shutting down
//!   gracefully, keeps the group open GROUP_MS after closing the device;
//! - `port-regs BDF` prints the registers of its upstream port that a reset guards (Slot
//!   Control, AER Uncorrectable Error Mask, DPC) as one `VMLAB port {json}` line;
//! - `handover BDF DRIVER` gives the device to a host driver as libvirt's managed reattach does
//!   right after QEMU exits (`driver_override`, unbind, `drivers_probe`), then prints one
//!   `VMLAB handover {json}` line: CLOCK_MONOTONIC ns at its start and end and the card as it
//!   reads right after; `card BDF` prints the same reading as `VMLAB card-state {json}`;
//! - for `cargo xtask bench-lab`: `until PATTERN LOG CMD...` starts CMD (output to LOG), prints
//!   the milliseconds until LOG holds PATTERN and its pid, and leaves it running; `stamp` copies
//!   stdin lines, each followed by the CLOCK_MONOTONIC nanoseconds it arrived at; `now` prints
//!   CLOCK_MONOTONIC nanoseconds;
//! - `unit-sandbox FILE PROG ARGS...` runs PROG under the shipped unit's syscall filter and
//!   capability bounding set ([`sandbox`]).
mod sandbox;

use std::time::{Duration, Instant};

use qcom_reset::access::{Backend as _, VfioBackend};
use qcom_reset::bdf::Bdf;
use qcom_reset::host::sysfs::PciSysfs;

const USAGE: &str = "usage: vmlab-guest vfio-cycle BDF [HOLD_MS] | vfio-flood BDF SECONDS | unit-costs BDF | wait-count FILE PATTERN N | vfio-use BDF HOLD_MS | vfio-graceful BDF HOLD_MS GROUP_MS | port-regs BDF | handover BDF DRIVER | card BDF | until PATTERN LOG CMD... | stamp | now | unit-sandbox FILE PROG ARGS...";

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

/// The card as a host driver's owner would check it: driver, `driver_override`, PCI_COMMAND,
/// `power/control`, the whole config space and whether a crash record exists. Read with plain
/// file reads, not qcom-reset's own sysfs code: this is the observer of the code under test.
fn card_state(bdf: &str) -> anyhow::Result<CardState> {
    let dev = std::path::Path::new("/sys/bus/pci/devices").join(bdf);
    let text = |attr: &str| std::fs::read_to_string(dev.join(attr)).map(|s| s.trim().to_string());
    let driver = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let config = std::fs::read(dev.join("config"))?;
    anyhow::ensure!(
        config.len() >= 64,
        "{bdf}: config space of {} bytes",
        config.len()
    );
    let hex: String = config.iter().map(|b| format!("{b:02x}")).collect();
    Ok(CardState {
        driver,
        driver_override: text("driver_override")?,
        command: u16::from_le_bytes([config[4], config[5]]),
        power_control: text("power/control")?,
        config: hex,
        record: std::path::Path::new(&format!("/run/qcom-reset/{bdf}.json")).exists(),
    })
}

/// A card as sysfs shows it (`VMLAB card-state {json}`; the lab's `records::CardState`).
#[derive(serde::Serialize)]
struct CardState {
    /// The bound driver.
    driver: Option<String>,
    /// `driver_override` as read.
    driver_override: String,
    /// PCI_COMMAND.
    command: u16,
    /// `power/control`.
    power_control: String,
    /// Config space, hex.
    config: String,
    /// A crash record for the card exists.
    record: bool,
}

/// `VMLAB handover {json}`: CLOCK_MONOTONIC ns at the handover's start and end, and the card
/// right after.
#[derive(serde::Serialize)]
struct Handover {
    /// Before the override was written.
    start_ns: u64,
    /// After the reprobe.
    end_ns: u64,
    /// The card right after.
    card: CardState,
}

/// libvirt's managed reattach: the override replaced first (a session's own override keeps every
/// driver off; libvirt clears it so ath11k matches by ID, uio_pci_generic matches no ID and must
/// be named), then unbind from vfio-pci and reprobe.
fn handover(bdf: &str, driver: &str) -> anyhow::Result<()> {
    let dev = std::path::Path::new("/sys/bus/pci/devices").join(bdf);
    let start = monotonic_ns();
    std::fs::write(dev.join("driver_override"), driver)?;
    if dev.join("driver").exists() {
        std::fs::write(dev.join("driver/unbind"), bdf)?;
    }
    std::fs::write("/sys/bus/pci/drivers_probe", bdf)?;
    let end = monotonic_ns();
    let line = Handover {
        start_ns: start,
        end_ns: end,
        card: card_state(bdf)?,
    };
    println!("VMLAB handover {}", serde_json::to_string(&line)?);
    Ok(())
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

/// Waits until FILE has at least N lines containing PATTERN (60 s at most), reading each byte
/// once: a shell loop grepping a growing journal every few ms took a guest vCPU from the agent
/// it measured.
fn wait_count(file: &str, pattern: &str, n: usize) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let t = Instant::now();
    let mut reader = loop {
        match std::fs::File::open(file) {
            Ok(f) => break BufReader::new(f),
            Err(_) if t.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => anyhow::bail!("{file}: {e}"),
        }
    };
    let (mut seen, mut line) = (0, String::new());
    while seen < n {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "{seen} of {n} lines with {pattern:?} in {file} after 60 s"
        );
        line.clear();
        // A line without its newline yet is read again whole once it has one.
        match reader.read_line(&mut line)? {
            0 => std::thread::sleep(Duration::from_millis(2)),
            len if !line.ends_with('\n') => {
                reader.seek_relative(-(len as i64))?;
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => seen += usize::from(line.contains(pattern)),
        }
    }
    Ok(())
}

/// Median and 99th percentile, in µs, of `n` timed runs of `f`.
fn timed(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    (v[n / 2], v[(n * 99).div_ceil(100) - 1])
}

/// What the guest charges for the operations a reset is made of, for bench-lab's breakdown:
/// a 1 ms sleep's overshoot, a clock read (and the clocksource behind it), a config-space read
/// through VFIO, a BAR0 read (MHISTATUS, which reading never changes). One `VMLAB unit-costs {json}` line, µs.
fn unit_costs(bdf: Bdf) -> anyhow::Result<()> {
    let (sleep50, sleep99) = timed(200, || std::thread::sleep(Duration::from_millis(1)));
    // What a clock read costs (the guest's clocksource may be emulated hardware under TCG).
    let (clock50, clock99) = timed(200, || {
        std::hint::black_box(monotonic_ns());
    });
    let clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    let mut backend = open(bdf)?;
    let (cfg50, cfg99) = timed(200, || {
        let _ = backend.config_read16(qcom_reset::pci::PCI_COMMAND);
    });
    let (mut bar, _) = backend.map_bar(0)?;
    let (mmio50, mmio99) = timed(200, || {
        bar.read32(qcom_reset::device::regs::MHISTATUS);
    });
    println!(
        "VMLAB unit-costs {}",
        serde_json::json!({
            "sleep_overshoot_us": [sleep50 - 1000.0, sleep99 - 1000.0],
            "clock_read_us": [clock50, clock99],
            "clocksource": clocksource.trim(),
            "config_read_us": [cfg50, cfg99],
            "mmio_read_us": [mmio50, mmio99],
        })
    );
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
        Some("unit-sandbox") if args.len() > 3 => {
            return sandbox::run(&args[2], &args[3], &args[4..]);
        }
        Some("until") if args.len() > 4 => return until(&args[2], &args[3], &args[4..]),
        Some("wait-count") if args.len() > 4 => {
            return wait_count(&args[2], &args[3], args[4].parse()?);
        }
        Some("handover") if args.len() > 3 => return handover(&args[2], &args[3]),
        Some("card") if args.len() > 2 => {
            println!(
                "VMLAB card-state {}",
                serde_json::to_string(&card_state(&args[2])?)?
            );
            return Ok(());
        }
        _ => {}
    }
    let bdf: Bdf = args.get(2).ok_or_else(|| anyhow::anyhow!(USAGE))?.parse()?;
    match args.get(1).map(String::as_str) {
        Some("unit-costs") => unit_costs(bdf)?,
        Some("vfio-flood") => {
            // As many VFIO opens and releases as the guest manages for the given seconds, all
            // in this process (no exec per cycle): the load of a busy host's other devices.
            let secs =
                Duration::from_secs(args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10));
            let dev = PciSysfs::default().device(bdf)?;
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < secs {
                drop(VfioBackend::open(&dev)?);
                n += 1;
            }
            println!("VMLAB flood-rate {n} {}", t.elapsed().as_nanos());
        }
        Some("vfio-cycle") => {
            let backend = open(bdf)?;
            std::thread::sleep(ms(args.get(3))?);
            let t = Instant::now();
            drop(backend);
            println!("vmlab-guest: closed {bdf} in {:?}", t.elapsed());
        }
        Some("vfio-use") => {
            // As QEMU starting a VM: open, map BAR0 (vfio-pci claims the BAR's region, which
            // revokes other mappings of it under CONFIG_IO_STRICT_DEVMEM), read a register.
            let mut backend = open(bdf)?;
            let (mut bar, _) = backend.map_bar(0)?;
            println!(
                "vmlab-guest: BAR0 mapped, register 0x0 reads {:#010x}",
                bar.read32(0)
            );
            std::thread::sleep(ms(args.get(3))?);
            drop(bar);
            drop(backend);
            println!("vmlab-guest: closed {bdf}");
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
            use qcom_reset::pci::SysfsConfig;
            use qcom_reset::session::port::{PortState, upstream};
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
