//! The agent end to end without root: synthetic probe items in, the real engine against the
//! firmware simulator, actions out.
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use qcom_reset::agent::metrics::Metrics;
use qcom_reset::agent::{Action, Agent, Trigger};
use qcom_reset::bdf::Bdf;
use qcom_reset::config::Config;
use qcom_reset::device::Family;
use qcom_reset::host::lock::DeviceLock;
use qcom_reset::probes::Item;
use qcom_reset::probes::events::{KernelReset, Kind, TraceEvent};
use qcom_reset::sim::{Faults, SimDevice, SimState};
use qcom_reset_ebpf::{Flavour, Func};
use tokio::sync::{broadcast, mpsc, oneshot};

const WLAN: &str = "0000:03:00.0";
const MODEM: &str = "0000:04:00.0";

fn event(kind: Kind, bdf: &str, device: u16, ret: i32, kernel: Option<KernelReset>) -> Item {
    Item::Event {
        event: trace_event(kind, Func::VfioPciCoreDisable, bdf, device, ret, kernel),
        taken_ns: 0,
    }
}

fn trace_event(
    kind: Kind,
    function: Func,
    bdf: &str,
    device: u16,
    ret: i32,
    kernel: Option<KernelReset>,
) -> TraceEvent {
    let left_unreset = kernel.map(|k| k != KernelReset::DeviceSpecific);
    TraceEvent {
        schema: 2,
        kind,
        flavour: Flavour::Kprobe,
        function,
        bdf: bdf.parse().expect("a test address"),
        vendor: 0x17cb,
        device,
        ret,
        errno: None,
        duration_ns: 1000,
        ktime_ns: 1,
        pid: 100,
        tgid: 100,
        comm: "qemu-system-x86".into(),
        attempts: Some(vec![]),
        attempts_seen: Some(0),
        // What a <=7.1 kernel reports after its bus reset: trusted by nobody.
        needs_reset: left_unreset.map(|_| false),
        kernel_reset: kernel,
        inside: None,
        left_unreset,
    }
}

/// A QCN9274 (17cb:1109), whose profile is experimental.
const QCN: &str = "0000:05:00.0";

fn qcn_host() -> FakeHost {
    let h = FakeHost::new();
    h.add(FakeDevice {
        bdf: QCN,
        device: 0x1109,
        group: Some("5"),
        ..Default::default()
    });
    h
}

/// A release of QEMU's ivshmem (1af4:1110): no Qualcomm card.
fn ivshmem_release(bdf: &str, kernel: KernelReset) -> Item {
    let mut event = trace_event(
        Kind::Release,
        Func::VfioPciCoreDisable,
        bdf,
        0x1110,
        0,
        Some(kernel),
    );
    event.vendor = 0x1af4;
    Item::Event { event, taken_ns: 0 }
}

/// A release after which only the kernel's (useless) bus reset ran.
fn release(bdf: &str, device: u16) -> Item {
    event(Kind::Release, bdf, device, 0, Some(KernelReset::Bus))
}

struct Running {
    tx: mpsc::Sender<Item>,
    reloader: qcom_reset::agent::Reloader,
    ready: tokio::sync::watch::Receiver<bool>,
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

fn start_on(host: qcom_reset::host::Host, cfg: Config, sims: &[(&str, SimDevice)]) -> Running {
    let map: HashMap<Bdf, SimDevice> = sims.iter().map(|(b, s)| (bdf(b), s.clone())).collect();
    let open: qcom_reset::agent::OpenFn = Arc::new(move |d, _| Ok(Box::new(map[&d.bdf].clone())));
    start_with(host, cfg, open)
}

fn start_with(
    host: qcom_reset::host::Host,
    cfg: Config,
    open: qcom_reset::agent::OpenFn,
) -> Running {
    start_metered(host, cfg, open, Arc::new(Metrics::default()))
}

fn start_metered(
    host: qcom_reset::host::Host,
    cfg: Config,
    open: qcom_reset::agent::OpenFn,
    metrics: Arc<Metrics>,
) -> Running {
    let agent = Agent::new(cfg, host, open, metrics).unwrap();
    let actions = agent.subscribe();
    let ready = agent.ready();
    let reloader = agent.reloader();
    let (tx, rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let done = tokio::spawn(agent.run(rx, async move {
        let _ = stop_rx.await;
    }));
    Running {
        tx,
        reloader,
        ready,
        actions,
        stop: Some(stop_tx),
        done,
    }
}

/// Resets `card` before the agent starts (by the kernel, or an earlier run): it starts clean.
fn reset_before(h: &FakeHost, at: &str, card: &SimDevice) {
    let c = card.clone();
    qcom_reset::session::reset(
        &h.host,
        &qcom_reset::session::Request::new(bdf(at)),
        &mut move |_, _| Ok(Box::new(c.clone())),
        "sim",
    )
    .unwrap();
}

fn two_device_host() -> FakeHost {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    h.add(FakeDevice::modem(MODEM));
    h
}

#[tokio::test]
async fn a_release_after_a_kernel_bus_reset_is_reset_to_clean() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    let sent = Instant::now();
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.bdf.to_string().as_str(), a.trigger, a.result.as_str()),
        (WLAN, Trigger::Release, "clean"),
        "{}",
        a.detail
    );
    let report = a.report.unwrap();
    // Seven steps to the link poll, 30 reads and 1 ms waits while the link is down, the read
    // that finds it back and the MHI reset's four.
    assert_eq!(report.ops.len(), 7 + 60 + 4, "the full WLAN sequence ran");
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
        (Trigger::ResetCall, "skipped")
    );
    assert!(
        a.detail.contains("held by pid 555 (qemu-system-x86)")
            && a.detail.contains("its release will trigger the reset"),
        "{}",
        a.detail
    );
    r.quiet_for(Duration::from_millis(400)).await;
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
        qcom_reset::config::DeviceConfig {
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

/// `systemctl reload` (SIGHUP): a device disabled in the new configuration is left alone from
/// the next event on; a bad configuration is refused whole and the running one stays; what was
/// set up at start (the journal here) waits for a restart.
#[tokio::test]
async fn a_reload_applies_to_the_next_event_and_a_bad_one_changes_nothing() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    let mut new = test_config(&h);
    new.devices.insert(
        WLAN.into(),
        qcom_reset::config::DeviceConfig {
            enabled: Some(false),
            ..Default::default()
        },
    );
    new.journal = h.root().join("elsewhere.jsonl");
    let done = r
        .reloader
        .reload(|| Ok(new))
        .expect("a good configuration applies");
    assert_eq!(done.applied, ["devices"]);
    assert_eq!(done.at_restart, ["journal"]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert!(
        a.detail.contains("disabled in the configuration"),
        "{}",
        a.detail
    );
    assert_eq!(wlan.with_model(|m| m.writes.len()), 0);
    assert!(
        r.reloader
            .reload(|| anyhow::bail!("line 3: bad value"))
            .is_none()
    );
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert!(
        a.detail.contains("disabled in the configuration"),
        "the refused reload kept it"
    );
    let back = r.reloader.reload(|| Ok(test_config(&h))).unwrap();
    assert_eq!(
        (back.applied.as_slice(), back.at_restart.len()),
        (["devices".to_string()].as_slice(), 0)
    );
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    assert_eq!(
        r.next().await.result,
        "clean",
        "enabled again by the third reload"
    );
    r.stop().await;
    assert!(!h.root().join("elsewhere.jsonl").exists());
}

/// A WLAN card whose SYSERR survives every reset: each attempt ends `crashed`.
fn stuck_wlan() -> SimDevice {
    sim(
        Family::Wlan,
        Faults {
            stuck_syserr: true,
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn failures_back_off_then_give_up_and_a_restart_remembers() {
    let h = two_device_host();
    let stuck = stuck_wlan();
    let mut r = start(&h, test_config(&h), &[(WLAN, stuck.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    // When each attempt ended, by the agent's clock (not when this test got to read it).
    let mut times = Vec::new();
    for _ in 0..3 {
        let a = r.next().await;
        assert_eq!(a.result, "crashed", "{}", a.detail);
        times.push(Duration::from_millis(a.ts_ms));
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
    assert_eq!(r.next().await.result, "crashed");
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
        (Trigger::Release, "clean"),
        "the release wins the debounce"
    );
    r.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(wlan.with_model(|m| m.resets), 1);
    r.stop().await;
}

/// VFIO's reset call at open, then the open itself returning `ret`.
async fn reset_call_then_open(r: &mut Running, ret: i32) {
    r.tx.send(event(Kind::Attempt, WLAN, 0x1103, 0, None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.tx.send(event(Kind::Open, WLAN, 0x1103, ret, None))
        .await
        .unwrap();
}

/// A VM's open makes reset calls of its own (VFIO's reset at open: a bus reset, or -ENOTTY),
/// and the open explains them: a VM that lives past the debounce window, then lets go, gets
/// one reset, from its release, not a second from the open's calls (the VM lab's `by-id` behind
/// the root port did both while the card's release was still under way).
#[tokio::test]
async fn the_reset_calls_of_an_open_are_answered_by_its_release_alone() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    reset_call_then_open(&mut r, 0).await;
    r.quiet_for(Duration::from_millis(200)).await;
    assert_eq!(
        wlan.with_model(|m| m.writes.len()),
        0,
        "the open's calls are its own"
    );
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Release, "clean"));
    r.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(wlan.with_model(|m| m.resets), 1);
    // A reset call with no open after it (a sysfs reset, a running VM's VFIO_DEVICE_RESET) is
    // still answered after the debounce.
    r.tx.send(event(Kind::Attempt, WLAN, 0x1103, 0, None))
        .await
        .unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::ResetCall, "clean")
    );
    r.stop().await;
}

/// QEMU resets the device right after opening it (the VM's first system reset): that reset
/// call, queued with the open's own, is the holder's and answered by its release, not by a
/// journal line of its own while the VM runs.
#[tokio::test]
async fn a_reset_call_queued_after_the_open_is_the_holders() {
    let h = two_device_host();
    h.hold(783, "qemu-system-x86", "/dev/vfio/12");
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    for (kind, ret) in [(Kind::Attempt, 0), (Kind::Open, 0), (Kind::Attempt, 0)] {
        r.tx.send(event(kind, WLAN, 0x1103, ret, None))
            .await
            .unwrap();
    }
    r.quiet_for(Duration::from_millis(600)).await;
    h.unhold(783);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Release, "clean"));
    r.stop().await;
}

/// On a kernel with the device-specific reset (7.4), every VFIO open resets the card itself:
/// that reset is the open's, the VM owns the card from then on, and only its release is
/// verified. `act_with_kernel_reset` makes that release reset with our sequence anyway.
#[tokio::test]
async fn an_open_explains_its_device_specific_reset_and_act_with_kernel_reset_still_acts() {
    for act in [false, true] {
        let h = two_device_host();
        let wlan = sim_in(Family::Wlan, SimState::Mission, Faults::default());
        let cfg = Config {
            act_with_kernel_reset: act,
            ..test_config(&h)
        };
        let mut r = start(&h, cfg, &[(WLAN, wlan.clone())]);
        // A clean card to start from.
        r.tx.send(release(WLAN, 0x1103)).await.unwrap();
        assert_eq!(r.next().await.result, "clean");
        let open_reset = trace_event(
            Kind::Attempt,
            Func::PciDevSpecificReset,
            WLAN,
            0x1103,
            0,
            None,
        );
        r.tx.send(Item::Event {
            event: open_reset,
            taken_ns: 0,
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.tx.send(event(Kind::Open, WLAN, 0x1103, 0, None))
            .await
            .unwrap();
        r.quiet_for(Duration::from_millis(200)).await;
        r.tx.send(event(
            Kind::Release,
            WLAN,
            0x1103,
            0,
            Some(KernelReset::DeviceSpecific),
        ))
        .await
        .unwrap();
        let a = r.next().await;
        let want = if act { "clean" } else { "nothing-to-do" };
        assert_eq!(
            (a.trigger, a.result.as_str()),
            (Trigger::KernelReset, want),
            "act_with_kernel_reset = {act}: {}",
            a.detail
        );
        r.quiet_for(Duration::from_millis(200)).await;
        assert_eq!(
            wlan.with_model(|m| m.resets),
            1 + u32::from(act),
            "act_with_kernel_reset = {act}"
        );
        r.stop().await;
    }
}

/// A VM that lets go within the debounce window of its open's reset call (a QEMU that failed to
/// start): the open explained the call, and the release that follows at once is still answered.
#[tokio::test]
async fn a_release_right_after_an_open_is_still_answered() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    reset_call_then_open(&mut r, 0).await;
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Release, "clean"));
    assert_eq!(wlan.with_model(|m| m.resets), 1);
    r.stop().await;
}

/// The open's reset call, marked by the probes as made inside it, is the open's however long
/// the open takes after it (the devspecific VM lab's `fault`: 900 ms of config init on a card
/// reading all-ones, past the debounce window); one that failed is answered by the open.
#[tokio::test]
async fn a_reset_call_inside_an_open_is_the_opens_however_long_it_takes() {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    let mut call = trace_event(
        Kind::Attempt,
        Func::PciTryResetFunction,
        WLAN,
        0x1103,
        -110,
        None,
    );
    call.inside = Some(Kind::Open);
    r.tx.send(Item::Event {
        event: call,
        taken_ns: 0,
    })
    .await
    .unwrap();
    r.quiet_for(Duration::from_millis(400)).await;
    r.tx.send(event(Kind::Open, WLAN, 0x1103, 0, None))
        .await
        .unwrap();
    r.quiet_for(Duration::from_millis(200)).await;
    assert_eq!(wlan.with_model(|m| m.writes.len()), 0, "the open's own");
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Release, "clean"));
    let mut failed = trace_event(
        Kind::Open,
        Func::VfioPciCoreEnable,
        WLAN,
        0x1103,
        -11,
        Some(KernelReset::None),
    );
    failed.attempts_seen = Some(1);
    // The opener that failed still holds the group a moment: the open is answered once it
    // lets go, not dropped as "its release will trigger the reset" (no release will come).
    h.hold(784, "qemu-system-x86", "/dev/vfio/12");
    r.tx.send(Item::Event {
        event: failed,
        taken_ns: 0,
    })
    .await
    .unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::FailedOpen, "skipped")
    );
    assert!(a.detail.contains("waiting up to"), "{}", a.detail);
    h.unhold(784);
    let a = r.next().await;
    // Verified: the release before left it clean, and a failed open's reset calls changed
    // nothing the verdict would see.
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::FailedOpen, "nothing-to-do"),
        "{}",
        a.detail
    );
    r.stop().await;
}

#[tokio::test]
async fn a_failed_open_explains_no_reset_call() {
    // vfio_pci_core_enable can fail after its own reset call (-EAGAIN from
    // pci_try_reset_function, a config init on a card reading all-ones): no release follows,
    // so the reset call is still the agent's to answer.
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, wlan.clone())]);
    reset_call_then_open(&mut r, -11).await;
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::ResetCall, "clean")
    );
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
        (MODEM, "clean"),
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
        (WLAN, "clean")
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

/// Observe-only writes nothing at all, not even to read: the rescan says why it did not read.
#[tokio::test]
async fn observe_only_rescan_writes_nothing_and_says_why() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let mut cfg = test_config(&h);
    cfg.observe_only = true;
    cfg.rescan = true;
    let mut r = start(&h, cfg, &[(WLAN, card.clone())]);
    let a = r.next().await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Rescan, "skipped"));
    assert!(
        a.detail.contains("observe-only writes nothing"),
        "{}",
        a.detail
    );
    assert_eq!(h.read(WLAN, "power/control"), "auto");
    assert_eq!(
        card.with_model(|m| (m.cfg.command(), m.writes.len())),
        (0x0400, 0)
    );
    r.stop().await;
}

/// Two cards and a start-up rescan: the WLAN as a killed VM left it, the modem reset before the
/// agent started (healthy).
fn rescan_host() -> (FakeHost, SimDevice, SimDevice, Config) {
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let modem = sim(Family::Modem, Faults::default());
    reset_before(&h, MODEM, &modem);
    let mut cfg = test_config(&h);
    cfg.rescan = true;
    (h, wlan, modem, cfg)
}

#[tokio::test]
async fn startup_rescan_resets_only_unclean_targets() {
    let (h, wlan, modem, cfg) = rescan_host();
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone()), (MODEM, modem.clone())]);
    let mut got: Vec<(String, String, Trigger)> = Vec::new();
    for _ in 0..2 {
        let a = r.next().await;
        got.push((a.bdf.to_string(), a.result.to_string(), a.trigger));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (WLAN.into(), "clean".into(), Trigger::Rescan),
            (MODEM.into(), "nothing-to-do".into(), Trigger::Rescan)
        ]
    );
    assert_eq!(
        modem.with_model(|m| m.resets),
        1,
        "the clean modem was not reset again"
    );
    // A release where the kernel's reset worked only gets verified.
    r.tx.send(event(
        Kind::Release,
        MODEM,
        0x0308,
        0,
        Some(KernelReset::DeviceSpecific),
    ))
    .await
    .unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::KernelReset, "nothing-to-do")
    );
    r.stop().await;
}

/// A weak trigger's check and the reset its verdict calls for are one session: the card is
/// opened (owned, its record written, its lock taken) once, so nothing can take it between the
/// verdict and the reset, and a clean card is opened once and left alone.
#[tokio::test]
async fn a_weak_trigger_checks_and_resets_in_one_session() {
    let (h, wlan, modem, cfg) = rescan_host();
    let opened: Arc<std::sync::Mutex<Vec<Bdf>>> = Arc::default();
    let sims: HashMap<Bdf, SimDevice> =
        [(bdf(WLAN), wlan.clone()), (bdf(MODEM), modem.clone())].into();
    let seen = opened.clone();
    let open: qcom_reset::agent::OpenFn = Arc::new(move |d, _| {
        seen.lock().unwrap().push(d.bdf);
        Ok(Box::new(sims[&d.bdf].clone()))
    });
    let mut r = start_with(h.host.clone(), cfg, open);
    let (a, b) = (r.next().await, r.next().await);
    let modem_said = if a.bdf == bdf(MODEM) {
        &a.detail
    } else {
        &b.detail
    };
    assert!(modem_said.starts_with("clean: "), "{modem_said}");
    let mut got = [(a.bdf, a.result.to_string()), (b.bdf, b.result.to_string())];
    got.sort();
    assert_eq!(
        got,
        [
            (bdf(WLAN), "clean".to_string()),
            (bdf(MODEM), "nothing-to-do".to_string())
        ]
    );
    let count = |at: &str| {
        opened
            .lock()
            .unwrap()
            .iter()
            .filter(|b| **b == bdf(at))
            .count()
    };
    assert_eq!(count(WLAN), 1, "checked and reset in one session");
    assert_eq!(count(MODEM), 1, "checked once, left alone");
    assert_eq!(wlan.with_model(|m| m.resets), 1);
    r.stop().await;
}

/// `act_with_kernel_reset` is about the kernel's resets only: a start-up rescan still verifies
/// first and leaves a clean card alone.
#[tokio::test]
async fn act_with_kernel_reset_leaves_the_rescan_a_verification() {
    let h = two_device_host();
    let modem = sim(Family::Modem, Faults::default());
    reset_before(&h, MODEM, &modem);
    let mut cfg = test_config(&h);
    cfg.rescan = true;
    cfg.act_with_kernel_reset = true;
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, cfg, &[(WLAN, wlan), (MODEM, modem.clone())]);
    let (a, b) = (r.next().await, r.next().await);
    let a = if a.bdf == bdf(MODEM) { a } else { b };
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::Rescan, "nothing-to-do"),
        "{}",
        a.detail
    );
    assert_eq!(modem.with_model(|m| m.resets), 1, "not reset again");
    r.stop().await;
}

/// The decision table: which probe event makes the agent act, verify or ignore.
#[test]
fn only_a_device_specific_reset_is_trusted() {
    use KernelReset::*;
    let rel = |k| {
        trace_event(
            Kind::Release,
            Func::VfioPciCoreDisable,
            WLAN,
            0x1103,
            0,
            Some(k),
        )
    };
    assert_eq!(Trigger::of_event(&rel(Bus)), Some(Trigger::Release));
    assert_eq!(Trigger::of_event(&rel(None)), Some(Trigger::Release));
    assert_eq!(
        Trigger::of_event(&rel(Unidentified)),
        Some(Trigger::Release)
    );
    assert_eq!(
        Trigger::of_event(&rel(DeviceSpecific)),
        Some(Trigger::KernelReset)
    );
    let call = |f, ret| trace_event(Kind::Attempt, f, WLAN, 0x1103, ret, Option::None);
    assert_eq!(
        Trigger::of_event(&call(Func::PciDevSpecificReset, 0)),
        Some(Trigger::KernelResetCall)
    );
    for (f, ret) in [
        (Func::PciDevSpecificReset, -110),
        (Func::PciResetFunction, 0),
        (Func::PciResetFunction, -25),
        (Func::PciResetBusFunction, 0),
        (Func::PciResetBus, 0),
    ] {
        assert_eq!(
            Trigger::of_event(&call(f, ret)),
            Some(Trigger::ResetCall),
            "{} = {ret}",
            f.symbol()
        );
    }
    let open = trace_event(
        Kind::Open,
        Func::VfioPciCoreEnable,
        WLAN,
        0x1103,
        0,
        Some(Bus),
    );
    assert_eq!(
        Trigger::of_event(&open),
        Option::None,
        "the device is now held"
    );
    // A reset call inside a VFIO open or release: the bracket's own event answers it.
    for bracket in [Kind::Open, Kind::Release] {
        let mut inside = call(Func::PciTryResetFunction, 0);
        inside.inside = Some(bracket);
        assert_eq!(Trigger::of_event(&inside), Option::None, "{bracket:?}");
    }
    // An open that failed after its reset calls: no release will follow, the open answers.
    let failed = |kernel, seen| {
        let mut o = trace_event(
            Kind::Open,
            Func::VfioPciCoreEnable,
            WLAN,
            0x1103,
            -11,
            Some(kernel),
        );
        o.attempts_seen = Some(seen);
        o
    };
    assert_eq!(
        Trigger::of_event(&failed(Bus, 2)),
        Some(Trigger::FailedOpen)
    );
    assert_eq!(
        Trigger::of_event(&failed(DeviceSpecific, 1)),
        Some(Trigger::FailedOpen)
    );
    assert_eq!(Trigger::of_event(&failed(None, 0)), Option::None);
}

/// The real-host case: a VM killed on a <=7.1 host, the kernel SBRs the card and reports
/// success, the firmware keeps the dead VM's session. The agent resets it anyway.
#[tokio::test]
async fn a_killed_vm_session_survives_the_kernel_bus_reset_and_is_reset() {
    let h = two_device_host();
    for (bdf, family, device) in [(WLAN, Family::Wlan, 0x1103), (MODEM, Family::Modem, 0x0308)] {
        let card = sim_in(family, SimState::Mission, Faults::default());
        let mut r = start(&h, test_config(&h), &[(bdf, card.clone())]);
        r.tx.send(release(bdf, device)).await.unwrap();
        let a = r.next().await;
        assert_eq!(
            (a.trigger, a.result.as_str()),
            (Trigger::Release, "clean"),
            "{bdf}: {}",
            a.detail
        );
        assert_eq!(card.with_model(|m| m.resets), 1, "{bdf}");
        r.stop().await;
    }
}

/// A kernel device-specific reset that left the session running (or whose writes were lost)
/// is verified, found stale, and reset; a reset that changes nothing is never called clean.
#[tokio::test]
async fn a_kernel_reset_is_verified_and_a_no_op_reset_is_not_clean() {
    let h = two_device_host();
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, card.clone())]);
    r.tx.send(event(
        Kind::Release,
        WLAN,
        0x1103,
        0,
        Some(KernelReset::DeviceSpecific),
    ))
    .await
    .unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::KernelReset, "clean"),
        "{}",
        a.detail
    );
    assert_eq!(
        card.with_model(|m| m.resets),
        1,
        "stale after the kernel: reset"
    );
    r.stop().await;

    let deaf = sim_in(
        Family::Wlan,
        SimState::Mission,
        Faults {
            writes_ignored: true,
            ..Default::default()
        },
    );
    let mut cfg = test_config(&h);
    cfg.max_attempts = 1;
    cfg.state_file = h.root().join("state/deaf.json");
    let mut r = start(&h, cfg, &[(WLAN, deaf.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!(a.result, "stale", "{}", a.detail);
    r.stop().await;
}

/// A graceful QEMU shutdown closes the device but keeps the group a while: the release is
/// retried when the holder goes, and reset exactly once.
#[tokio::test]
async fn a_release_while_held_waits_for_the_holder_then_resets_once() {
    let h = two_device_host();
    h.hold(777, "qemu-system-x86", "/dev/vfio/12");
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, card.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    assert_eq!(a.result, "skipped");
    assert!(
        a.detail.contains("held by pid 777") && a.detail.contains("waiting up to 60 s"),
        "{}",
        a.detail
    );
    // QEMU's own reset call while shutting down is answered by the reset that follows.
    r.tx.send(event(Kind::Attempt, WLAN, 0x1103, 0, None))
        .await
        .unwrap();
    r.quiet_for(Duration::from_millis(600)).await;
    assert_eq!(card.with_model(|m| m.writes.len()), 0, "nothing while held");
    h.unhold(777);
    let a = r.next().await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Release, "clean"));
    r.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(card.with_model(|m| m.resets), 1);
    r.stop().await;
}

/// The 7.4 regime's graceful stop: the kernel resets the card as the device closes, QEMU keeps
/// the group a while longer. The verification waits for the holder, then runs; a stale card is
/// reset once, a clean one is left alone. A reset call while a VM holds the card (its own
/// VFIO_DEVICE_RESET) is left to that VM's release, without a wait.
#[tokio::test]
async fn a_kernel_reset_held_by_a_closing_vm_is_verified_when_the_holder_goes() {
    let h = two_device_host();
    for (kernel_took, want) in [(false, "clean"), (true, "nothing-to-do")] {
        let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
        if kernel_took {
            reset_before(&h, WLAN, &card);
        }
        h.hold(781, "qemu-system-x86", "/dev/vfio/12");
        let mut cfg = test_config(&h);
        cfg.state_file = h.root().join(format!("state/{want}.json"));
        let mut r = start(&h, cfg, &[(WLAN, card.clone())]);
        let kernel = |kind| event(kind, WLAN, 0x1103, 0, Some(KernelReset::DeviceSpecific));
        r.tx.send(kernel(Kind::Release)).await.unwrap();
        let a = r.next().await;
        assert_eq!(
            (a.trigger, a.result.as_str()),
            (Trigger::KernelReset, "skipped")
        );
        assert!(
            a.detail.contains("not checked")
                && a.detail.contains("held by pid 781")
                && a.detail.contains("waiting up to 60 s"),
            "{}",
            a.detail
        );
        let before = card.with_model(|m| m.writes.len());
        r.quiet_for(Duration::from_millis(600)).await;
        assert_eq!(
            card.with_model(|m| m.writes.len()),
            before,
            "nothing while held"
        );
        h.unhold(781);
        let a = r.next().await;
        assert_eq!(
            (a.trigger, a.result.as_str()),
            (Trigger::KernelReset, want),
            "{}",
            a.detail
        );
        r.quiet_for(Duration::from_millis(300)).await;
        assert_eq!(card.with_model(|m| m.resets), 1, "{want}: one reset in all");
        r.stop().await;
    }
    h.hold(782, "qemu-system-x86", "/dev/vfio/12");
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, card.clone())]);
    let call = trace_event(
        Kind::Attempt,
        Func::PciDevSpecificReset,
        WLAN,
        0x1103,
        0,
        None,
    );
    r.tx.send(Item::Event {
        event: call,
        taken_ns: 0,
    })
    .await
    .unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::KernelResetCall, "skipped")
    );
    assert!(
        a.detail.contains("its release will trigger the reset"),
        "{}",
        a.detail
    );
    r.quiet_for(Duration::from_millis(600)).await;
    h.unhold(782);
    r.quiet_for(Duration::from_millis(600)).await;
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        0,
        "left to the release"
    );
    r.stop().await;
}

/// libvirt's managed reattach takes the card mid-reset: the action says `taken`, the episode
/// ends there (no retry against the new driver, no failure counted against the card).
#[tokio::test]
async fn a_card_taken_mid_reset_ends_the_episode() {
    let h = two_device_host();
    let take = bind_host_driver(h.root(), WLAN, "ath11k_pci");
    let (a, failures) = reset_with_take(&h, Box::new(take)).await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Release, "taken"));
    assert!(
        a.detail.contains("taken by driver ath11k_pci"),
        "{}",
        a.detail
    );
    assert_eq!(failures, 0, "not a failure of the card");
}

/// A card that leaves the bus mid-reset is a failed attempt, not a handover: a reset that
/// drops it off the bus every time (pciehp removes it, vfio-pci's `ids=` rebinds it, the bind
/// resets it again) must back off and give up.
#[tokio::test]
async fn a_card_gone_mid_reset_is_a_failure() {
    let h = two_device_host();
    let dir = h.host.sysfs.root.join(WLAN);
    let gone = move || {
        let real = std::fs::canonicalize(&dir).unwrap();
        std::fs::remove_dir_all(&real).unwrap();
        if real != dir {
            std::fs::remove_file(&dir).unwrap();
        }
    };
    let (a, failures) = reset_with_take(&h, Box::new(gone)).await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Release, "error"));
    assert!(a.detail.contains("left the bus"), "{}", a.detail);
    assert_eq!(failures, 1);
}

/// A release answered on a card that `take` takes after the first BAR write: the action, and
/// the failures the state file then holds for it.
async fn reset_with_take(h: &FakeHost, take: Box<dyn FnOnce() + Send>) -> (Action, u64) {
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let take = std::sync::Mutex::new(Some(take));
    let inner = card.clone();
    let open: qcom_reset::agent::OpenFn = Arc::new(move |_, _| {
        Ok(Box::new(HandOverCard {
            inner: inner.clone(),
            take: take.lock().unwrap().take(),
            taken: Arc::new(std::sync::Mutex::new(false)),
            config_writes_after: Arc::new(std::sync::Mutex::new(0)),
        }))
    });
    let mut cfg = test_config(h);
    cfg.max_attempts = 1;
    let state = cfg.state_file.clone();
    let mut r = start_with(h.host.clone(), cfg, open);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let a = r.next().await;
    // Given up after one failure, or done: either way no further attempt reaches the card.
    if let Ok(next) = tokio::time::timeout(Duration::from_millis(800), r.actions.recv()).await {
        let next = next.unwrap();
        assert_eq!(next.result, "skipped", "{}", next.detail);
    }
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        1,
        "nothing after the take"
    );
    r.stop().await;
    let kept: serde_json::Value = std::fs::read(&state)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    (a, kept["devices"][WLAN]["failures"].as_u64().unwrap_or(0))
}

/// The same for a device outside the table, made a target by its configured profile (as in the
/// VM lab): the wait must not depend on the table.
#[tokio::test]
async fn a_held_profile_device_is_reset_when_its_holder_goes() {
    const IVSHMEM: &str = "0000:00:03.0";
    let h = FakeHost::new();
    h.add(FakeDevice {
        bdf: IVSHMEM,
        vendor: 0x1af4,
        device: 0x1110,
        group: Some("3"),
        ..Default::default()
    });
    h.hold(779, "qemu-system-x86", "/dev/vfio/3");
    let card = SimDevice::new(qcom_reset::sim::Model::new(
        Family::Wlan,
        0x1af4,
        0x1110,
        SimState::Mission,
        Faults::default(),
    ));
    let mut cfg = test_config(&h);
    cfg.devices.insert(
        IVSHMEM.into(),
        qcom_reset::config::DeviceConfig {
            profile: Some("wcn6855".into()),
            ..Default::default()
        },
    );
    let mut r = start(&h, cfg, &[(IVSHMEM, card.clone())]);
    r.tx.send(ivshmem_release(IVSHMEM, KernelReset::Bus))
        .await
        .unwrap();
    assert_eq!(r.next().await.result, "skipped");
    h.unhold(779);
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::Release, "clean"),
        "{}",
        a.detail
    );
    r.stop().await;
}

#[tokio::test]
async fn a_holder_that_never_goes_ends_in_one_clear_skip() {
    let h = two_device_host();
    h.hold(778, "qemu-system-x86", "/dev/vfio/12");
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let mut cfg = test_config(&h);
    cfg.held_wait_s = 1;
    let mut r = start(&h, cfg, &[(WLAN, card.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    assert!(r.next().await.detail.contains("waiting up to 1 s"));
    let a = r.next().await;
    assert_eq!(a.result, "skipped");
    assert!(a.detail.contains("still held after 1 s"), "{}", a.detail);
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
    r.stop().await;
}

/// A modem bound to vfio-pci is reset after the settle time, before any VM opens it; one that a
/// VM opened meanwhile (libvirt binds and starts QEMU at once) is left to its release.
#[tokio::test]
async fn a_bind_to_vfio_pci_resets_after_the_settle_time_unless_held() {
    let h = two_device_host();
    let modem = sim_in(Family::Modem, SimState::Stuck, Faults::default());
    let mut cfg = test_config(&h);
    cfg.bind_settle_ms = 300;
    cfg.bind_reset = qcom_reset::config::BindReset::Always;
    let mut r = start(&h, cfg.clone(), &[(MODEM, modem.clone())]);
    r.tx.send(Item::Bound(bdf(MODEM))).await.unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.trigger, a.result.as_str()),
        (Trigger::Bind, "clean"),
        "{}",
        a.detail
    );
    let waited = a.latency_ms.unwrap();
    assert!((300.0..1000.0).contains(&waited), "settled {waited} ms");
    // A bind of a device that is no target does nothing.
    h.add(FakeDevice::foreign("0000:05:00.0"));
    r.tx.send(Item::Bound(bdf("0000:05:00.0"))).await.unwrap();
    r.quiet_for(Duration::from_millis(500)).await;
    r.stop().await;

    let wlan = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone())]);
    r.tx.send(Item::Bound(bdf(WLAN))).await.unwrap();
    h.hold(901, "qemu-system-x86", "/dev/vfio/12");
    let a = r.next().await;
    assert_eq!(a.result, "skipped");
    assert!(
        a.detail.contains("its release will trigger the reset"),
        "{}",
        a.detail
    );
    assert_eq!(
        wlan.with_model(|m| m.writes.len()),
        0,
        "the starting VM is not raced"
    );
    r.stop().await;
}

/// `rescan_resets`: "unclean" resets a stale card, "unhealthy-only" leaves it (and resets a
/// crashed one), "never" only reports.
#[tokio::test]
async fn rescan_resets_follows_the_configuration() {
    use qcom_reset::config::RescanResets;
    for (policy, state, want, resets) in [
        (RescanResets::Unclean, SimState::Mission, "clean", 1),
        (
            RescanResets::UnhealthyOnly,
            SimState::Mission,
            "nothing-to-do",
            0,
        ),
        (RescanResets::UnhealthyOnly, SimState::Crashed, "clean", 1),
        (RescanResets::Never, SimState::Crashed, "nothing-to-do", 0),
    ] {
        let h = FakeHost::new();
        h.add(FakeDevice::default());
        let card = sim_in(Family::Wlan, state, Faults::default());
        let mut cfg = test_config(&h);
        cfg.rescan = true;
        cfg.rescan_resets = policy;
        let mut r = start(&h, cfg, &[(WLAN, card.clone())]);
        let a = r.next().await;
        assert_eq!(
            (a.trigger, a.result.as_str()),
            (Trigger::Rescan, want),
            "{policy:?} {state:?}: {}",
            a.detail
        );
        assert!(
            want != "nothing-to-do" || a.detail.contains("left alone"),
            "a verdict the policy leaves alone says so: {}",
            a.detail
        );
        assert_eq!(
            card.with_model(|m| m.resets),
            resets,
            "{policy:?} {state:?}"
        );
        r.stop().await;
    }
}

/// A qcom-reset killed mid-sequence left power/control on and decoding set: the next agent
/// puts them back at start, before any rescan.
#[tokio::test]
async fn the_agent_recovers_a_killed_session_at_start() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    leave_killed_session(&h, WLAN, &card, vec![]);
    let r = start(&h, test_config(&h), &[(WLAN, card.clone())]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.host.run_dir.join(format!("{WLAN}.json")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.read(WLAN, "power/control"), "auto");
    assert_eq!(
        card.with_model(|m| (m.cfg.command(), m.writes.len())),
        (0x0400, 0)
    );
    assert!(!h.host.run_dir.join(format!("{WLAN}.json")).exists());
    r.stop().await;
}

#[tokio::test]
async fn an_experimental_device_is_reset_only_when_opted_in() {
    let h = qcn_host();
    let card = SimDevice::new(qcom_reset::sim::Model::new(
        Family::Wlan,
        0x17cb,
        0x1109,
        SimState::Mission,
        Faults::default(),
    ));
    let mut r = start(&h, test_config(&h), &[(QCN, card.clone())]);
    r.tx.send(release(QCN, 0x1109)).await.unwrap();
    r.quiet_for(Duration::from_millis(800)).await;
    assert_eq!(
        card.with_model(|m| m.writes.len()),
        0,
        "not opted in: nothing written"
    );
    r.stop().await;

    let cfg = Config {
        experimental: qcom_reset::device::OptIn(vec!["qcn9274".into()]),
        ..test_config(&h)
    };
    let mut r = start(&h, cfg, &[(QCN, card.clone())]);
    r.tx.send(release(QCN, 0x1109)).await.unwrap();
    let a = r.next().await;
    assert_eq!(
        (a.result.as_str(), a.trigger),
        ("clean", Trigger::Release),
        "{}",
        a.detail
    );
    assert_eq!(a.report.unwrap().profile, "qcn9274");
    r.stop().await;
}

/// Issue 17 item 12: a failed event stream ends the forwarder, which drops its sender (the
/// agent's loop then ends, and its watchdog feed with it) and reports the failure for a
/// non-zero exit.
#[tokio::test]
async fn a_broken_event_stream_ends_the_agent_and_is_reported() {
    struct Broken;
    impl qcom_reset::agent::ItemSource for Broken {
        async fn next(&mut self) -> anyhow::Result<Item> {
            anyhow::bail!("ring buffer fd closed")
        }
    }
    let (tx, mut rx) = mpsc::channel(4);
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let failed = tokio::time::timeout(
        Duration::from_secs(1),
        qcom_reset::agent::forward(&mut Broken, tx, stop_rx),
    )
    .await
    .expect("within a second");
    assert!(failed);
    assert!(rx.recv().await.is_none(), "the agent's channel is closed");
    // The agent itself returns once its items end.
    let h = two_device_host();
    let agent = Agent::new(
        test_config(&h),
        h.host.clone(),
        Arc::new(|_, _| unreachable!()),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel(4);
    drop(tx);
    tokio::time::timeout(
        Duration::from_secs(1),
        agent.run(rx, std::future::pending()),
    )
    .await
    .expect("the agent stops when its event stream is gone");
}

/// Issue 17 item 13: a qcom-reset process's own VFIO release (a hook's `reset` with VFIO
/// access) is not a VM letting go: no second reset holds the group as the VM starts.
#[tokio::test]
async fn our_own_vfio_release_is_not_answered() {
    let h = two_device_host();
    let card = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, card.clone())]);
    let mut e = trace_event(
        Kind::Release,
        Func::VfioPciCoreDisable,
        WLAN,
        0x1103,
        0,
        Some(KernelReset::Bus),
    );
    e.comm = qcom_reset::host::holders::OWN_COMM.into();
    r.tx.send(Item::Event {
        event: e,
        taken_ns: 0,
    })
    .await
    .unwrap();
    r.quiet_for(Duration::from_millis(600)).await;
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
    r.stop().await;
}

/// Issue 17 item 14: stopping while a release waits for its holder ends the wait at once and
/// says so; no reset starts after the stop.
#[tokio::test]
async fn shutdown_ends_a_held_wait_and_says_so() {
    let h = two_device_host();
    h.hold(777, "qemu-system-x86", "/dev/vfio/12");
    let card = sim_in(Family::Wlan, SimState::Mission, Faults::default());
    let mut r = start(&h, test_config(&h), &[(WLAN, card.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    assert!(r.next().await.detail.contains("waiting up to 60 s"));
    r.stop.take().unwrap().send(()).unwrap();
    let a = r.next().await;
    assert_eq!(a.result, "skipped");
    assert!(a.detail.contains("shutting down"), "{}", a.detail);
    tokio::time::timeout(Duration::from_secs(2), r.done)
        .await
        .expect("stops at once")
        .unwrap();
    assert_eq!(card.with_model(|m| m.writes.len()), 0);
}

/// Issue 20: READY=1 waits for the start-up checks and resets. The unit is ordered before
/// libvirtd and pve-guests, and a start-up session owns the card's VFIO group: guests that
/// autostart on READY would get EBUSY. Before the fix READY came before the rescan started.
/// The published status says the same for `health` and `systemctl status`, and goes on stop.
#[tokio::test]
async fn ready_comes_after_the_start_up_resets_and_the_status_is_published() {
    use qcom_reset::agent::status::AgentStatus;
    let h = two_device_host();
    let wlan = sim(Family::Wlan, Faults::default());
    let modem = sim(Family::Modem, Faults::default());
    let mut cfg = test_config(&h);
    cfg.rescan = true;
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone()), (MODEM, modem.clone())]);
    assert!(!*r.ready.borrow(), "not ready before the start-up checks");
    tokio::time::timeout(Duration::from_secs(30), r.ready.wait_for(|r| *r))
        .await
        .expect("ready within 30 s")
        .unwrap();
    // Both start-up resets were done (and announced) before READY.
    let mut done: Vec<(String, String)> = (0..2)
        .map(|_| {
            let a = r.actions.try_recv().expect("acted before ready");
            (a.bdf.to_string(), a.result.to_string())
        })
        .collect();
    done.sort();
    assert_eq!(
        done,
        [
            (WLAN.into(), "clean".into()),
            (MODEM.into(), "clean".into())
        ]
    );
    let st = AgentStatus::load(&h.host.run_dir)
        .unwrap()
        .expect("published");
    assert!(st.ready);
    assert_eq!(st.pid, std::process::id());
    for b in [WLAN, MODEM] {
        let c = &st.cards[&bdf(b)];
        assert_eq!(
            c.health,
            Some(qcom_reset::device::verdict::Health::Clean),
            "{b}"
        );
        assert!(!c.busy && !c.gave_up, "{b}: {c:?}");
    }
    assert_eq!(st.line(), format!("{WLAN} clean, {MODEM} clean"));
    r.stop().await;
    assert_eq!(
        AgentStatus::load(&h.host.run_dir).unwrap(),
        None,
        "a stopped agent publishes nothing"
    );
}

/// With no start-up rescan there is nothing to wait for: ready at once.
#[tokio::test]
async fn without_a_rescan_the_agent_is_ready_at_once() {
    let h = two_device_host();
    let mut r = start(&h, test_config(&h), &[]);
    tokio::time::timeout(Duration::from_secs(5), r.ready.wait_for(|r| *r))
        .await
        .expect("ready")
        .unwrap();
    r.stop().await;
}

/// Issue 20: `bind_reset = "never"` (what "auto" resolves to where the libvirt hook resets at
/// start/begin): a bind is not followed by a reset, so a VM whose QEMU opens the card late is
/// never raced by the agent's session.
#[tokio::test]
async fn no_bind_reset_where_it_is_off() {
    let h = two_device_host();
    let modem = sim_in(Family::Modem, SimState::Stuck, Faults::default());
    let mut cfg = test_config(&h);
    cfg.bind_settle_ms = 100;
    cfg.bind_reset = qcom_reset::config::BindReset::Never;
    let mut r = start(&h, cfg, &[(MODEM, modem.clone())]);
    r.tx.send(Item::Bound(bdf(MODEM))).await.unwrap();
    r.quiet_for(Duration::from_millis(800)).await;
    assert_eq!(modem.with_model(|m| m.resets), 0);
    r.stop().await;
}

/// Issue 20 review: READY waits for a start-up episode's end, not its first action: a failed
/// start-up reset is retried after its backoff, each attempt holding the card's group, and a
/// guest started between them could get EBUSY. The published status then says "gave up".
#[tokio::test]
async fn ready_waits_for_a_failing_start_up_reset_to_give_up() {
    use qcom_reset::agent::status::AgentStatus;
    let h = two_device_host();
    let stuck = stuck_wlan();
    let modem = sim(Family::Modem, Faults::default());
    reset_before(&h, MODEM, &modem);
    let mut cfg = test_config(&h);
    cfg.rescan = true;
    let mut r = start(&h, cfg, &[(WLAN, stuck.clone()), (MODEM, modem)]);
    tokio::time::timeout(Duration::from_secs(30), r.ready.wait_for(|r| *r))
        .await
        .expect("ready within 30 s")
        .unwrap();
    let mut results = Vec::new();
    while let Ok(a) = r.actions.try_recv() {
        if a.bdf == bdf(WLAN) {
            results.push(a.result);
        }
    }
    assert_eq!(results, ["crashed", "crashed", "crashed", "skipped"]);
    assert_eq!(stuck.with_model(|m| m.resets), 3);
    let st = AgentStatus::load(&h.host.run_dir).unwrap().unwrap();
    let c = &st.cards[&bdf(WLAN)];
    assert!(c.gave_up && !c.busy, "{c:?}");
    assert_eq!(c.health, Some(qcom_reset::device::verdict::Health::Crashed));
    r.stop().await;
}

/// Issue 20 review: a VM's open makes the last verdict stale in the published status (`health`
/// must not call a card a VM used "clean"); the release's verdict replaces it.
#[tokio::test]
async fn an_open_unpublishes_the_verdict_until_the_release_is_answered() {
    use qcom_reset::agent::status::AgentStatus;
    // One card: the start-up rescan's first verdict is this card's, whichever finishes first.
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let wlan = sim(Family::Wlan, Faults::default());
    let mut cfg = test_config(&h);
    cfg.rescan = true;
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone())]);
    assert_eq!(r.next().await.result, "clean");
    r.tx.send(event(Kind::Open, WLAN, 0x1103, 0, None))
        .await
        .unwrap();
    let card = || AgentStatus::load(&h.host.run_dir).unwrap().unwrap().cards[&bdf(WLAN)].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while card().health.is_some() {
        assert!(std::time::Instant::now() < deadline, "{:?}", card());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(card().detail.contains("not verified since"), "{:?}", card());
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    assert_eq!(r.next().await.result, "clean");
    assert_eq!(
        card().health,
        Some(qcom_reset::device::verdict::Health::Clean)
    );
    r.stop().await;
}

/// What monitoring reads follows every verdict and session: `busy` while a session runs, a
/// card that gave up shown so until a clean verdict clears it, `device_clean` 1 only for a
/// clean card, and each target described by `device_info` (mutants of `Shared::{verdict,
/// describe, busy}` survived without this).
#[tokio::test]
async fn metrics_and_status_follow_every_verdict_and_session() {
    use qcom_reset::agent::status::AgentStatus;
    let h = two_device_host();
    let stuck = stuck_wlan();
    let mut cfg = test_config(&h);
    (cfg.max_attempts, cfg.cooldown_s) = (1, 1);
    let card = stuck.clone();
    // Each open takes 300 ms, long enough to see the session as busy.
    let open: qcom_reset::agent::OpenFn = Arc::new(move |_, _| {
        std::thread::sleep(Duration::from_millis(300));
        Ok(Box::new(card.clone()))
    });
    let metrics = Arc::new(Metrics::default());
    let mut r = start_metered(h.host.clone(), cfg, open, metrics.clone());
    let status = || {
        AgentStatus::load(&h.host.run_dir)
            .unwrap()
            .and_then(|s| s.cards.get(&bdf(WLAN)).cloned())
    };
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !status().is_some_and(|c| c.busy) {
        assert!(
            std::time::Instant::now() < deadline,
            "never busy: {:?}",
            status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(r.next().await.result, "crashed");
    let text = metrics.render();
    assert!(
        text.contains("qcom_reset_device_clean{bdf=\"0000:03:00.0\"} 0"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("qcom_reset_device_info{")
                && l.contains("bdf=\"0000:03:00.0\"")
                && l.contains("profile=\"wcn6855\"")),
        "{text}"
    );
    let next = r.next().await;
    assert!(next.detail.contains("gave up"), "{}", next.detail);
    let c = status().unwrap();
    assert!(c.gave_up && !c.busy, "{c:?}");
    // The card recovers; after the cool-down a release resets it clean.
    stuck.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    assert_eq!(r.next().await.result, "clean");
    let c = status().unwrap();
    assert!(
        !c.gave_up && !c.busy,
        "a clean verdict clears gave_up: {c:?}"
    );
    assert!(
        metrics
            .render()
            .contains("qcom_reset_device_clean{bdf=\"0000:03:00.0\"} 1")
    );
    r.stop().await;
}

/// A release of an experimental card not opted in is logged as left alone (the operator's hint
/// to opt in), once; one of a device that is no target at all is not (mutants of the condition
/// in `Agent::write_out` survived without this).
#[tokio::test]
async fn a_release_left_alone_is_logged_only_for_an_experimental_card() {
    const OTHER: &str = "0000:00:03.0";
    // The test's runtime is this thread, and so is the agent's item loop that logs.
    capture_logs();
    let h = qcn_host();
    let mut r = start(&h, test_config(&h), &[]);
    r.tx.send(release(QCN, 0x1109)).await.unwrap();
    r.tx.send(ivshmem_release(OTHER, KernelReset::None))
        .await
        .unwrap();
    r.quiet_for(Duration::from_millis(500)).await;
    r.stop().await;
    let log = this_threads_log();
    let left: Vec<&str> = log.lines().filter(|l| l.contains("left alone")).collect();
    assert_eq!(left.len(), 1, "{log}");
    assert!(
        left[0].contains(QCN) && left[0].contains("experimental profile qcn9274 not opted in"),
        "{}",
        left[0]
    );
}

/// A session's start is written to the status file from the blocking pool, its end at once: an
/// episode that ends at once (the kill switch) must not leave the card published busy,
/// whichever of the two writes lands last (each writes the state as it is then).
#[tokio::test]
async fn an_episode_that_ends_at_once_leaves_the_card_not_busy() {
    use qcom_reset::agent::status::AgentStatus;
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let cfg = test_config(&h);
    std::fs::write(&cfg.kill_switch, "").unwrap();
    let wlan = sim(Family::Wlan, Faults::default());
    let mut r = start(&h, cfg, &[(WLAN, wlan.clone())]);
    r.tx.send(release(WLAN, 0x1103)).await.unwrap();
    assert_eq!(r.next().await.result, "skipped");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let st = AgentStatus::load(&h.host.run_dir).unwrap().unwrap();
        assert!(!st.cards[&bdf(WLAN)].busy, "{:?}", st.cards[&bdf(WLAN)]);
    }
    assert_eq!(wlan.with_model(|m| m.writes.len()), 0);
    r.stop().await;
}

/// A check-then-reset whose reset panics (here: the card's BAR mapping, the second one of the
/// session) is a failed attempt, as a release's reset would be: journaled as the reset task's,
/// counted, and recorded for the back-off; a panic before the verdict is the check's alone.
#[tokio::test]
async fn a_panicking_reset_after_a_check_is_a_failed_attempt() {
    let h = FakeHost::new();
    h.add(FakeDevice::default());
    let card = sim(Family::Wlan, Faults::default());
    let inner = card.clone();
    let open: qcom_reset::agent::OpenFn = Arc::new(move |_, _| {
        let mut maps = 0;
        Ok(Box::new(Hooked {
            inner: inner.clone(),
            on_config_write: Box::new(|| {}),
            on_map: Box::new(move || {
                maps += 1;
                assert!(maps < 2, "the reset's BAR mapping fails");
            }),
        }))
    });
    let mut cfg = test_config(&h);
    cfg.rescan = true;
    cfg.max_attempts = 1;
    let state = cfg.state_file.clone();
    let mut r = start_with(h.host.clone(), cfg, open);
    let a = r.next().await;
    assert_eq!((a.trigger, a.result.as_str()), (Trigger::Rescan, "error"));
    assert!(a.detail.starts_with("reset task failed"), "{}", a.detail);
    r.stop().await;
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(kept["devices"][WLAN]["failures"], 1, "{kept}");
}
