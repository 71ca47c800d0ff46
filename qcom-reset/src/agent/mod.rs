//! The auto-remediation agent: probe items in, per-device tasks decide and act, verdicts out.
//! Event-driven: a release that left a target unreset starts its reset at once; there is no
//! polling loop (the start-up and lost-event rescans are the only sweeps).
pub mod config;
pub mod metrics;
pub mod policy;
pub mod state;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::backend::Backend;
use crate::bdf::Bdf;
use crate::engine::{self, Host, Request};
use crate::probes::Item;
use crate::probes::events::{Kind, TraceEvent};
use crate::sysfs::SysfsDevice;
use crate::verdict::Health;
use config::Config;
use metrics::Metrics;
use policy::{Decision, Gate};
use state::State;

pub type OpenFn = Arc<dyn Fn(&SysfsDevice) -> crate::Result<Box<dyn Backend>> + Send + Sync>;

/// Why a device task runs, weakest first: a stronger trigger replaces a weaker one while debouncing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Start-up or lost-event sweep: act only if the device is unhealthy.
    Rescan,
    /// The kernel reset the device at release: verify, act only if unhealthy.
    KernelResetOk,
    /// A reset call failed (sysfs reset, VFIO_DEVICE_RESET, open-time reset).
    FailedReset,
    /// vfio_pci_core_disable returned and left the device without a successful reset.
    Release,
}

/// One thing the agent did or declined to do; journaled and broadcast.
#[derive(Clone, Debug, Serialize)]
pub struct Action {
    pub ts_ms: u64,
    pub bdf: Bdf,
    pub trigger: Trigger,
    /// "healthy", "syserr", "link-down", "not-ready", "error", "dry-run", "skipped", "nothing-to-do"
    pub result: String,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<engine::Report>,
    /// Time from the event's arrival to the start of the reset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Shared {
    cfg: Config,
    host: Host,
    open: OpenFn,
    metrics: Arc<Metrics>,
    journal: Option<Mutex<File>>,
    state: Mutex<State>,
    actions: broadcast::Sender<Action>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn journal(&self, record: &impl Serialize) {
        if let Some(j) = &self.journal {
            let mut line = serde_json::to_vec(record).expect("records serialize");
            line.push(b'\n');
            let mut f = j.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.write_all(&line) {
                warn!("journal write failed: {e}");
            }
        }
    }

    fn act(&self, a: Action) {
        match a.result.as_str() {
            "healthy" | "nothing-to-do" | "dry-run" => {
                info!(bdf = %a.bdf, trigger = ?a.trigger, "{}: {}", a.result, a.detail)
            }
            _ => warn!(bdf = %a.bdf, trigger = ?a.trigger, "{}: {}", a.result, a.detail),
        }
        self.journal(&serde_json::json!({"type": "action", "action": &a}));
        let _ = self.actions.send(a);
    }

    fn history(&self, bdf: Bdf) -> policy::History {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.devices.get(&bdf.to_string()).cloned().unwrap_or_default()
    }

    fn record(&self, bdf: Bdf, healthy: bool, verdict: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let h = s.devices.entry(bdf.to_string()).or_default();
        policy::record(&self.cfg, h, healthy, verdict, now_ms());
        if let Err(e) = s.save(&self.cfg.state_file) {
            warn!("{e}");
        }
    }

    fn is_target(&self, bdf: Bdf, vendor: u16, device: u16) -> bool {
        crate::devices::by_id(vendor, device).is_some() || self.cfg.device(bdf).profile.is_some()
    }
}

pub struct Agent {
    shared: Arc<Shared>,
    devices: HashMap<Bdf, mpsc::UnboundedSender<(Trigger, Instant)>>,
    tasks: JoinSet<()>,
    shutdown_tx: watch::Sender<bool>,
}

/// How long shutdown waits for in-flight sequences (the modem's takes over 2 s, WLAN up to 6 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

impl Agent {
    pub fn new(
        cfg: Config,
        host: Host,
        open: OpenFn,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Agent> {
        let state = State::load(&cfg.state_file)?;
        let journal = if cfg.journal.as_os_str().is_empty() {
            None
        } else {
            if let Some(dir) = cfg.journal.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot create {}: {e}; set `journal` in the config",
                        dir.display()
                    )
                })?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&cfg.journal)
                .map_err(|e| {
                    anyhow::anyhow!("cannot open journal {}: {e}", cfg.journal.display())
                })?;
            Some(Mutex::new(f))
        };
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (actions, _) = broadcast::channel(256);
        Ok(Agent {
            shared: Arc::new(Shared {
                cfg,
                host,
                open,
                metrics,
                journal,
                state: Mutex::new(state),
                actions,
                shutdown,
            }),
            devices: HashMap::new(),
            tasks: JoinSet::new(),
            shutdown_tx,
        })
    }

    /// Every action the agent takes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Action> {
        self.shared.actions.subscribe()
    }

    /// Runs until `stop` resolves or the item source ends; then lets in-flight sequences finish.
    pub async fn run(mut self, mut items: mpsc::Receiver<Item>, stop: impl Future<Output = ()>) {
        if self.shared.cfg.rescan {
            self.rescan("start");
        }
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                item = items.recv() => match item {
                    Some(item) => self.on_item(item, Instant::now()),
                    None => break,
                },
            }
        }
        info!("shutting down: waiting for in-flight resets to finish");
        let _ = self.shutdown_tx.send(true);
        self.devices.clear();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                "in-flight resets still running after {SHUTDOWN_GRACE:?}; their post steps run as they finish"
            );
        }
    }

    fn on_item(&mut self, item: Item, at: Instant) {
        match item {
            Item::Event(e) => self.on_event(e, at),
            Item::Drops { ringbuf, brackets } => {
                self.shared.metrics.drops(ringbuf);
                warn!(
                    "events lost (ring buffer {ringbuf}, bracket table {brackets}); rescanning targets"
                );
                if self.shared.cfg.rescan {
                    self.rescan("lost events");
                }
            }
            Item::Attached(a) => {
                for x in a {
                    match x.flavour {
                        Some(f) => info!("probe {} attached ({f})", x.function),
                        None => warn!(
                            "probe {} not attached: {}",
                            x.function,
                            x.note.unwrap_or_default()
                        ),
                    }
                }
            }
            Item::Bad(why) => warn!("undecodable probe record: {why}"),
        }
    }

    fn on_event(&mut self, e: TraceEvent, at: Instant) {
        let kind = match e.kind {
            Kind::Attempt => "attempt",
            Kind::Release => "release",
            Kind::Open => "open",
        };
        self.shared.metrics.event(kind);
        // CLOCK_MONOTONIC, the clock of the event's ktime_ns: the difference is the detection latency.
        let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let received_mono_ns = mono.tv_sec as u64 * 1_000_000_000 + mono.tv_nsec as u64;
        self.shared.journal(&serde_json::json!({
            "type": "event", "ts_ms": now_ms(), "received_mono_ns": received_mono_ns, "event": &e
        }));
        let (Ok(bdf), Ok(vendor), Ok(device)) = (
            e.bdf.parse::<Bdf>(),
            u16::from_str_radix(&e.vendor, 16),
            u16::from_str_radix(&e.device, 16),
        ) else {
            return;
        };
        if !self.shared.is_target(bdf, vendor, device) {
            return;
        }
        let trigger = match e.kind {
            Kind::Release if e.left_unreset == Some(true) => Trigger::Release,
            Kind::Release => Trigger::KernelResetOk,
            Kind::Attempt if e.ret < 0 => Trigger::FailedReset,
            Kind::Attempt | Kind::Open => return,
        };
        info!(bdf = %bdf, "{}", e.line());
        self.dispatch(bdf, trigger, at);
    }

    fn dispatch(&mut self, bdf: Bdf, trigger: Trigger, at: Instant) {
        let tx = self.devices.entry(bdf).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.tasks.spawn(device_task(self.shared.clone(), bdf, rx));
            tx
        });
        let _ = tx.send((trigger, at));
    }

    fn rescan(&mut self, why: &str) {
        match engine::targets(&self.shared.host, &self.shared.cfg.overrides()) {
            Ok(ts) => {
                info!("rescan ({why}): {} target device(s)", ts.len());
                for t in ts {
                    self.dispatch(t.bdf, Trigger::Rescan, Instant::now());
                }
            }
            Err(e) => warn!("rescan ({why}) failed: {e}"),
        }
    }
}

/// Serializes everything for one device. A release acts at once; weaker triggers wait the
/// debounce window in case the release that explains them follows.
async fn device_task(
    sh: Arc<Shared>,
    bdf: Bdf,
    mut rx: mpsc::UnboundedReceiver<(Trigger, Instant)>,
) {
    while let Some((mut trigger, mut at)) = rx.recv().await {
        let deadline = tokio::time::Instant::from_std(at) + sh.cfg.debounce();
        while trigger != Trigger::Release {
            tokio::select! {
                m = rx.recv() => match m {
                    Some((t, a)) if t > trigger => (trigger, at) = (t, a),
                    Some(_) => {}
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        while let Ok((t, a)) = rx.try_recv() {
            if t > trigger {
                (trigger, at) = (t, a);
            }
        }
        // Our own accesses never come back as events (the probes drop the agent's TGID), so
        // whatever queued meanwhile is news: a VM that started or let go again.
        handle(&sh, bdf, trigger, at).await;
    }
}

fn action(bdf: Bdf, trigger: Trigger, result: &str, detail: impl Into<String>) -> Action {
    Action {
        ts_ms: now_ms(),
        bdf,
        trigger,
        result: result.into(),
        detail: detail.into(),
        report: None,
        latency_ms: None,
    }
}

async fn handle(sh: &Arc<Shared>, bdf: Bdf, trigger: Trigger, at: Instant) {
    let dev_cfg = sh.cfg.device(bdf);
    let mut first = true;
    loop {
        if *sh.shutdown.borrow() {
            return;
        }
        let gate = Gate {
            kill_switch_on: sh.cfg.kill_switch.exists(),
            enabled: dev_cfg.enabled != Some(false),
        };
        match policy::decide(&sh.cfg, &gate, &sh.history(bdf), now_ms()) {
            Decision::Skip(why) => {
                sh.metrics.skipped(if gate.kill_switch_on {
                    "kill-switch"
                } else {
                    "policy"
                });
                sh.act(action(bdf, trigger, "skipped", why));
                return;
            }
            Decision::Wait(d) => {
                info!(bdf = %bdf, "backing off {} ms before the next attempt", d.as_millis());
                let mut sd = sh.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(d) => continue,
                    _ = sd.changed() => return,
                }
            }
            Decision::Act => {}
        }
        if first
            && matches!(trigger, Trigger::Rescan | Trigger::KernelResetOk)
            && let Some(done) = verify_only(sh, bdf, trigger).await
        {
            return sh.act(done);
        }
        let req = Request {
            bdf,
            profile: dev_cfg.profile.clone(),
            bar: dev_cfg.bar,
            force: false,
            dry_run: sh.cfg.observe_only,
            ignore_kernel_reset: sh.cfg.act_with_kernel_reset,
        };
        let latency = first.then(|| at.elapsed());
        if let Some(l) = latency {
            sh.metrics.latency(l);
        }
        first = false;
        let (host, open, access) = (sh.host.clone(), sh.open.clone(), sh.cfg.access.name());
        let result = tokio::task::spawn_blocking(move || {
            engine::reset(&host, &req, &mut |d| open(d), access)
        })
        .await;
        let mut a = action(bdf, trigger, "error", "");
        a.latency_ms = latency.map(|l| l.as_secs_f64() * 1000.0);
        match result {
            Err(join) => {
                a.detail = format!("reset task failed: {join}");
                sh.metrics.reset("error");
                sh.record(bdf, false, "error");
                sh.act(a);
            }
            Ok(Err(e)) if is_refusal(&e) => {
                sh.metrics.skipped("refused");
                a.result = "skipped".into();
                a.detail = format!("not written: {e}");
                return sh.act(a);
            }
            Ok(Err(e)) => {
                a.detail = e.to_string();
                sh.metrics.reset("error");
                sh.record(bdf, false, "error");
                sh.act(a);
            }
            Ok(Ok(r)) if r.method == engine::Method::DryRun => {
                sh.metrics.reset("dry-run");
                a.result = "dry-run".into();
                a.detail = format!(
                    "observe-only: would run {} ({} register operations)",
                    r.sequence_version,
                    r.ops.len()
                );
                a.report = Some(r);
                return sh.act(a);
            }
            Ok(Ok(r)) => {
                let v = r.verdict.clone().expect("a real reset has a verdict");
                let healthy = v.health == Health::Healthy;
                sh.metrics.reset(&v.health.to_string());
                sh.record(bdf, healthy, &v.health.to_string());
                a.result = v.health.to_string();
                a.detail = format!(
                    "{} in {} ms: {}",
                    r.sequence_version, r.duration_ms, v.detail
                );
                a.report = Some(r);
                sh.act(a);
                if healthy {
                    return;
                }
            }
        }
    }
}

/// Refusals are not failed attempts: nothing was written.
fn is_refusal(e: &crate::Error) -> bool {
    use crate::Error::*;
    matches!(
        e,
        Held { .. }
            | WrongDriver { .. }
            | NotTarget { .. }
            | NoSuchDevice(..)
            | Busy { .. }
            | UnknownProfile(_)
    )
}

/// Health check before acting on a weak trigger: the action that ends the episode (healthy,
/// not checkable), or None when the device is unhealthy and must be reset.
async fn verify_only(sh: &Arc<Shared>, bdf: Bdf, trigger: Trigger) -> Option<Action> {
    let (host, open, dev_cfg) = (sh.host.clone(), sh.open.clone(), sh.cfg.device(bdf));
    let st = tokio::task::spawn_blocking(move || {
        let t = engine::inspect(&host, bdf, dev_cfg.profile.as_deref(), dev_cfg.bar)?;
        engine::status(&host, t, &mut |d| open(d))
    })
    .await;
    match st {
        Ok(Ok(s)) => match (s.verdict, s.skipped) {
            (Some(v), _) if v.health == Health::Healthy => Some(action(
                bdf,
                trigger,
                "nothing-to-do",
                format!("healthy: {}", v.detail),
            )),
            (Some(v), _) => {
                info!(bdf = %bdf, "unhealthy ({}: {}); resetting", v.health, v.detail);
                None
            }
            (None, why) => Some(action(
                bdf,
                trigger,
                "skipped",
                format!("not checked: {}", why.unwrap_or_default()),
            )),
        },
        Ok(Err(e)) => Some(action(bdf, trigger, "skipped", format!("not checked: {e}"))),
        Err(e) => Some(action(
            bdf,
            trigger,
            "error",
            format!("status task failed: {e}"),
        )),
    }
}
