//! The `qcom-reset` binary as an administrator meets it: one clear line per refusal, a dry run
//! that prints every operation, and `check`/`trace` naming this machine's real limits.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use qcom_reset::bdf::Bdf;

fn qcom(h: Option<&FakeHost>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qcom-reset"));
    if let Some(h) = h {
        c.arg("--sysfs-root").arg(&h.host.sysfs.root);
        c.arg("--proc-root").arg(&h.host.proc_root);
        c.arg("--dev-vfio").arg(&h.host.dev_vfio);
        c.arg("--run-dir").arg(&h.host.run_dir);
    }
    c.args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_device_table() {
    let (out, _) = text(&qcom(None, &["--help"]));
    for d in qcom_reset::device::DEVICES {
        assert!(
            out.contains(d.name) && out.contains(&format!("{:04x}:{:04x}", d.vendor, d.device)),
            "{out}"
        );
    }
}

#[test]
fn bad_input_gets_one_clear_line() {
    let h = FakeHost::new();
    h.add(FakeDevice::foreign("0000:05:00.0"));
    h.add(FakeDevice::default());
    h.hold(4242, "qemu-system-x86", "/dev/vfio/12");
    for (args, code, want) in [
        (vec!["reset", "03:00"], 2, "malformed PCI address \"03:00\""),
        // Issue 20: refusals (4) and a busy card (75) have their own codes, apart from
        // errors (1), a card left not clean (3) and clap's usage errors (2).
        (
            vec!["reset", "0000:05:00.0"],
            4,
            "device 8086:1533 is not a qcom-reset target",
        ),
        (
            vec!["reset", "0000:07:00.0"],
            4,
            "no PCI device 0000:07:00.0",
        ),
        (
            vec!["reset", "0000:03:00.0"],
            75,
            "is held by pid 4242 (qemu-system-x86) through /dev/vfio/12",
        ),
        (
            vec!["reset", "0000:03:00.0", "--profile", "bogus"],
            4,
            "unknown profile \"bogus\"",
        ),
        (vec!["status", "0000:05:00.0"], 4, "not a qcom-reset target"),
    ] {
        let o = qcom(Some(&h), &args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        if code != 2 {
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
            assert!(!err.contains("panicked"));
        }
    }
}

#[test]
fn dry_run_prints_the_plan() {
    let h = FakeHost::new();
    h.add(FakeDevice {
        bdf: "0000:04:00.0",
        device: 0x0308,
        ..Default::default()
    });
    let o = qcom(Some(&h), &["reset", "0000:04:00.0", "--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("dry run: 0000:04:00.0 as sdx65 (modem)"),
        "{out}"
    );
    assert!(
        out.contains("write 0x00b0 <- 0x00000001") && out.contains("delay 2000 ms"),
        "{out}"
    );
    assert_eq!(h.read("0000:04:00.0", "power/control"), "auto");
    let o = qcom(Some(&h), &["reset", "0000:04:00.0", "--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["method"], "dry-run");
    assert_eq!(v["ops"][1]["op"], "write");
}

/// Whether this kernel lets us attach kprobes, and whether it refuses fentry.
fn machine_facts() -> (bool, Option<bool>) {
    let kprobes = Path::new(qcom_reset::probes::loader::KPROBE_PMU).exists();
    if !rustix::process::geteuid().is_root() {
        return (kprobes, None);
    }
    let mut p = qcom_reset::probes::Probes::open(&Default::default()).unwrap();
    let refused = p
        .verify(qcom_reset_ebpf::Flavour::Fentry)
        .iter()
        .any(|(_, r)| {
            r.as_ref()
                .is_err_and(|e| qcom_reset::probes::loader::is_eperm(e))
        });
    (kprobes, Some(refused))
}

#[test]
fn check_names_the_real_reasons() {
    let (kprobes, fentry_refused) = machine_facts();
    let o = qcom(None, &["check"]);
    let (out, _) = text(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("PASS btf") || l.starts_with("FAIL btf")),
        "{out}"
    );
    if kprobes {
        assert!(out.contains("PASS kprobes"), "{out}");
    } else {
        assert!(
            out.contains("FAIL kprobes") && out.contains("CONFIG_KPROBES"),
            "{out}"
        );
    }
    match fentry_refused {
        Some(true) => assert!(
            out.contains("FAIL fentry") && out.contains("EPERM"),
            "{out}"
        ),
        Some(false) => assert!(out.contains("PASS fentry"), "{out}"),
        None => assert!(out.contains("FAIL root"), "{out}"),
    }
    let can_trace = fentry_refused.is_some() && (kprobes || fentry_refused == Some(false));
    assert_eq!(o.status.success(), can_trace, "{out}");
    let o = qcom(None, &["check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.as_array().unwrap().iter().any(|c| c["name"] == "kprobes"));
}

#[test]
fn trace_stops_with_the_explanation_when_it_cannot_attach() {
    let (kprobes, fentry_refused) = machine_facts();
    if kprobes || fentry_refused != Some(true) {
        eprintln!(
            "skipped: this host can attach probes (or is not root); the VM lab covers tracing"
        );
        return;
    }
    let o = qcom(None, &["trace"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(69), "EX_UNAVAILABLE: {err}");
    assert!(err.contains("cannot trace"), "{err}");
    assert!(
        err.contains("FAIL kprobes") && err.contains("FAIL attach"),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_line_and_column() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("bad.toml");
    std::fs::write(&p, "debounce_ms = 10\nmax_attempts = \"three\"\n").unwrap();
    let o = qcom(None, &["run", "--config", p.to_str().unwrap()]);
    let (_, err) = text(&o);
    // EX_CONFIG, which the unit's RestartPreventExitStatus= does not restart.
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(err.contains("bad.toml:2:16:"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // `--check-config` (for configuration management): the same answer, and 0 for a good file,
    // without root and without starting anything.
    let o = qcom(
        None,
        &["run", "--check-config", "--config", p.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(78), "{}", text(&o).1);
    std::fs::write(&p, "debounce_ms = 10\n").unwrap();
    let o = qcom(
        None,
        &["run", "--check-config", "--config", p.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert!(text(&o).0.contains("valid"));
    let o = qcom(
        None,
        &[
            "run",
            "--config",
            t.path().join("missing.toml").to_str().unwrap(),
        ],
    );
    assert!(
        text(&o).1.contains("cannot read"),
        "an explicit config must exist"
    );
}

#[test]
fn hooks_only_targets_is_a_no_op_for_other_devices() {
    let h = FakeHost::new();
    h.add(FakeDevice::foreign("0000:05:00.0"));
    let o = qcom(Some(&h), &["reset", "0000:05:00.0", "--only-targets"]);
    assert!(o.status.success());
    assert!(text(&o).0.contains("not a target"));
    let o = qcom(
        Some(&h),
        &["reset", "0000:05:00.0", "--only-targets", "--json"],
    );
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bdf"], "0000:05:00.0");
    assert!(
        v["nothing_to_do"]
            .as_str()
            .unwrap()
            .contains("not a target")
    );
}

/// The reset after a power cycle honours the experimental opt-in like `reset` does, and a
/// power cycle whose reset would be refused is refused before the power is cut.
#[test]
fn power_cycle_needs_the_experimental_opt_in_its_reset_needs() {
    let h = FakeHost::new();
    h.add_below_port(
        "0000:00:1c.0",
        FakeDevice {
            device: 0x0304, // sdx24: experimental
            ..FakeDevice::modem("0000:03:00.0")
        },
    );
    let cycle = |more: &[&str]| {
        let dry_run = [
            "power-cycle",
            "0000:03:00.0",
            "--method",
            "d3cold",
            "--dry-run",
        ];
        qcom(
            Some(&h),
            &[&dry_run[..], &["--config", "/dev/null"], more].concat(),
        )
    };
    let o = cycle(&[]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4), "refused: {err}");
    assert!(err.contains("experimental profile sdx24; opt in"), "{err}");
    let o = cycle(&["--experimental"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("would power-cycle"), "{out}");
}

/// Issue 20: with `--json`, an error is JSON on stdout too (automation reads stdout), with the
/// exit code and its name; stderr keeps the one line.
#[test]
fn json_errors_are_json() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    h.hold(4242, "qemu-system-x86", "/dev/vfio/12");
    let o = qcom(Some(&h), &["reset", "0000:03:00.0", "--json"]);
    assert_eq!(o.status.code(), Some(75));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["exit"], 75);
    assert_eq!(v["kind"], "busy");
    assert!(
        v["error"].as_str().unwrap().contains("is held by pid 4242"),
        "{v}"
    );
    assert_eq!(text(&o).1.trim().lines().count(), 1);
}

/// Issue 20: the man pages and `--help` document every exit status.
#[test]
fn help_documents_the_exit_statuses() {
    let (out, _) = text(&qcom(None, &["--help"]));
    // The words themselves, not only what the code says they are: the hooks and docs rely on them.
    for line in [
        "Exit status:",
        "  3  the reset ran and the card is not clean afterwards",
        "  4  refused, nothing written",
        " 75  busy, nothing written",
        " 78  the configuration is invalid or unreadable",
        "  128+N  interrupted by signal N",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    for e in qcom_reset::exit::Exit::ALL {
        assert!(
            out.contains(&format!("{:>3}  {}", e.code(), e.meaning())),
            "{}: {out}",
            e.code()
        );
    }
    let (out, _) = text(&qcom(None, &["health", "--help"]));
    assert!(out.contains("node-problem-detector"), "{out}");
}

/// The running agent's published status, as `run` writes it.
fn publish(h: &FakeHost, status: &qcom_reset::agent::status::AgentStatus) {
    status.save(&h.host.run_dir).unwrap();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An agent (pid 777 in the fake /proc) that is alive, ready and sees everything.
fn agent_status(h: &FakeHost) -> qcom_reset::agent::status::AgentStatus {
    std::fs::create_dir_all(h.host.proc_root.join("777")).unwrap();
    let mut s = qcom_reset::agent::status::AgentStatus {
        pid: 777,
        ready: true,
        heartbeat_ms: now_ms(),
        ..Default::default()
    };
    s.probes.insert("vfio_pci_core_disable".into(), true);
    s
}

fn card(health: qcom_reset::device::verdict::Health) -> qcom_reset::agent::status::Card {
    qcom_reset::agent::status::Card {
        health: Some(health),
        detail: "x".into(),
        ..Default::default()
    }
}

/// Issue 20: `health` follows node-problem-detector's plugin contract (0 ok, 1 problem,
/// 2 unknown, one line) and is read-only: no lock file, nothing written, no root needed.
#[test]
fn health_answers_from_the_agents_status_and_writes_nothing() {
    use qcom_reset::device::verdict::Health;
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let wlan: Bdf = "0000:03:00.0".parse().unwrap();
    let health = |args: &[&str]| {
        let o = qcom(Some(&h), &[&["health"], args].concat());
        let (out, err) = text(&o);
        assert_eq!(out.trim().lines().count(), 1, "{out}{err}");
        (o.status.code().unwrap(), out)
    };
    let (code, out) = health(&[]);
    assert_eq!(code, 2, "no agent: unknown: {out}");
    assert!(out.contains("agent not running"), "{out}");

    let mut s = agent_status(&h);
    s.cards.insert(wlan, card(Health::Clean));
    publish(&h, &s);
    let (code, out) = health(&[]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: agent running; 0000:03:00.0 wcn6855: clean")
    );

    s.cards.insert(wlan, card(Health::Crashed));
    publish(&h, &s);
    let (code, out) = health(&["0000:03:00.0"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("crashed"), "{out}");
    let mut gave_up = card(Health::Crashed);
    gave_up.gave_up = true;
    s.cards.insert(wlan, gave_up);
    publish(&h, &s);
    let (code, out) = health(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the agent gave up after failed resets (crashed)"),
        "{out}"
    );
    // No verdict yet, or none since a VM opened the card: unknown, saying which.
    s.cards.insert(wlan, Default::default());
    publish(&h, &s);
    let (code, out) = health(&[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not checked by the agent yet"), "{out}");
    s.cards.get_mut(&wlan).unwrap().detail = "opened by qemu-system-x86; not verified since".into();
    publish(&h, &s);
    let (code, out) = health(&[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("opened by qemu-system-x86; not verified since"),
        "{out}"
    );

    // A VM using the card: fine, whatever the last verdict was, and its config space is not
    // read even when it would say "off the link" (the link drop of a reset in the guest).
    h.hold(4242, "qemu-system-x86", "/dev/vfio/12");
    let dev = h.host.sysfs.root.join("0000:03:00.0");
    std::fs::write(dev.join("config"), [0xffu8; 256]).unwrap();
    std::fs::write(dev.join("power/runtime_status"), "active\n").unwrap();
    let (code, out) = health(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("in use by pid 4242"), "{out}");
    h.unhold(4242);
    std::fs::write(dev.join("config"), [0u8; 256]).unwrap();

    s.cards.insert(wlan, card(Health::Clean));
    s.probes.insert("pci_reset_function".into(), false);
    publish(&h, &s);
    let (code, out) = health(&[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("agent blind: not attached: pci_reset_function"),
        "{out}"
    );

    s.probes.insert("pci_reset_function".into(), true);
    s.heartbeat_ms = now_ms() - 120_000;
    publish(&h, &s);
    let (code, out) = health(&[]);
    assert_eq!(code, 2, "a dead agent's last word is not trusted: {out}");
    assert!(out.contains("agent gone"), "{out}");

    // Off the link, seen live: a problem even with the agent gone. Only an awake card's config
    // space is read.
    std::fs::write(dev.join("config"), [0xffu8; 256]).unwrap();
    std::fs::write(dev.join("power/runtime_status"), "suspended\n").unwrap();
    assert_eq!(health(&[]).0, 2, "a suspended card is not read");
    std::fs::write(dev.join("power/runtime_status"), "active\n").unwrap();
    let (code, out) = health(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("off the link"), "{out}");

    let o = qcom(Some(&h), &["health", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["condition"], "problem");
    assert_eq!(v["agent"]["state"], "stale");

    // Read-only: the run directory holds only what the agent wrote.
    let names: Vec<String> = std::fs::read_dir(&h.host.run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["agent.json"]);
    assert_eq!(h.read("0000:03:00.0", "power/control"), "auto");

    // A card its host driver owns (libvirt's managed hostdevs between VMs) is fine: nothing the
    // agent could have checked.
    let h = FakeHost::new();
    h.add(FakeDevice {
        driver: Some("ath11k_pci"),
        ..FakeDevice::default()
    });
    let s = agent_status(&h);
    publish(&h, &s);
    let o = qcom(Some(&h), &["health"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("owned by the host driver ath11k_pci"), "{out}");
}
