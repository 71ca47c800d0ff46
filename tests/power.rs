//! `qcom-reset power-cycle` as root meets it on a fake host: what it checks again once it holds
//! the device's lock, before it writes anything.
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use qcom_reset::host::lock::DeviceLock;

const CARD: &str = "0000:03:00.0";

/// Whether `pid` has `path` open.
fn has_open(pid: u32, path: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|rd| {
        rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|l| l == path)
    })
}

/// A VM that starts while `power-cycle` waits for the device lock: the command inspected the
/// card free, but once it has the lock it finds the holder and writes nothing.
#[test]
fn a_holder_that_appears_while_waiting_for_the_lock_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: power-cycle needs root (it writes nothing here: the sysfs is fake)");
        return;
    }
    let h = FakeHost::new();
    h.add_below_port("0000:00:1c.0", FakeDevice::default());
    let lock = DeviceLock::acquire(&h.host.run_dir, bdf(CARD), Duration::ZERO).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_qcom-reset"))
        .arg("--sysfs-root")
        .arg(&h.host.sysfs.root)
        .arg("--proc-root")
        .arg(&h.host.proc_root)
        .arg("--dev-vfio")
        .arg(&h.host.dev_vfio)
        .arg("--run-dir")
        .arg(&h.host.run_dir)
        .args(["power-cycle", CARD, "--method", "d3cold", "--no-reset"])
        .args(["--config", "/dev/null"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !has_open(child.id(), &lock.path) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never waited for the lock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.hold(4242, "qemu-system-x86", "/dev/vfio/12");
    drop(lock);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(75), "busy: {err}");
    assert!(
        err.contains("is held by pid 4242 (qemu-system-x86)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(h.root().join("sys/bus/pci/drivers_autoprobe")).unwrap(),
        "1\n",
        "autoprobe untouched"
    );
    assert!(
        !h.host.sysfs.root.join(CARD).join("remove").exists(),
        "not removed"
    );
}
