//! The libvirt and Proxmox hooks find the passed-through devices and call
//! `qcom-reset reset BDF --only-targets` for each, in the phases that matter; the package's
//! maintainer scripts tell libvirt about its hook and clean up on purge.
//!
//! Every command the scripts call (`qcom-reset`, `logger`, `qm`, `pvesh`, `hostname`,
//! `deb-systemd-invoke`) is a stand-in in a temporary directory put first on PATH, so nothing here needs
//! root, libvirt or Proxmox. `QCOM_RESET_DIST` runs the same tests against another copy of `dist/`
//! (e.g. the previous release's, to see a new test fail there).
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

fn dist(rel: &str) -> PathBuf {
    match std::env::var_os("QCOM_RESET_DIST") {
        Some(d) => PathBuf::from(d).join(rel),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../dist")
            .join(rel),
    }
}

fn libvirt_hook() -> PathBuf {
    dist("hooks/libvirt-qemu")
}

fn proxmox_hook() -> PathBuf {
    dist("hooks/proxmox-hookscript.sh")
}

/// An executable stand-in for a command.
fn stub(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    p
}

/// `logger` writing "PRIORITY TAG: MESSAGE" lines (one per stdin line without a message) to
/// `dir/log` instead of syslog.
const LOGGER: &str = r#"pri=user.notice; tag=logger
while [ $# -gt 0 ]; do
  case "$1" in
    -p) pri=$2; shift 2 ;;
    -t) tag=$2; shift 2 ;;
    --) shift; break ;;
    -*) shift ;;
    *) break ;;
  esac
done
if [ $# -gt 0 ]; then
  echo "$pri $tag: $*" >> "$(dirname "$0")/log"
else
  while IFS= read -r l; do echo "$pri $tag: $l" >> "$(dirname "$0")/log"; done
fi"#;

struct Run {
    /// The qcom-reset calls, one line each.
    calls: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// What went to syslog.
    log: String,
}

impl Run {
    fn warnings(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| l.starts_with("user.warning "))
            .collect()
    }
}

/// Runs a hook in `dir` with a qcom-reset stand-in that records its arguments and then runs
/// `then` (`$2` is the BDF), and the `logger` and `hostname` stand-ins. The Proxmox hookscript
/// reads `dir/default` as /etc/default/qcom-reset (absent unless a test writes it).
fn run(script: &Path, args: &[&str], stdin: &str, dir: &Path, then: &str) -> Run {
    let _ = std::fs::remove_file(dir.join("calls"));
    let _ = std::fs::remove_file(dir.join("log"));
    let rec = stub(
        dir,
        "qcom-reset",
        &format!("echo \"$@\" >> {}/calls\n{then}", dir.display()),
    );
    run_as(script, args, stdin, dir, &rec)
}

fn run_as(script: &Path, args: &[&str], stdin: &str, dir: &Path, qcom_reset: &Path) -> Run {
    stub(dir, "logger", LOGGER);
    if !dir.join("hostname").exists() {
        stub(dir, "hostname", "echo pve1.example.org");
    }
    let mut child = Command::new("sh")
        .arg(script)
        .args(args)
        .env("QCOM_RESET", qcom_reset)
        .env("QCOM_RESET_DEFAULTS", dir.join("default"))
        .env(
            "PATH",
            format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hook that has nothing to do exits without reading the domain XML: EPIPE is fine.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    Run {
        calls: std::fs::read_to_string(dir.join("calls")).unwrap_or_default(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        log: std::fs::read_to_string(dir.join("log")).unwrap_or_default(),
    }
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

/// What `qcom-reset reset` prints and returns for a card that is not clean after the reset.
const NOT_CLEAN: &str = "echo \"$2 wcn6855: reset with the register sequence in 5040 ms\"\n\
     echo '  verdict: link-down (config space reads all-ones (rev ff): the link is down)'\n\
     echo 'the card is off the link: try qcom-reset power-cycle' >&2\n\
     exit 3";

const BOTH: &str = "reset 0000:03:00.0 --only-targets\nreset 0000:0a:1f.7 --only-targets\n";

/// libvirt calls the hook at start/begin after qemuProcessPrepareHost has moved managed hostdevs
/// to vfio-pci, and at stopped/end before qemuHostdevReAttachDomainDevices hands them back to
/// their host driver: the two phases where the card is on vfio-pci and nothing holds it.
/// prepare/begin (card maybe still on ath11k) and release/end (host driver may be probing) reset
/// nothing. Whatever qcom-reset prints, the hook prints nothing (qemu.d scripts are XML filters).
#[test]
fn libvirt_hook_resets_at_start_begin_and_stopped_end_only() {
    let t = tempfile::tempdir().unwrap();
    for (op, sub) in [("start", "begin"), ("stopped", "end")] {
        let r = run(
            &libvirt_hook(),
            &["vm1", op, sub, "-"],
            DOMAIN,
            t.path(),
            "echo \"$2: clean\"; echo 'a warning' >&2",
        );
        assert!(r.status.success(), "{op}/{sub}: {}", r.stderr);
        assert_eq!(r.calls, BOTH, "{op}/{sub}");
        assert_eq!(
            r.stdout, "",
            "{op}/{sub}: stdout feeds the next qemu.d script"
        );
        assert!(
            r.log.contains(&format!(
                "qcom-reset-hook[vm1]: {op}/{sub}: qcom-reset reset 0000:03:00.0"
            )),
            "{op}/{sub}: the phase is logged: {}",
            r.log
        );
        assert!(r.log.contains("qcom-reset-hook[vm1]: 0000:0a:1f.7: clean"));
        assert!(r.warnings().is_empty(), "{}", r.log);
    }
    for (op, sub, extra) in [
        ("prepare", "begin", "-"),
        ("release", "end", "shutdown"),
        ("started", "begin", "-"),
        ("migrate", "begin", "-"),
        ("restore", "begin", "-"),
    ] {
        let r = run(
            &libvirt_hook(),
            &["vm1", op, sub, extra],
            DOMAIN,
            t.path(),
            "",
        );
        assert!(r.status.success(), "{op}/{sub}");
        assert_eq!(r.calls, "", "{op}/{sub}");
        assert_eq!(r.stdout, "", "{op}/{sub}");
    }
}

/// libvirt passes the shutoff reason only at release/end (4th argument, libvirt >= 10.5): the
/// hook logs it there, for a domain with PCI hostdevs, and resets nothing.
#[test]
fn libvirt_hook_logs_the_shutoff_reason_at_release_end() {
    let t = tempfile::tempdir().unwrap();
    let r = run(
        &libvirt_hook(),
        &["vm1", "release", "end", "crashed"],
        DOMAIN,
        t.path(),
        "",
    );
    assert!(r.status.success());
    assert_eq!(r.calls, "");
    assert_eq!(
        r.log,
        "user.info qcom-reset-hook[vm1]: release/end: shutoff reason: crashed (the reset ran at stopped/end)\n"
    );
    // Older libvirt passes "-"; a domain without hostdevs is none of our business.
    let r = run(
        &libvirt_hook(),
        &["vm1", "release", "end", "-"],
        DOMAIN,
        t.path(),
        "",
    );
    assert_eq!((r.calls.as_str(), r.log.as_str()), ("", ""));
    let r = run(
        &libvirt_hook(),
        &["vm2", "release", "end", "destroyed"],
        "<domain type='kvm'><name>vm2</name><devices/></domain>",
        t.path(),
        "",
    );
    assert_eq!((r.calls.as_str(), r.log.as_str()), ("", ""));
}

/// A reset that fails, is refused or leaves the card not clean never fails the VM operation
/// (libvirt aborts a start whose hook fails): one warning line names the device and the reason.
#[test]
fn libvirt_hook_logs_one_warning_per_device_and_never_fails() {
    let t = tempfile::tempdir().unwrap();
    for (then, reason) in [
        (
            NOT_CLEAN,
            "not clean after the reset (exit 3): link-down (config space reads all-ones (rev ff): the link is down)",
        ),
        (
            "echo \"$2 is bound to ath11k_pci: unbind it first\" >&2; exit 4",
            "refused, nothing written (exit 4): BDF is bound to ath11k_pci: unbind it first",
        ),
        (
            "echo \"$2 is held by qemu-system-x86 (pid 4242)\" >&2; exit 75",
            "busy, nothing written (exit 75): BDF is held by qemu-system-x86 (pid 4242)",
        ),
    ] {
        for (op, sub) in [("start", "begin"), ("stopped", "end")] {
            let r = run(
                &libvirt_hook(),
                &["vm1", op, sub, "-"],
                DOMAIN,
                t.path(),
                then,
            );
            assert!(r.status.success(), "{op}/{sub}");
            assert_eq!(r.calls, BOTH);
            assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
            let want: Vec<String> = ["0000:03:00.0", "0000:0a:1f.7"]
                .iter()
                .map(|bdf| {
                    format!(
                        "user.warning qcom-reset-hook[vm1]: {op}/{sub}: {bdf}: {}",
                        reason.replace("BDF", bdf)
                    )
                })
                .collect();
            assert_eq!(r.warnings(), want, "{}", r.log);
        }
    }
}

/// `apt remove` leaves the conffile hook but removes the binary: the hook then does nothing, and
/// says nothing.
#[test]
fn hooks_without_the_binary_do_nothing() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("removed/qcom-reset");
    stub(t.path(), "qm", "printf 'hostpci0: 0000:03:00.0,pcie=1\\n'");
    for (script, args, stdin) in [
        (
            libvirt_hook(),
            ["vm1", "start", "begin", "-"].as_slice(),
            DOMAIN,
        ),
        (libvirt_hook(), &["vm1", "stopped", "end", "-"], DOMAIN),
        (proxmox_hook(), &["101", "pre-start"], ""),
        (proxmox_hook(), &["101", "post-stop"], ""),
    ] {
        let r = run_as(&script, args, stdin, t.path(), &missing);
        assert!(r.status.success(), "{args:?}: {}", r.stderr);
        assert_eq!(
            (r.stdout.as_str(), r.stderr.as_str(), r.log.as_str()),
            ("", "", ""),
            "{args:?}"
        );
    }
}

/// Every form of hostpciN: a full or short address (function .0 assumed), `host=`, several
/// devices in one entry (`a;b`), and a PVE 8 resource mapping, resolved to its entries for this
/// node (`hostname`, short form) with `pvesh`.
#[test]
fn proxmox_hookscript_resets_every_hostpci_device() {
    let t = tempfile::tempdir().unwrap();
    stub(
        t.path(),
        "qm",
        &format!(
            "echo \"$@\" >> {}/qm.calls\nprintf '%s\\n' 'boot: order=scsi0' \
             'hostpci0: 0000:03:00.0,pcie=1' 'hostpci1: 04:00,pcie=1' \
             'hostpci2: mapping=wlan,pcie=1' 'hostpci3: 0000:05:00.0;0000:06:00.0,pcie=1' \
             'hostpci4: host=0000:07:00.0,rombar=0' 'hostpci5: pcie=1,mapping=modem' \
             'description: hostpci9: 0000:09:00.0'",
            t.path().display()
        ),
    );
    stub(
        t.path(),
        "pvesh",
        &format!(
            "echo \"$@\" >> {dir}/pvesh.calls\ncase \"$2\" in\n\
             */wlan) echo '{{\"id\":\"wlan\",\"map\":[\"id=17cb:1103,iommugroup=12,node=pve2,path=0000:0b:00.0\",\
             \"id=17cb:1103,iommugroup=14,node=pve1,path=0000:0c:00.0\"],\"type\":\"pci\"}}' ;;\n\
             */modem) echo '{{\"id\":\"modem\",\"map\":[\"node=pve1,path=0000:0d:00.0;0000:0d:00.1,id=17cb:0308\"]}}' ;;\n\
             *) echo \"no such mapping\" >&2; exit 2 ;;\nesac",
            dir = t.path().display()
        ),
    );
    let all = "reset 0000:03:00.0 --only-targets\nreset 0000:04:00.0 --only-targets\n\
               reset 0000:0c:00.0 --only-targets\nreset 0000:05:00.0 --only-targets\n\
               reset 0000:06:00.0 --only-targets\nreset 0000:07:00.0 --only-targets\n\
               reset 0000:0d:00.0 --only-targets\nreset 0000:0d:00.1 --only-targets\n";
    for phase in ["pre-start", "post-stop"] {
        let _ = std::fs::remove_file(t.path().join("pvesh.calls"));
        let r = run(&proxmox_hook(), &["101", phase], "", t.path(), "");
        assert!(r.status.success(), "{phase}: {}", r.stderr);
        assert_eq!(r.calls, all, "{phase}");
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{phase}");
        assert!(r.warnings().is_empty(), "{}", r.log);
        assert_eq!(
            std::fs::read_to_string(t.path().join("pvesh.calls")).unwrap(),
            "get /cluster/mapping/pci/wlan --output-format json\n\
             get /cluster/mapping/pci/modem --output-format json\n"
        );
    }
    assert!(
        std::fs::read_to_string(t.path().join("qm.calls"))
            .unwrap()
            .starts_with("config 101 --current 1\n"),
        "the devices the VM has, not pending changes"
    );
    let r = run(&proxmox_hook(), &["101", "post-start"], "", t.path(), "");
    assert!(r.status.success());
    assert_eq!(r.calls, "");

    // A mapping without an entry for this node: nothing to reset there, one warning, VM starts
    // (qemu-server itself refuses a mapping it cannot resolve).
    stub(t.path(), "hostname", "echo pve3");
    stub(t.path(), "qm", "printf 'hostpci0: mapping=wlan\\n'");
    let r = run(&proxmox_hook(), &["101", "pre-start"], "", t.path(), "");
    assert!(r.status.success());
    assert_eq!(r.calls, "");
    assert_eq!(
        r.warnings(),
        [
            "user.warning qcom-reset-hook[101]: pre-start: hostpci0: mapping wlan has no device on node pve3 (pvesh get /cluster/mapping/pci/wlan): nothing reset"
        ]
    );
}

/// pre-start refuses the VM only on a definite verdict that the card is not usable (exit 3): one
/// line on stderr (the task log) naming the device and its verdict, exit 1, which makes
/// qemu-server abort the start. post-stop never fails.
#[test]
fn proxmox_pre_start_refuses_a_card_that_is_not_clean() {
    let t = tempfile::tempdir().unwrap();
    stub(
        t.path(),
        "qm",
        "printf 'hostpci0: 0000:03:00.0,pcie=1\\nhostpci1: 0000:04:00.0,pcie=1\\n'",
    );
    let only_03 = format!("[ \"$2\" = 0000:03:00.0 ] || exit 0\n{NOT_CLEAN}");
    let r = run(
        &proxmox_hook(),
        &["101", "pre-start"],
        "",
        t.path(),
        &only_03,
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert_eq!(
        r.calls, "reset 0000:03:00.0 --only-targets\nreset 0000:04:00.0 --only-targets\n",
        "every card is reset, also after a refusal"
    );
    assert_eq!(
        r.stderr,
        "qcom-reset: not starting VM 101: 0000:03:00.0 is not clean: link-down (config space reads all-ones (rev ff): the link is down)\n"
    );
    assert_eq!(r.stdout, "");
    assert!(r.log.contains(
        "user.err qcom-reset-hook[101]: pre-start: not starting VM 101: 0000:03:00.0 is not clean: link-down"
    ));

    let r = run(
        &proxmox_hook(),
        &["101", "post-stop"],
        "",
        t.path(),
        &only_03,
    );
    assert!(r.status.success(), "post-stop never fails");
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
    assert_eq!(
        r.warnings(),
        [
            "user.warning qcom-reset-hook[101]: post-stop: 0000:03:00.0: not clean after the reset (exit 3): link-down (config space reads all-ones (rev ff): the link is down)"
        ]
    );
}

/// Anything but a definite verdict lets the VM start: refused (the card still on its host driver
/// at pre-start: qemu-server binds it to vfio-pci only after the hookscript; DPC), busy (lock or a
/// holder), an error, not root, a usage error. One warning line names the device and the reason;
/// nothing goes to stdout or stderr.
#[test]
fn proxmox_pre_start_lets_the_vm_start_unless_the_verdict_is_definite() {
    let t = tempfile::tempdir().unwrap();
    stub(t.path(), "qm", "printf 'hostpci0: 0000:03:00.0,pcie=1\\n'");
    for (then, reason) in [
        (
            "echo '0000:03:00.0 is bound to ath11k_pci, not vfio-pci: unbind it or use --force' >&2; exit 4",
            "refused, nothing written (exit 4): 0000:03:00.0 is bound to ath11k_pci, not vfio-pci: unbind it or use --force",
        ),
        (
            "echo 'another qcom-reset holds /run/qcom-reset/0000:03:00.0.lock' >&2; exit 75",
            "busy, nothing written (exit 75): another qcom-reset holds /run/qcom-reset/0000:03:00.0.lock",
        ),
        (
            "echo '0000:03:00.0: the reset failed: no such device' >&2; exit 1",
            "error (exit 1): 0000:03:00.0: the reset failed: no such device",
        ),
        (
            "echo 'run as root' >&2; exit 77",
            "not run as root (exit 77)",
        ),
        (
            "echo '/etc/qcom-reset/config.toml: unknown key retries' >&2; exit 78",
            "invalid configuration (exit 78): /etc/qcom-reset/config.toml: unknown key retries",
        ),
        (
            "echo \"error: unexpected argument '--only-targets'\" >&2; exit 2",
            "usage error (exit 2; is qcom-reset older than this hook?): error: unexpected argument '--only-targets'",
        ),
        ("exit 127", "could not run QCOM_RESET (exit 127)"),
    ] {
        let r = run(&proxmox_hook(), &["101", "pre-start"], "", t.path(), then);
        assert!(r.status.success(), "{reason}: {}", r.stderr);
        assert_eq!(r.calls, "reset 0000:03:00.0 --only-targets\n");
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{reason}");
        let reason = reason.replace(
            "QCOM_RESET",
            &t.path().join("qcom-reset").display().to_string(),
        );
        assert_eq!(
            r.warnings(),
            [format!(
                "user.warning qcom-reset-hook[101]: pre-start: 0000:03:00.0: not reset, starting VM 101 anyway: {reason}"
            )],
            "{}",
            r.log
        );
    }
}

/// The strictness setting: QCOM_RESET_PRESTART in /etc/default/qcom-reset, shipped commented
/// (default refuse-not-clean) as a conffile; `never` lets a VM start with a card that is not
/// clean, with one warning.
#[test]
fn proxmox_pre_start_strictness_comes_from_etc_default() {
    let shipped = std::fs::read_to_string(dist("default/qcom-reset")).unwrap();
    assert!(shipped.contains("#QCOM_RESET_PRESTART=refuse-not-clean\n"));
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"["../dist/default/qcom-reset", "etc/default/qcom-reset", "644"],"#),
        "the .deb ships it (cargo-deb makes files under /etc conffiles)"
    );

    let t = tempfile::tempdir().unwrap();
    stub(t.path(), "qm", "printf 'hostpci0: 0000:03:00.0,pcie=1\\n'");
    let default = t.path().join("default");
    for (contents, refused) in [
        (shipped.clone(), true),
        (format!("{shipped}QCOM_RESET_PRESTART=never\n"), false),
        (
            "QCOM_RESET_PRESTART=\"never\"  # trust the guest\n".into(),
            false,
        ),
        ("QCOM_RESET_PRESTART=refuse-not-clean\n".into(), true),
    ] {
        std::fs::write(&default, &contents).unwrap();
        let r = run(
            &proxmox_hook(),
            &["101", "pre-start"],
            "",
            t.path(),
            NOT_CLEAN,
        );
        assert_eq!(r.status.success(), !refused, "{contents}");
        if !refused {
            assert_eq!(r.stderr, "");
            assert_eq!(
                r.warnings(),
                [
                    "user.warning qcom-reset-hook[101]: pre-start: 0000:03:00.0 is not clean: link-down (config space reads all-ones (rev ff): the link is down); starting VM 101 anyway (QCOM_RESET_PRESTART=never)"
                ]
            );
        }
    }
    // A value it does not know: said once, and the safe default applies.
    std::fs::write(&default, "QCOM_RESET_PRESTART=sometimes\n").unwrap();
    let r = run(
        &proxmox_hook(),
        &["101", "pre-start"],
        "",
        t.path(),
        NOT_CLEAN,
    );
    assert_eq!(r.status.code(), Some(1));
    assert!(r.warnings()[0].contains("QCOM_RESET_PRESTART=sometimes in "));
}

/// A mapping with several entries for this node names alternatives (qemu-server takes the first
/// free one): the VM is refused only if every alternative has a card that is not clean.
#[test]
fn proxmox_pre_start_with_mapping_alternatives_refuses_only_if_none_is_clean() {
    let t = tempfile::tempdir().unwrap();
    stub(t.path(), "qm", "printf 'hostpci0: mapping=wlan,pcie=1\\n'");
    stub(
        t.path(),
        "pvesh",
        "echo '{\"map\":[\"node=pve1,path=0000:03:00.0\",\"node=pve1,path=0000:04:00.0\"]}'",
    );
    let r = run(
        &proxmox_hook(),
        &["101", "pre-start"],
        "",
        t.path(),
        &format!("[ \"$2\" = 0000:03:00.0 ] || exit 0\n{NOT_CLEAN}"),
    );
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(r.stderr, "");
    assert_eq!(
        r.warnings(),
        [
            "user.warning qcom-reset-hook[101]: pre-start: 0000:03:00.0 is not clean: link-down (config space reads all-ones (rev ff): the link is down); starting VM 101: hostpci0 has another alternative on this node"
        ]
    );

    let r = run(
        &proxmox_hook(),
        &["101", "pre-start"],
        "",
        t.path(),
        NOT_CLEAN,
    );
    assert_eq!(r.status.code(), Some(1));
    assert_eq!(
        r.stderr,
        "qcom-reset: not starting VM 101: 0000:03:00.0 is not clean: link-down (config space reads all-ones (rev ff): the link is down); \
         0000:04:00.0 is not clean: link-down (config space reads all-ones (rev ff): the link is down)\n"
    );
}

/// A maintainer script with cargo-deb's #DEBHELPER# left empty and absolute paths moved under
/// `root`, run with `args` and the stand-ins in `dir`; returns (status, stdout+stderr).
fn maintainer_script(name: &str, root: &Path, paths: &[&str], args: &[&str]) -> (bool, String) {
    let mut text = std::fs::read_to_string(dist(&format!("debian/{name}"))).unwrap();
    assert!(text.contains("#DEBHELPER#\n"), "cargo-deb fills it in");
    text = text.replace("#DEBHELPER#\n", "");
    for p in paths {
        text = text.replace(p, &format!("{}{p}", root.display()));
    }
    let script = root.join(name);
    std::fs::write(&script, text).unwrap();
    let out = Command::new("sh")
        .arg(&script)
        .args(args)
        .env_remove("DPKG_ROOT")
        .env(
            "PATH",
            format!("{}:{}", root.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// libvirt looks for hooks only at daemon start or reload (virHookInitialize): postinst reloads
/// libvirtd and virtqemud where systemd runs (through deb-systemd-invoke, which honours
/// policy-rc.d, as lintian asks), says so in one line, and never fails for it (no
/// libvirt on Proxmox, a chroot without systemd).
#[test]
fn postinst_reloads_libvirt_so_it_sees_the_hook() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    stub(
        root,
        "deb-systemd-invoke",
        &format!("echo \"$@\" >> {}/systemctl.calls\nexit 5", root.display()),
    );
    let (ok, out) = maintainer_script("postinst", root, &["/run/systemd/system"], &["configure"]);
    assert!(ok, "{out}");
    assert_eq!(out, "", "no systemd, nothing to reload");
    assert!(!root.join("systemctl.calls").exists());

    std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
    let (ok, out) = maintainer_script("postinst", root, &["/run/systemd/system"], &["configure"]);
    assert!(ok, "a failed reload does not fail the install: {out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("libvirtd/virtqemud"), "{out}");
    assert_eq!(
        std::fs::read_to_string(root.join("systemctl.calls")).unwrap(),
        "try-reload-or-restart libvirtd.service\ntry-reload-or-restart virtqemud.service\n"
    );
}

/// Purge removes the agent's state and logs; remove keeps them.
#[test]
fn postrm_purge_removes_state_and_logs() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let dirs = ["/var/lib/qcom-reset", "/var/log/qcom-reset"];
    for d in dirs {
        let d = root.join(d.trim_start_matches('/'));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("x"), "").unwrap();
    }
    let (ok, out) = maintainer_script("postrm", root, &dirs, &["remove"]);
    assert!(ok, "{out}");
    assert!(
        dirs.iter()
            .all(|d| root.join(d.trim_start_matches('/')).join("x").exists())
    );
    let (ok, out) = maintainer_script("postrm", root, &dirs, &["purge"]);
    assert!(ok, "{out}");
    assert!(
        dirs.iter()
            .all(|d| !root.join(d.trim_start_matches('/')).exists())
    );
}

/// Issue 20: a removed package leaves no textfile behind (node_exporter would re-export its last
/// values and its alerts would fire forever); only a `*.prom` file named by the configuration
/// or a drop-in goes.
#[test]
fn postrm_remove_deletes_the_metrics_textfile() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let etc = root.join("etc/qcom-reset");
    std::fs::create_dir_all(etc.join("conf.d")).unwrap();
    let prom = root.join("textfiles/qcom_reset.prom");
    let other = root.join("textfiles/passwd");
    std::fs::create_dir_all(prom.parent().unwrap()).unwrap();
    std::fs::write(&prom, "x").unwrap();
    std::fs::write(&other, "x").unwrap();
    std::fs::write(etc.join("config.toml"), "metrics_port = 0\n").unwrap();
    std::fs::write(
        etc.join("conf.d/50-metrics.toml"),
        format!(
            "metrics_textfile = \"{}\"\n# metrics_textfile = \"{}\"\n",
            prom.display(),
            other.display()
        ),
    )
    .unwrap();
    let (ok, out) = maintainer_script("postrm", root, &["/etc/qcom-reset"], &["remove"]);
    assert!(ok, "{out}");
    assert!(!prom.exists(), "the textfile is removed");
    assert!(other.exists(), "a commented line is not read");
    // A configuration naming something that is not a textfile removes nothing.
    std::fs::write(
        etc.join("conf.d/50-metrics.toml"),
        format!("metrics_textfile = \"{}\"\n", other.display()),
    )
    .unwrap();
    let (ok, out) = maintainer_script("postrm", root, &["/etc/qcom-reset"], &["remove"]);
    assert!(ok, "{out}");
    assert!(other.exists());
    // No configuration at all: nothing to do, no failure.
    std::fs::remove_dir_all(&etc).unwrap();
    let (ok, out) = maintainer_script("postrm", root, &["/etc/qcom-reset"], &["remove"]);
    assert!(ok && out.is_empty(), "{out}");
}
