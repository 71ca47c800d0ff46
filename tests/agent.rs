//! The agent end to end without root: synthetic probe items in, the real engine against the
//! firmware simulator, actions out.
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use qcom_reset::agent::config::Config;
use qcom_reset::agent::metrics::Metrics;
use qcom_reset::agent::{Action, Agent, Trigger};
use qcom_reset::bdf::Bdf;
use qcom_reset::devices::Family;
use qcom_reset::lock::DeviceLock;
use qcom_reset::probes::Item;
use qcom_reset::probes::events::{Kind, TraceEvent};
use qcom_reset::sim::{Faults, SimDevice};
use tokio::sync::{broadcast, mpsc, oneshot};

const WLAN: &str = "0000:03:00.0";
const MODEM: &str = "0000:04:00.0";

fn event(kind: Kind, bdf: &str, device: u16, ret: i32, left_unreset: Option<bool>) -> Item {
    Item::Event(TraceEvent {
        schema: 1,
        kind,
        flavour: "kprobe",
        function: "vfio_pci_core_disable",
        bdf: bdf.into(),
        vendor: "17cb".into(),
        device: format!("{device:04x}"),
        ret,
        errno: None,
        duration_ns: 1000,
        ktime_ns: 1,
        pid: 100,
        tgid: 100,
        comm: "qemu-system-x86".into(),
        attempts: Some(vec![]),
        attempts_seen: Some(0),
        needs_reset: left_unreset,
        left_unreset,
        left_unreset_from: Some("needs_reset"),
    })
}

fn release(bdf: &str, device: u16) -> Item {
    event(Kind::Release, bdf, device, 0, Some(true))
}

struct Running {
    tx: mpsc::Sender<Item>,
    actions: broadcast::Receiver<Action>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn next(&mut self) -> Action {
        tokio::time::timeout(Duration::from_secs(20), self.actions.recv())
            .await
            .expect("an action within 20 s")
            .unwrap()
    }

    async fn quiet_for(&mut self, d: Duration) {
        if let Ok(a) = tokio::time::timeout(d, self.actions.recv()).await {
            panic!(
                "unexpected action: {:?}",
                a.map(|a| (a.bdf, a.result, a.detail))
            );
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.done.await.unwrap();
    }
}

fn test_config(h: &FakeHost) -> Config {
    Config {
        journal: h.root().join("log/events.jsonl"),
        state_file: h.root().join("state/state.json"),
        kill_switch: h.root().join("disable"),
        debounce_ms: 50,
        backoff_ms: 100,
        cooldown_s: 3,
        max_attempts: 3,
        rescan: false,
        ..Config::default()
    }
}

fn start(h: &FakeHost, cfg: Config, sims: &[(&str, SimDevice)]) -> Running {
    start_on(h.host.clone(), cfg, sims)
}

fn start_on(host: qcom_reset::engine::Host, cfg: Config, sims: &[(&str, SimDevice)]) -> Running {
    let map: HashMap<Bdf, SimDevice> = sims.iter().map(|(b, s)| (bdf(b), s.clone())).collect();
    let open: qcom_reset::agent::OpenFn = Arc::new(move |d| Ok(Box::new(map[&d.bdf].clone())));
    let agent = Agent::new(cfg, host, open, Arc::new(Metrics::default())).unwrap();
    let actions = agent.subscribe();
    let (tx, rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let done = tokio::spawn(agent.run(rx, async move {
        let _ = stop_rx.await;
    }));
    Running {
        tx,
        actions,
        stop: Some(stop_tx),
        done,
    }
}

fn two_device_host() -> FakeHost {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    h.add(FakeDevice::modem(MODEM));
    h
}

#[tokio::test]
async fn a_failed_release_is_reset_to_a_healthy_verdict() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    let sent = Instant::now();
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.bdf.to_string().as_str(), a.trigger, a.result.as_str()),
        (WLAN, Trigger::Release, "healthy"),
        "{}",
        a.detail
    );
    let report = a.report.unwrap();
    assert_eq!(report.ops.len(), 15, "the full WLAN sequence ran");
    assert!(
        a.latency_ms.unwrap() < 1000.0,
        "a release acts at once, not after a poll"
    );
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert_eq!(wlan.with_model(|m| m.resets), 1);
    r.stop().await;
    let journal = std::fs::read_to_string(h.root().join("log/events.jsonl")).unwrap();
    let kinds: Vec<String> = journal
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["event", "action"]);
}

#[tokio::test]
async fn a_held_device_is_never_written_and_the_agent_says_why() {
    let h = two_device_host();
    h.hold(555, "qemu-system-x86", "/dev/vfio/12");
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    r.tx.send(event(Kind::Attempt, WLAN, 0x1103, -25, None))
        .await
        .unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::FailedReset, "skipped")
    );
    assert!(
        a.detail.contains("held by pid 555 (qemu-system-x86)"),
        "{}",
        a.detail
    );
    assert_eq!(wlan.with_model(|m| m.writes.len()), 0);
    r.stop().await;
}

#[tokio::test]
async fn kill_switch_and_per_device_disable_stop_all_action() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let modem = sim(Family::Modem, Faults::default());
    let mut cfg = test_config(&h);
    cfg.devices.insert(
        MODEM.into(),
        qcom_reset::agent::config::DeviceConfig {
            enabled: Some(false),
            ..Default::default()
        },
    );
    std::fs::write(h.root().join("disable"), "").unwrap();
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone()), (MODEM, modem.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!(a.result, "skipped");
    assert!(a.detail.contains("kill switch"), "{}", a.detail);
    std::fs::remove_file(h.root().join("disable")).unwrap();
    r.tx.send(release(MODEM, 0x0308)).await.unwrap();
    let a = r.next().await;
    assert!(
        a.detail.contains("disabled in the configuration"),
        "{}",
        a.detail
    );
    assert_eq!(
        wlan.with_model(|m| m.writes.len()) + modem.with_model(|m| m.writes.len()),
        0
    );
    r.stop().await;
}

#[tokio::test]
async fn failures_back_off_then_give_up_and_a_restart_remembers() {
    let h = two_device_host();
    let stuck = sim(
        Family::Wlan,
        Faults {
            stuck_syserr: true,
            ..Default::default()
        },
    );
    let mut r = start(&h, test_config(&h), &[(WLAN, stuck.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let mut times = Vec::new();
    for _ in 0..3 {
        let a = r.next().await;
        assert_eq!(a.result, "syserr", "{}", a.detail);
        times.push(Instant::now());
    }
    let a = r.next().await;
    assert_eq!(a.result, "skipped");
    assert!(
        a.detail.contains("gave up after 3 failed attempts"),
        "{}",
        a.detail
    );
    assert!(
        times[1] - times[0] >= Duration::from_millis(100),
        "first backoff"
    );
    assert!(
        times[2] - times[1] >= Duration::from_millis(200),
        "doubled backoff"
    );
    r.quiet_for(Duration::from_millis(400)).await;
    assert_eq!(stuck.with_model(|m| m.resets), 3, "no retry storm");
    r.stop().await;

    // A new agent with the same state file neither forgets nor repeats.
    let mut r = start(&h, test_config(&h), &[(WLAN, stuck.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert!(
        a.result == "skipped" && a.detail.contains("cool-down"),
        "{}: {}",
        a.result,
        a.detail
    );
    assert_eq!(stuck.with_model(|m| m.resets), 3);
    // After the cool-down (3 s) a new event gets a fresh round of attempts.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    assert_eq!(r.next().await.result, "syserr");
    r.stop().await;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.root().join("state/state.json")).unwrap()).unwrap();
    assert!(state["devices"][WLAN]["total_attempts"].as_u64().unwrap() >= 4);
}

#[tokio::test]
async fn duplicate_events_are_debounced_into_one_reset() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    r.tx.send(event(Kind::Attempt, WLAN, 0x1103, -25, None))
        .await
        .unwrap();
    r.tx.send(event(Kind::Attempt, WLAN, 0x1103, -25, None))
        .await
        .unwrap();
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::Release, "healthy"),
        "the release wins the debounce"
    );
    r.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(wlan.with_model(|m| m.resets), 1);
    r.stop().await;
}

#[tokio::test]
async fn devices_are_handled_in_parallel_and_serialized_per_device() {
    let h = two_device_host();
    let mut host = h.host.clone();
    host.lock_wait = Duration::from_secs(5);
    let wlan = sim(Family::Wlan, Faults::default());
    let modem = sim(Family::Modem, Faults::default());
    // Another qcom-reset (a hook) holds the WLAN card's lock for a while.
    let held = DeviceLock::acquire(&h.host.run_dir, bdf(WLAN), Duration::ZERO).unwrap();
    let mut r = start_on(
        host,
        test_config(&h),
        &[(WLAN, wlan.clone()), (MODEM, modem.clone())],
    );
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    r.tx.send(release(MODEM, 0x0308)).await.unwrap();
    let first = r.next().await;
    assert_eq!(
        (first.bdf.to_string().as_str(), first.result.as_str()),
        (MODEM, "healthy"),
        "the modem is not blocked by the WLAN card"
    );
    assert_eq!(
        wlan.with_model(|m| m.writes.len()),
        0,
        "WLAN waits for its lock"
    );
    drop(held);
    let second = r.next().await;
    assert_eq!(
        (second.bdf.to_string().as_str(), second.result.as_str()),
        (WLAN, "healthy")
    );
    r.stop().await;
}

#[tokio::test]
async fn observe_only_writes_nothing() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut cfg = test_config(&h);
    cfg.observe_only = true;
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!(a.result, "dry-run");
    assert!(
        a.detail.contains("would run wlan-soc-global-reset/v12"),
        "{}",
        a.detail
    );
    assert_eq!(wlan.with_model(|m| m.writes.len()), 0);
    r.stop().await;
}

#[tokio::test]
async fn startup_rescan_resets_only_unhealthy_targets() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let modem = sim(Family::Modem, Faults::default());
    // Bring the modem to health first, as if it had been reset before the agent started.
    let m2 = modem.clone();
    qcom_reset::engine::reset(
        &h.host,
        &qcom_reset::engine::Request::new(bdf(MODEM)),
        &mut move |_| Ok(Box::new(m2.clone())),
        "sim",
    )
    .unwrap();
    let mut cfg = test_config(&h);
    cfg.rescan = true;
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone()), (MODEM, modem.clone())]);
    let mut got: Vec<(String, String, Trigger)> = Vec::new();
    for _ in 0..2 {
        let a = r.next().await;
        got.push((a.bdf.to_string(), a.result, a.trigger));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (WLAN.into(), "healthy".into(), Trigger::Rescan),
            (MODEM.into(), "nothing-to-do".into(), Trigger::Rescan)
        ]
    );
    assert_eq!(
        modem.with_model(|m| m.resets),
        1,
        "the healthy modem was not reset again"
    );
    // A release where the kernel's reset worked only gets verified.
    r.tx.send(event(Kind::Release, MODEM, 0x0308, 0, Some(false)))
        .await
        .unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::KernelResetOk, "nothing-to-do")
    );
    r.stop().await;
}
