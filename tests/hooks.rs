//! The libvirt and Proxmox hook examples find the passed-through devices and call
//! `qcom-reset reset BDF --only-targets` for each, in the phases that matter.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn dist(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/hooks")
        .join(name)
}

/// A stand-in for qcom-reset (and `qm`) that records its arguments.
fn stub(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    p
}

fn run(script: &Path, args: &[&str], stdin: &str, dir: &Path) -> String {
    let (calls, status, _) = run_with(script, args, stdin, dir, "");
    assert!(
        status.success(),
        "a hook must not fail the VM operation here"
    );
    calls
}

/// Runs a hook with a qcom-reset stand-in that records its arguments and then runs `then`;
/// returns the calls, the hook's exit status and its stderr.
fn run_with(
    script: &Path,
    args: &[&str],
    stdin: &str,
    dir: &Path,
    then: &str,
) -> (String, std::process::ExitStatus, String) {
    let rec = stub(
        dir,
        "qcom-reset",
        &format!("echo \"$@\" >> {}/calls\n{then}", dir.display()),
    );
    let mut child = Command::new("sh")
        .arg(script)
        .args(args)
        .env("QCOM_RESET", &rec)
        .env(
            "PATH",
            format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
        )
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hook that has nothing to do exits without reading the domain XML: EPIPE is fine.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    (
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default(),
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const DOMAIN: &str = r#"<domain type='kvm'><name>vm1</name><devices>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>
    <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
  </hostdev>
  <disk type='file'><address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0x0000' bus='0x0a' slot='0x1f' function='0x7'/></source>
  </hostdev>
</devices></domain>"#;

#[test]
fn libvirt_hook_resets_each_hostdev_before_start_and_after_release() {
    for (op, sub) in [("prepare", "begin"), ("release", "end")] {
        let t = tempfile::tempdir().unwrap();
        let calls = run(
            &dist("libvirt-qemu"),
            &["vm1", op, sub, "-"],
            DOMAIN,
            t.path(),
        );
        assert_eq!(
            calls, "reset 0000:03:00.0 --only-targets\nreset 0000:0a:1f.7 --only-targets\n",
            "{op}/{sub}"
        );
    }
    let t = tempfile::tempdir().unwrap();
    assert_eq!(
        run(
            &dist("libvirt-qemu"),
            &["vm1", "started", "begin", "-"],
            DOMAIN,
            t.path()
        ),
        ""
    );
}

#[test]
fn proxmox_hookscript_resets_hostpci_devices() {
    let t = tempfile::tempdir().unwrap();
    stub(
        t.path(),
        "qm",
        "printf 'boot: order=scsi0\\nhostpci0: 0000:03:00.0,pcie=1\\nhostpci1: 04:00,pcie=1\\nhostpci2: mapping=wlan\\n'",
    );
    for phase in ["pre-start", "post-stop"] {
        let _ = std::fs::remove_file(t.path().join("calls"));
        let calls = run(
            &dist("proxmox-hookscript.sh"),
            &["101", phase],
            "",
            t.path(),
        );
        assert_eq!(
            calls, "reset 0000:03:00.0 --only-targets\nreset 0000:04:00.0 --only-targets\n",
            "{phase}"
        );
    }
    let _ = std::fs::remove_file(t.path().join("calls"));
    assert_eq!(
        run(
            &dist("proxmox-hookscript.sh"),
            &["101", "post-start"],
            "",
            t.path()
        ),
        ""
    );
}

/// pre-start refuses the VM with one line when a device is not clean after its reset; post-stop
/// never fails (the VM is gone either way).
#[test]
fn proxmox_pre_start_refuses_a_device_that_is_not_clean() {
    let t = tempfile::tempdir().unwrap();
    stub(t.path(), "qm", "printf 'hostpci0: 0000:03:00.0,pcie=1\\n'");
    let not_clean = "echo '0000:03:00.0 wcn6855: reset with the register sequence in 5040 ms'\n\
                     echo '  verdict: link-down (config space reads all-ones (rev ff): the link is down)'\n\
                     exit 2";
    let (_, status, stderr) = run_with(
        &dist("proxmox-hookscript.sh"),
        &["101", "pre-start"],
        "",
        t.path(),
        not_clean,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "qcom-reset: not starting VM 101: 0000:03:00.0 is not clean: link-down (config space reads all-ones (rev ff): the link is down)"
    );
    let (_, status, _) = run_with(
        &dist("proxmox-hookscript.sh"),
        &["101", "post-stop"],
        "",
        t.path(),
        not_clean,
    );
    assert!(status.success(), "post-stop never fails");
}
