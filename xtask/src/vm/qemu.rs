//! One guest boot under QEMU/TCG (no usable KVM on these hosts): q35 with intel-iommu for VFIO,
//! qboot and the PVH entry of the uncompressed kernel, serial console captured, always ends.
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub struct Boot {
    /// Everything the guest printed on its console.
    pub console: String,
    /// The guest's `VMLAB-RC=N`, or None if it never reported (crash, hang, timeout).
    pub rc: Option<i32>,
    pub wall: Duration,
}

/// Which QEMU runs the guest.
#[derive(Clone, Debug)]
pub enum Qemu {
    /// The machine's own (bookworm-backports' 10.0): enough for the ivshmem card.
    Host,
    /// The vfio-user-capable build unpacked under this root (see `host::vfio_user_qemu`).
    Root(PathBuf),
}

impl Qemu {
    fn command(&self) -> Command {
        match self {
            Qemu::Host => Command::new("qemu-system-x86_64"),
            Qemu::Root(r) => {
                // The root's own loader and libraries, so its glibc need not be the machine's.
                let mut c = Command::new(r.join("lib64/ld-linux-x86-64.so.2"));
                c.arg("--library-path")
                    .arg(format!(
                        "{}:{}",
                        r.join("lib/x86_64-linux-gnu").display(),
                        r.join("usr/lib/x86_64-linux-gnu").display()
                    ))
                    .arg(r.join("usr/bin/qemu-system-x86_64"))
                    .arg("-L")
                    .arg(r.join("usr/share/qemu"));
                c
            }
        }
    }
}

impl Qemu {
    /// The guest's IOMMU (its vfio-pci needs one). A VFIO device behind it, as the vfio-user
    /// card is to QEMU, needs caching mode: QEMU must see every mapping the guest makes.
    fn iommu(&self) -> &'static str {
        match self {
            Qemu::Host => "intel-iommu",
            Qemu::Root(_) => "intel-iommu,caching-mode=on",
        }
    }
}

pub fn boot(
    qemu: &Qemu,
    vmlinux: &Path,
    initrd: &Path,
    extra: &[String],
    timeout: Duration,
    log: &Path,
    echo: bool,
) -> anyhow::Result<Boot> {
    let start = Instant::now();
    let mut child = command(qemu, vmlinux, initrd, extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let lines = lines_of(&mut child);
    let console = collect(&mut child, &lines, start + timeout, echo);
    let _ = child.wait();
    std::fs::write(log, &console)?;
    let rc = console
        .lines()
        .filter_map(|l| l.split("VMLAB-RC=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .next_back();
    Ok(Boot {
        console,
        rc,
        wall: start.elapsed(),
    })
}

/// The lab's machine: q35 under TCG, qboot, no display or network, the kernel and initramfs
/// given, the IOMMU, then the scenario's devices.
fn command(qemu: &Qemu, vmlinux: &Path, initrd: &Path, extra: &[String]) -> std::process::Command {
    let mut cmd = qemu.command();
    cmd.args([
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2",
    ])
    .args([
        "-bios",
        "qboot.rom",
        "-vga",
        "none",
        "-nic",
        "none",
        "-nographic",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(vmlinux)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=3 intel_iommu=on",
    ])
    .args(["-device", qemu.iommu()])
    // Native PCIe hotplug on the root port, as on hosts: pciehp drives the slot (its events
    // are what the port guard masks), and QEMU's slot plug reports the card present and its
    // link active. With ACPI hotplug QEMU never sets Data Link Layer Link Active, so the
    // kernel's wait after a bus reset fails for a card with a PM capability.
    .args([
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    ])
    .args(extra);
    cmd
}

/// QEMU's stdout and stderr (prefixed `qemu: `), line by line, from two reader threads.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {l}"));
        }
    });
    rx
}

/// The console until QEMU exits, or until `deadline`, when it is killed.
fn collect(
    child: &mut std::process::Child,
    rx: &mpsc::Receiver<String>,
    deadline: Instant,
    echo: bool,
) -> String {
    let mut console = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                if echo {
                    println!("    | {line}");
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    console.push_str("VMLAB: timeout, QEMU killed\n");
                    break;
                }
            }
        }
    }
    console
}

/// The lines the guest printed between `VMLAB-BEGIN name` and `VMLAB-END name`.
pub fn section<'a>(console: &'a str, name: &str) -> Vec<&'a str> {
    let begin = format!("VMLAB-BEGIN {name}");
    let end = format!("VMLAB-END {name}");
    console
        .lines()
        .skip_while(|l| !l.contains(&begin))
        .skip(1)
        .take_while(|l| !l.contains(&end))
        .collect()
}
