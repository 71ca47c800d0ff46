//! The auto-remediation agent: probe items in, per-device tasks decide and act, verdicts out.
//! Event-driven: a release starts the reset at once unless the kernel's own `device_specific`
//! reset ran (a bind to vfio-pci, after a settle time); a bus reset's "success" is not a reset of these cards
//! (domain.md §7). There is no polling loop: the start-up and lost-event rescans are the only
//! sweeps, and a held device is re-checked only while a release waits for its holder.

pub mod metrics;
pub mod policy;
pub mod state;
pub mod status;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::access::Backend;
use crate::bdf::Bdf;
use crate::config::{self, Config};
use crate::device::verdict::Health;
use crate::host::Host;
use crate::host::holders::OWN_COMM;
use crate::host::own::Ownership;
use crate::host::sysfs::SysfsDevice;
use crate::probes::Item;
use crate::probes::events::{Kind, TraceEvent};
use crate::session::Unread;
use crate::session::{self, Request};
use metrics::Metrics;
use policy::{Decision, Gate};
use state::State;
use status::AgentStatus;

pub type OpenFn =
    Arc<dyn Fn(&SysfsDevice, &Ownership) -> crate::Result<Box<dyn Backend>> + Send + Sync>;

/// Why a device task runs, weakest first: a stronger trigger replaces a weaker one while debouncing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Start-up or lost-event sweep: verify, reset as `rescan_resets` says.
    Rescan,
    /// A reset call other than a successful `pci_dev_specific_reset` (sysfs `reset`,
    /// VFIO_DEVICE_RESET, a bus reset), whatever it returned: debounced, then reset.
    ResetCall,
    /// A reset call in which the kernel's `pci_dev_specific_reset` returned 0 (sysfs `reset`,
    /// a VM's VFIO_DEVICE_RESET): verify, reset only if not clean; while a VM holds the
    /// device, its release answers it.
    KernelResetCall,
    /// vfio_pci_core_disable returned after the kernel's `pci_dev_specific_reset` returned 0:
    /// verify once the holder lets go (QEMU keeps the group open while it shuts down), reset
    /// only if not clean.
    KernelReset,
    /// A VFIO open failed after its own reset calls: no release will follow. Verify once the
    /// opener has let go of the group, reset unless clean.
    FailedOpen,
    /// The device became bound to vfio-pci: after `bind_settle_ms`, reset it unless a VM
    /// holds it by then (libvirt's managed hostdevs bind and start QEMU at once).
    Bind,
    /// vfio_pci_core_disable returned without the kernel's device-specific reset.
    Release,
}

impl Trigger {
    /// Acts at once; the others wait their window (debounce, or the bind settle time) for the
    /// event that explains or supersedes them.
    fn immediate(self) -> bool {
        self == Trigger::Release
    }

    /// Checks the device first and resets only if the verdict calls for it.
    fn verifies_first(self) -> bool {
        matches!(
            self,
            Trigger::Rescan | Trigger::KernelResetCall | Trigger::KernelReset | Trigger::FailedOpen
        )
    }

    /// Ends a use of the device by someone who may still hold its group for a while (QEMU
    /// shutting down, or failing to start): a refusal as held waits for them to let go.
    fn waits_for_holder(self) -> bool {
        matches!(
            self,
            Trigger::Release | Trigger::KernelReset | Trigger::FailedOpen
        )
    }

    /// The kernel's own device-specific reset took (at a release or a reset call).
    fn kernel_reset(self) -> bool {
        matches!(self, Trigger::KernelResetCall | Trigger::KernelReset)
    }

    /// The trigger for a probe event on a target, or None when it needs nothing.
    pub fn of_event(e: &TraceEvent) -> Option<Trigger> {
        // A qcom-reset session's own VFIO open and close (a hook's or the CLI's `reset` with
        // VFIO access) is no VM letting go: answering it would hold the group exactly when the
        // VM the hook prepares starts. The agent itself is dropped in the kernel by TGID.
        if e.comm == OWN_COMM {
            return None;
        }
        let device_specific_ok =
            e.function == qcom_reset_ebpf::Func::PciDevSpecificReset && e.ret == 0;
        match e.kind {
            Kind::Release if e.left_unreset == Some(false) => Some(Trigger::KernelReset),
            Kind::Release => Some(Trigger::Release),
            // Made inside a VFIO open or release of the device: that event carries it, and the
            // release is what gets answered (however long the open takes after its reset).
            Kind::Attempt if e.inside.is_some() => None,
            Kind::Attempt if device_specific_ok => Some(Trigger::KernelResetCall),
            Kind::Attempt => Some(Trigger::ResetCall),
            // An open that failed after its reset calls: no release will follow to answer them.
            Kind::Open if e.ret != 0 && e.attempts_seen.unwrap_or(0) > 0 => {
                Some(Trigger::FailedOpen)
            }
            // The device is now held; its release will follow.
            Kind::Open => None,
        }
    }
}

/// Where the agent's items come from: the probes in production, a script in tests.
pub trait ItemSource {
    fn next(&mut self) -> impl Future<Output = anyhow::Result<Item>>;
}

impl ItemSource for crate::probes::Tracer {
    fn next(&mut self) -> impl Future<Output = anyhow::Result<Item>> {
        crate::probes::Tracer::next(self)
    }
}

/// Forwards items to the agent until the source fails or `stop` fires, then drops `tx`: the
/// agent's item loop ends with it, and so does its watchdog feed. Returns whether the source
/// failed, for the process to exit non-zero and systemd to restart it: a deaf agent that
/// looks alive resets nothing.
pub async fn forward(
    src: &mut impl ItemSource,
    tx: mpsc::Sender<Item>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    loop {
        tokio::select! {
            item = src.next() => match item {
                Ok(i) => if tx.send(i).await.is_err() { return false },
                Err(e) => {
                    tracing::error!("event stream failed: {e:#}; exiting for a restart");
                    return true;
                }
            },
            _ = stop.changed() => return false,
        }
    }
}

/// One thing the agent did or declined to do; journaled and broadcast.
#[derive(Clone, Debug, Serialize)]
pub struct Action {
    pub ts_ms: u64,
    pub bdf: Bdf,
    pub trigger: Trigger,
    /// A verdict ("clean", "stale", "crashed", "not-ready", "link-down", "wrong-identity"), or
    /// "error", "taken", "dry-run", "skipped", "nothing-to-do"
    pub result: String,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<session::Report>,
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
    /// Swapped whole by a reload (`cfg()` gives the current one; a session in flight keeps the
    /// request it was started with).
    cfg: std::sync::RwLock<Arc<Config>>,
    host: Host,
    open: OpenFn,
    metrics: Arc<Metrics>,
    journal: Option<Mutex<File>>,
    state: Mutex<State>,
    actions: broadcast::Sender<Action>,
    shutdown: watch::Receiver<bool>,
    /// Whether a bind to vfio-pci is followed by a reset (`bind_reset`, resolved at start and
    /// at each reload).
    binds_reset: std::sync::atomic::AtomicBool,
    /// What `health` and `systemctl status` see.
    status: Mutex<AgentStatus>,
    /// A device's episode ended (its task has nothing in hand): what READY waits for.
    settled: broadcast::Sender<Bdf>,
}

/// `bind_reset` resolved against this host (its libvirt hook), said once when `auto` turns it
/// off.
fn binds_reset(cfg: &Config) -> bool {
    let binds = cfg.bind_reset.resolve(std::path::Path::new("/"));
    if cfg.bind_reset == config::BindReset::Auto && !binds {
        info!(
            "qcom-reset's libvirt hook is installed ({}): it resets cards at start/begin, so binds to vfio-pci are not followed by a reset (bind_reset = \"always\" to have both)",
            config::LIBVIRT_HOOK
        );
    }
    binds
}

/// Applies a configuration re-read on SIGHUP to the running agent.
#[derive(Clone)]
pub struct Reloader(Arc<Shared>);

impl Reloader {
    /// Reads the configuration with `read` and applies it; a bad one is refused whole and the
    /// running configuration stays. systemd hears RELOADING=1 and READY=1 around it once the
    /// agent is ready (before, READY=1 belongs to the start-up).
    pub fn reload(&self, read: impl FnOnce() -> anyhow::Result<Config>) -> Option<config::Reload> {
        let ready = self
            .0
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready;
        if ready {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        }
        let r = match read() {
            Ok(new) => Some(self.apply(new)),
            Err(e) => {
                error!("reload refused, the running configuration stays: {e:#}");
                None
            }
        };
        if ready {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        r
    }

    fn apply(&self, new: Config) -> config::Reload {
        let sh = &self.0;
        let r = sh.cfg().reload(new);
        sh.binds_reset
            .store(binds_reset(&r.cfg), std::sync::atomic::Ordering::Relaxed);
        *sh.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(r.cfg.clone());
        if r.applied.is_empty() {
            info!("configuration reloaded: nothing changed");
        } else {
            info!("configuration reloaded: {} applied", r.applied.join(", "));
        }
        if !r.at_restart.is_empty() {
            warn!(
                "configuration reloaded, but {} changed only at the next restart (`systemctl restart qcom-reset`)",
                r.at_restart.join(", ")
            );
        }
        r
    }
}

impl Shared {
    fn cfg(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

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
            "clean" | "nothing-to-do" | "dry-run" => {
                info!(bdf = %a.bdf, trigger = ?a.trigger, "{}: {}", a.result, a.detail)
            }
            _ => warn!(bdf = %a.bdf, trigger = ?a.trigger, "{}: {}", a.result, a.detail),
        }
        // CLOCK_MONOTONIC, as the events' stamps: an event's release to its action's end.
        self.journal(&serde_json::json!({
            "type": "action", "mono_ns": crate::probes::mono_ns(), "action": &a
        }));
        let _ = self.actions.send(a);
    }

    /// Changes the published status, then writes it out and tells systemd.
    fn publish(&self, change: impl FnOnce(&mut AgentStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
        self.write_status();
    }

    /// Writes the status as it is now (a late write writes the latest state, never an older
    /// one) and tells systemd.
    fn write_status(&self) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.heartbeat_ms = now_ms();
        if let Err(e) = st.save(&self.host.run_dir) {
            warn!("agent status: {e}");
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&st.line())]);
    }

    /// The device's latest verdict, for the metrics and the published status.
    fn verdict(&self, bdf: Bdf, health: Health, detail: &str) {
        self.metrics
            .verdict(&bdf.to_string(), health == Health::Clean);
        self.publish(|st| {
            let c = st.cards.entry(bdf).or_default();
            (c.health, c.detail, c.ts_ms) = (Some(health), detail.to_string(), now_ms());
            c.gave_up &= health != Health::Clean;
        });
    }

    /// A target's description, for `device_info`.
    fn describe(&self, t: &session::Target) {
        self.metrics.device_info(metrics::DeviceInfo {
            bdf: t.bdf.to_string(),
            profile: t.profile.name.into(),
            model: t.profile.model.into(),
            regime: t.regime().to_string(),
            driver: t.driver.clone().unwrap_or_else(|| "none".into()),
        });
    }

    /// A VM (or another user) opened the card: the last verdict says nothing about it any more;
    /// the release's verdict will.
    fn opened(&self, bdf: Bdf, comm: &str) {
        let detail = format!("opened by {comm}; not verified since");
        self.publish(|st| {
            let c = st.cards.entry(bdf).or_default();
            (c.health, c.detail, c.ts_ms) = (None, detail, now_ms());
        });
    }

    fn gave_up(&self, bdf: Bdf) {
        self.metrics.gave_up(&bdf.to_string());
        self.publish(|st| st.cards.entry(bdf).or_default().gave_up = true);
    }

    /// A check or reset of the device runs (`busy`) or ended. The start is written from the
    /// blocking pool, so the session does not wait for the file; the end at once.
    fn busy(self: &Arc<Self>, bdf: Bdf, busy: bool) {
        if !busy {
            return self.publish(|st| st.cards.entry(bdf).or_default().busy = false);
        }
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cards
            .entry(bdf)
            .or_default()
            .busy = true;
        let sh = self.clone();
        tokio::task::spawn_blocking(move || sh.write_status());
    }

    fn history(&self, bdf: Bdf) -> policy::History {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.devices.get(&bdf.to_string()).cloned().unwrap_or_default()
    }

    fn record(&self, bdf: Bdf, clean: bool, verdict: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let h = s.devices.entry(bdf.to_string()).or_default();
        policy::record(&self.cfg(), h, clean, verdict, now_ms());
        if let Err(e) = s.save(&self.cfg().state_file) {
            warn!("{e}");
        }
    }

    fn is_target(&self, bdf: Bdf, vendor: u16, device: u16) -> bool {
        self.cfg().acts_on(bdf, vendor, device)
    }

    /// The device's settings, `[[device]]` rules matched against its current IDs.
    fn device_cfg(&self, bdf: Bdf) -> crate::config::DeviceConfig {
        let ids = self.host.sysfs.device(bdf).and_then(|d| d.ids()).ok();
        self.cfg().device_with_ids(bdf, ids)
    }

    /// Explicit profiles by address and by `[[device]]` rule, for the devices present now.
    fn overrides(&self) -> Vec<(Bdf, String, Option<u8>)> {
        self.cfg().overrides(&self.host.sysfs.present_ids())
    }
}

pub struct Agent {
    shared: Arc<Shared>,
    devices: HashMap<Bdf, mpsc::UnboundedSender<Msg>>,
    tasks: JoinSet<()>,
    shutdown_tx: watch::Sender<bool>,
    ready_tx: watch::Sender<bool>,
    /// Events decided on but not yet journaled, counted or logged: written once the items
    /// that arrived with them are decided too (a release behind attempts waits for no write).
    unwritten: Vec<Decided>,
}

/// An event the agent has acted on, for the journal.
struct Decided {
    event: TraceEvent,
    taken_ns: u64,
    received_ns: u64,
    /// Whether the device is a target (read once, at the decision).
    target: bool,
    trigger: Option<Trigger>,
}

/// How long after the agent's start READY=1 waits for the recovery and the start-up checks and
/// resets: a lock wait (30 s) and a modem's reset with verification (10 s), inside the unit's
/// TimeoutStartSec (90 s) with room for loading the probes.
const STARTUP_BOUND: Duration = Duration::from_secs(50);

/// How long shutdown waits for in-flight sessions: a lock wait (30 s) and the longest sequence
/// with verification (modem 10 s); the unit's TimeoutStopSec (60 s) covers it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(45);

impl Agent {
    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.clone())
    }

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
        let binds_reset = binds_reset(&cfg).into();
        let status = Mutex::new(AgentStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            observe_only: cfg.observe_only,
            started_ms: now_ms(),
            ..Default::default()
        });
        Ok(Agent {
            unwritten: Vec::new(),
            shared: Arc::new(Shared {
                cfg: std::sync::RwLock::new(Arc::new(cfg)),
                host,
                open,
                metrics,
                journal,
                state: Mutex::new(state),
                actions,
                shutdown,
                binds_reset,
                status,
                settled: broadcast::channel(256).0,
            }),
            devices: HashMap::new(),
            tasks: JoinSet::new(),
            shutdown_tx,
            ready_tx: watch::channel(false).0,
        })
    }

    /// Turns true once the start-up recovery and checks are done (or `STARTUP_BOUND` passed);
    /// systemd hears READY=1 then, so units ordered after this one (libvirt, pve-guests)
    /// start their guests only when no start-up session holds a card.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Every action the agent takes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Action> {
        self.shared.actions.subscribe()
    }

    /// Runs until `stop` resolves or the item source ends; then lets in-flight sequences finish.
    pub async fn run(mut self, mut items: mpsc::Receiver<Item>, stop: impl Future<Output = ()>) {
        self.shared.publish(|_| {});
        self.log_regimes();
        let bound = tokio::time::Instant::now() + STARTUP_BOUND;
        self.recover().await;
        let settled = self.shared.settled.subscribe();
        let checking = if self.shared.cfg().rescan {
            self.rescan("start")
        } else {
            Vec::new()
        };
        let started = startup_done(settled, checking, bound);
        tokio::pin!(started);
        let mut ready = false;
        tokio::pin!(stop);
        // systemd's watchdog is fed from this loop itself, so a wedged loop is restarted.
        let mut watchdog = watchdog_interval();
        let mut heartbeat = tokio::time::interval(status::HEARTBEAT);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                item = items.recv() => match item {
                    Some(item) => {
                        self.on_item(item, Instant::now());
                        if items.is_empty() && !self.unwritten.is_empty() {
                            // The device tasks just dispatched run first (one thread): their
                            // sessions start before a line is journaled or logged.
                            tokio::task::yield_now().await;
                            self.write_out();
                        }
                    }
                    None => break,
                },
                () = &mut started, if !ready => {
                    ready = true;
                    self.shared.publish(|st| st.ready = true);
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                    let _ = self.ready_tx.send(true);
                }
                _ = heartbeat.tick() => {
                    self.shared.publish(|_| {});
                    self.shared.metrics.heartbeat();
                }
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
        self.write_out();
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
        // A stopped agent publishes nothing: `health` then says so instead of its last word.
        let _ = std::fs::remove_file(AgentStatus::path(&self.shared.host.run_dir));
    }

    fn on_item(&mut self, item: Item, at: Instant) {
        match item {
            Item::Event { event, taken_ns } => self.on_event(event, taken_ns, at),
            Item::Drops { ringbuf, brackets } => {
                self.shared.metrics.drops(ringbuf);
                warn!(
                    "events lost (ring buffer {ringbuf}, in-flight tables {brackets}); rescanning targets"
                );
                if self.shared.cfg().rescan {
                    self.rescan("lost events");
                }
            }
            Item::Attached(a) => {
                for x in a {
                    // An unloaded module's function is not a blind spot: nothing can call it.
                    let attached = match (x.flavour, x.unloaded) {
                        (Some(_), _) => Some(true),
                        (None, true) => None,
                        (None, false) => Some(false),
                    };
                    let function = x.function.symbol();
                    self.shared.metrics.probe(function, attached);
                    self.shared.publish(|st| match attached {
                        Some(a) => {
                            st.probes.insert(function.to_string(), a);
                        }
                        None => {
                            st.probes.remove(function);
                        }
                    });
                    match x.flavour {
                        Some(f) => info!(
                            "probe {function} attached ({})",
                            crate::probes::events::flavour_str(f)
                        ),
                        None => warn!(
                            "probe {function} not attached: {}",
                            x.note.unwrap_or_default()
                        ),
                    }
                }
            }
            Item::Bad(why) => warn!("undecodable probe record: {why}"),
            Item::Bound(bdf) => self.on_bound(bdf, at),
            Item::UeventsLost => {
                warn!(
                    "kernel uevents lost: a bind to vfio-pci may have been missed; rescanning targets"
                );
                if self.shared.cfg().rescan {
                    self.rescan("lost uevents");
                }
            }
        }
    }

    /// A device was bound to vfio-pci: a target is reset before any VM opens it (the modems
    /// fail their first VM boot otherwise).
    fn on_bound(&mut self, bdf: Bdf, at: Instant) {
        let Ok(dev) = self.shared.host.sysfs.device(bdf) else {
            return;
        };
        let Ok((vendor, device)) = dev.ids() else {
            return;
        };
        if self.shared.is_target(bdf, vendor, device)
            && self
                .shared
                .binds_reset
                .load(std::sync::atomic::Ordering::Relaxed)
            && self.shared.cfg().bind_settle_ms > 0
        {
            info!(bdf = %bdf, "bound to vfio-pci; resetting in {} ms unless a VM holds it by then", self.shared.cfg().bind_settle_ms);
            self.dispatch(bdf, Trigger::Bind, at);
        }
    }

    /// Restores what a killed qcom-reset left on devices before anything else touches them.
    async fn recover(&self) {
        if self.shared.cfg().observe_only {
            for bdf in crate::session::record::pending(&self.shared.host.run_dir) {
                warn!(bdf = %bdf, "a killed session left its state to restore; observe-only writes nothing, so it stays");
            }
            return;
        }
        let host = &self.shared.host;
        for said in crate::session::power::recover_pending(&host.sysfs, &host.run_dir) {
            warn!("{said}");
        }
        let (host, open) = (self.shared.host.clone(), self.shared.open.clone());
        let done = tokio::task::spawn_blocking(move || {
            session::recover_pending(&host, &mut |d, o| open(d, o))
        })
        .await
        .unwrap_or_default();
        for (bdf, r) in done {
            match r {
                Ok(r) => {
                    info!(bdf = %bdf, "recovered after a killed session: PCI_COMMAND {:?}, power/control {:?}", r.command, r.power_control)
                }
                Err(e) => warn!(bdf = %bdf, "a killed session's record could not be restored: {e}"),
            }
        }
    }

    /// Which reset regime each target is in, and what that means for this host.
    fn log_regimes(&self) {
        match session::targets(&self.shared.host, &self.shared.overrides()) {
            Ok(ts) => {
                for t in ts {
                    let r = t.regime();
                    info!(bdf = %t.bdf, regime = %r, "{}", r.meaning());
                    if self.shared.is_target(t.bdf, t.vendor, t.device) {
                        self.shared.describe(&t);
                    }
                }
            }
            Err(e) => warn!("cannot list targets: {e}"),
        }
    }

    /// The decision comes first: a reset is on its way before the event is journaled, counted
    /// or logged ([`Agent::write_out`]), so none of that sits between a release and the card's
    /// recovery.
    fn on_event(&mut self, event: TraceEvent, taken_ns: u64, at: Instant) {
        let received_ns = crate::probes::mono_ns();
        let target = self.shared.is_target(event.bdf, event.vendor, event.device);
        let trigger = target.then(|| self.decide(&event, at)).flatten();
        self.unwritten.push(Decided {
            event,
            taken_ns,
            received_ns,
            target,
            trigger,
        });
    }

    /// Journals, counts and logs the events decided since the last call.
    fn write_out(&mut self) {
        for d in std::mem::take(&mut self.unwritten) {
            let e = &d.event;
            self.shared.metrics.event(e.kind.name());
            // Both stamps are CLOCK_MONOTONIC, the clock of the event's ktime_ns: from the
            // kernel's return to `taken_mono_ns` is the ring buffer's wake-up, from there to
            // `received_mono_ns` the agent's hand-off to the decision.
            self.shared.journal(&serde_json::json!({
                "type": "event", "ts_ms": now_ms(), "taken_mono_ns": d.taken_ns,
                "received_mono_ns": d.received_ns, "event": e
            }));
            if d.trigger.is_some() {
                info!(bdf = %e.bdf, "{}", e.line());
            } else if e.kind == Kind::Release
                && !d.target
                && let Some(p) = crate::device::by_id(e.vendor, e.device)
            {
                info!(bdf = %e.bdf, "released; experimental profile {} not opted in (experimental = [\"{}\"]): left alone", p.name, p.name);
            }
        }
    }

    /// What a target's event asks for, dispatched at once; None when it needs nothing.
    fn decide(&mut self, e: &TraceEvent, at: Instant) -> Option<Trigger> {
        // Only an open that succeeded has a release to come; only a task that is debouncing
        // something needs to hear it.
        if e.kind == Kind::Open && e.comm != OWN_COMM && e.ret == 0 {
            self.shared.opened(e.bdf, &e.comm);
            if let Some(tx) = self.devices.get(&e.bdf) {
                let _ = tx.send(Msg::Opened);
            }
        }
        let trigger = Trigger::of_event(e)?;
        self.dispatch(e.bdf, trigger, at);
        Some(trigger)
    }

    fn dispatch(&mut self, bdf: Bdf, trigger: Trigger, at: Instant) {
        let tx = self.devices.entry(bdf).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.tasks.spawn(device_task(self.shared.clone(), bdf, rx));
            tx
        });
        let _ = tx.send(Msg::Act(trigger, at));
    }

    /// Dispatches a check of every target; returns those it dispatched.
    fn rescan(&mut self, why: &str) -> Vec<Bdf> {
        match session::targets(&self.shared.host, &self.shared.overrides()) {
            Ok(ts) => {
                let (act, skip): (Vec<_>, Vec<_>) = ts
                    .into_iter()
                    .partition(|t| self.shared.is_target(t.bdf, t.vendor, t.device));
                info!("rescan ({why}): {} target device(s)", act.len());
                for t in skip {
                    info!(bdf = %t.bdf, "experimental profile {} not opted in (experimental = [\"{}\"]): left alone", t.profile.name, t.profile.name);
                }
                for t in &act {
                    self.shared.describe(t);
                    self.dispatch(t.bdf, Trigger::Rescan, Instant::now());
                }
                act.into_iter().map(|t| t.bdf).collect()
            }
            Err(e) => {
                warn!("rescan ({why}) failed: {e}");
                Vec::new()
            }
        }
    }
}

/// Resolves when each device the start-up rescan dispatched has ended its episode (a failed
/// reset's retries included: each holds the card's group), or at `bound`.
async fn startup_done(
    mut settled: broadcast::Receiver<Bdf>,
    checking: Vec<Bdf>,
    bound: tokio::time::Instant,
) {
    let mut left: std::collections::HashSet<Bdf> = checking.into_iter().collect();
    let all = async {
        while !left.is_empty() {
            match settled.recv().await {
                Ok(bdf) => {
                    left.remove(&bdf);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    };
    if tokio::time::timeout_at(bound, all).await.is_err() {
        warn!(
            "start-up checks still running {STARTUP_BOUND:?} after the start; ready anyway (a VM starting now may find a card held)"
        );
    }
}

/// Half of systemd's `WatchdogSec`, when the unit sets one (no timer at all otherwise: an idle
/// agent does not wake up).
fn watchdog_interval() -> Option<tokio::time::Interval> {
    let timeout = sd_notify::watchdog_enabled().filter(|t| !t.is_zero())?;
    let mut i = tokio::time::interval(timeout / 2);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(i)
}

/// What a device's task hears.
enum Msg {
    /// Something to act on, and when it arrived.
    Act(Trigger, Instant),
    /// A VM opened the device: the reset calls that came just before (VFIO's own reset at
    /// open, whichever method ran) were made by that open, and its release will follow.
    Opened,
}

/// Serializes everything for one device. A release acts at once; a bind waits its settle time
/// and weaker triggers the debounce window, in case the event that explains them follows: an
/// open explains the reset calls it made, a release supersedes everything.
async fn device_task(sh: Arc<Shared>, bdf: Bdf, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut next = None;
    loop {
        let (mut trigger, mut at) = match next.take() {
            Some(m) => m,
            None => loop {
                match rx.recv().await {
                    Some(Msg::Act(t, a)) => break (t, a),
                    Some(Msg::Opened) => {}
                    None => return,
                }
            },
        };
        let window = if trigger == Trigger::Bind {
            sh.cfg().bind_settle()
        } else {
            sh.cfg().debounce()
        };
        let deadline = tokio::time::Instant::from_std(at) + window;
        let mut explained = false;
        while !trigger.immediate() && !explained {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => absorb(m, (&mut trigger, &mut at), &mut explained),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        while let Ok(m) = rx.try_recv() {
            absorb(m, (&mut trigger, &mut at), &mut explained);
        }
        if explained {
            info!(bdf = %bdf, "the reset call was the VFIO open's own: its release will be answered");
            let _ = sh.settled.send(bdf);
            continue;
        }
        sh.busy(bdf, true);
        let covered = handle(&sh, bdf, trigger, at).await;
        sh.busy(bdf, false);
        let _ = sh.settled.send(bdf);
        // Our own accesses never come back as events (the probes drop the agent's TGID).
        // Events from before the last check or reset began are answered by it (e.g. the release
        // a held device's wait was for); later ones are news: a VM that started or let go again.
        while let Ok(m) = rx.try_recv() {
            if let Msg::Act(t, a) = m
                && a > covered
            {
                next = Some((t, a));
                break;
            }
        }
    }
}

/// Takes a message that came while a trigger waited its window: a stronger trigger replaces
/// it (and no open before it explains it); an open explains the reset calls before it and the
/// kernel's reset at the release before it (a bus reset, or 7.4's device-specific one at open):
/// the VM owns the card now, and its release is what gets answered.
fn absorb(m: Msg, (trigger, at): (&mut Trigger, &mut Instant), explained: &mut bool) {
    match m {
        Msg::Act(t, a) if t > *trigger => {
            (*trigger, *at) = (t, a);
            *explained = false;
        }
        Msg::Act(..) => {}
        Msg::Opened => {
            *explained = matches!(
                trigger,
                Trigger::ResetCall
                    | Trigger::KernelResetCall
                    | Trigger::KernelReset
                    | Trigger::FailedOpen
            )
        }
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

/// Acts on one trigger until the episode ends; returns when its last check or reset began.
async fn handle(sh: &Arc<Shared>, bdf: Bdf, trigger: Trigger, at: Instant) -> Instant {
    let dev_cfg = sh.device_cfg(bdf);
    let held_until = tokio::time::Instant::now() + sh.cfg().held_wait();
    let mut waiting = false;
    let mut first = true;
    let mut began = Instant::now();
    loop {
        if *sh.shutdown.borrow() {
            return began;
        }
        let gate = Gate {
            kill_switch_on: sh.cfg().kill_switch.exists(),
            enabled: dev_cfg.enabled != Some(false),
        };
        match policy::decide(&sh.cfg(), &gate, &sh.history(bdf), now_ms()) {
            Decision::Skip(why) => {
                sh.metrics.skipped(if gate.kill_switch_on {
                    "kill-switch"
                } else {
                    "policy"
                });
                if sh.history(bdf).failures >= sh.cfg().max_attempts {
                    sh.gave_up(bdf);
                }
                sh.act(action(bdf, trigger, "skipped", why));
                return began;
            }
            Decision::Wait(d) => {
                info!(bdf = %bdf, "backing off {} ms before the next attempt", d.as_millis());
                let mut sd = sh.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(d) => continue,
                    _ = sd.changed() => return began,
                }
            }
            Decision::Act => {}
        }
        began = Instant::now();
        // `act_with_kernel_reset`: the kernel's reset at release is followed by ours.
        let verifies =
            trigger.verifies_first() && !(trigger.kernel_reset() && sh.cfg().act_with_kernel_reset);
        if first && verifies {
            match verify_only(sh, bdf, trigger).await {
                Verified::Reset => {}
                Verified::Done(a) => {
                    sh.act(a);
                    return began;
                }
                Verified::Held(a) => {
                    if wait_out_holder(sh, a, &mut waiting, held_until).await {
                        continue;
                    }
                    return began;
                }
            }
        }
        // The check above may have taken its whole lock wait: no session starts after SIGTERM.
        if *sh.shutdown.borrow() {
            sh.act(action(bdf, trigger, "skipped", "shutting down: not reset"));
            return began;
        }
        let latency = first.then(|| at.elapsed());
        if let Some(l) = latency {
            sh.metrics.latency(l);
        }
        first = false;
        let mut a = attempt(sh, bdf, trigger, &dev_cfg).await;
        a.latency_ms = latency.map(|l| l.as_secs_f64() * 1000.0);
        if a.result == "held" {
            if wait_out_holder(sh, a, &mut waiting, held_until).await {
                continue;
            }
            return began;
        }
        let done = matches!(a.result.as_str(), "clean" | "skipped" | "dry-run" | "taken");
        sh.act(a);
        if done {
            return began;
        }
    }
}

/// Answers a refusal as held (`a`, result "held"); true when the holder let go and the
/// trigger should be acted on again. A release waits for its holder: QEMU keeps the group
/// open while it shuts down, after the device's release (and the kernel's reset in it).
/// Anything else seen while a VM holds the device, such as the reset at its open or a bind
/// right before a VM starts, is answered by the release that ends its use.
async fn wait_out_holder(
    sh: &Arc<Shared>,
    mut a: Action,
    waiting: &mut bool,
    until: tokio::time::Instant,
) -> bool {
    let (bdf, trigger) = (a.bdf, a.trigger);
    let waits = trigger.waits_for_holder();
    if !*waiting {
        a.result = "skipped".into();
        a.detail = if waits {
            format!(
                "{}; waiting up to {} s for it to let go",
                a.detail,
                sh.cfg().held_wait_s
            )
        } else {
            format!("{}; its release will trigger the reset", a.detail)
        };
        sh.act(a);
        if !waits {
            return false;
        }
        *waiting = true;
    }
    // Journaled once: later refusals (held again after the holder seemed to go) wait quietly.
    let wait = if tokio::time::Instant::now() < until {
        holder_gone(sh, bdf, until).await
    } else {
        HolderWait::Deadline
    };
    if wait == HolderWait::Gone {
        return true;
    }
    sh.act(still_held(sh, bdf, trigger, wait));
    false
}

/// One run of the engine, as an action: a verdict, "error", "taken", "dry-run", "skipped" (refused,
/// nothing written) or "held" (refused because something holds the device or its lock).
async fn attempt(
    sh: &Arc<Shared>,
    bdf: Bdf,
    trigger: Trigger,
    dev_cfg: &crate::config::DeviceConfig,
) -> Action {
    let req = Request {
        bdf,
        profile: dev_cfg.profile.clone(),
        bar: dev_cfg.bar,
        force: false,
        dry_run: sh.cfg().observe_only,
        ignore_kernel_reset: sh.cfg().act_with_kernel_reset,
        experimental: sh.cfg().experimental.clone(),
        allow_dpc: sh.cfg().allow_dpc,
        allow_unguarded_link_drop: sh.cfg().allow_unguarded_link_drop,
    };
    let (host, open, access) = (sh.host.clone(), sh.open.clone(), sh.cfg().access.name());
    let result = tokio::task::spawn_blocking(move || {
        session::reset(&host, &req, &mut |d, o| open(d, o), access)
    })
    .await;
    let mut a = action(bdf, trigger, "error", "");
    match result {
        Err(join) => {
            a.detail = format!("reset task failed: {join}");
            sh.metrics.reset(&bdf.to_string(), "error");
            sh.record(bdf, false, "error");
        }
        Ok(Err(e)) if is_refusal(&e) => {
            sh.metrics.skipped("refused");
            let held = matches!(
                e,
                crate::Error::Held { .. }
                    | crate::Error::HeldBySession { .. }
                    | crate::Error::Busy { .. }
            );
            a.result = if held { "held" } else { "skipped" }.into();
            a.detail = format!("not written: {e}");
        }
        // A host driver took the card mid-session (libvirt's managed reattach), or a VM opened
        // it while the verification had let its group go: not the card failing, and no longer
        // ours to retry (the VM's release is an episode of its own). A card that left the bus
        // or came back as a new device is still a failed attempt (a reset that drops it off
        // the bus every time must back off and give up).
        Ok(Err(
            e @ crate::Error::Taken {
                by: crate::session::Lost::Driver(_) | crate::session::Lost::Opened(_),
                ..
            },
        )) => {
            sh.metrics.reset(&bdf.to_string(), "taken");
            a.result = "taken".into();
            a.detail = e.to_string();
        }
        Ok(Err(e)) => {
            a.detail = e.to_string();
            sh.metrics.reset(&bdf.to_string(), "error");
            sh.record(bdf, false, "error");
        }
        Ok(Ok(r)) if r.method == session::Method::DryRun => {
            sh.metrics.reset(&bdf.to_string(), "dry-run");
            a.result = "dry-run".into();
            a.detail = format!(
                "observe-only: would run {} ({} register operations)",
                r.sequence_version,
                r.ops.len()
            );
            a.report = Some(r);
        }
        Ok(Ok(r)) => {
            let v = r.verdict.clone().expect("a real reset has a verdict");
            sh.metrics.reset(&bdf.to_string(), &v.health.to_string());
            sh.metrics.duration(Duration::from_millis(r.duration_ms));
            sh.verdict(bdf, v.health, &v.detail);
            sh.record(bdf, v.health == Health::Clean, &v.health.to_string());
            a.result = v.health.to_string();
            a.detail = format!(
                "{} in {} ms: {}",
                r.sequence_version, r.duration_ms, v.detail
            );
            a.report = Some(r);
        }
    }
    a
}

fn still_held(sh: &Shared, bdf: Bdf, trigger: Trigger, wait: HolderWait) -> Action {
    let detail = match wait {
        HolderWait::Shutdown => "shutting down while it was held: not reset".to_string(),
        _ => format!("still held after {} s: not reset", sh.cfg().held_wait_s),
    };
    action(bdf, trigger, "skipped", detail)
}

/// How a wait for a device's holder ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HolderWait {
    Gone,
    Deadline,
    Shutdown,
}

/// How often a release waiting for its holder re-checks (only while one waits).
const HOLDER_POLL: Duration = Duration::from_millis(250);

/// Waits until nothing holds the device, or the deadline, or shutdown.
async fn holder_gone(sh: &Arc<Shared>, bdf: Bdf, until: tokio::time::Instant) -> HolderWait {
    let mut sd = sh.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HOLDER_POLL) => {}
            _ = sd.changed() => return HolderWait::Shutdown,
        }
        let host = sh.host.clone();
        if let Ok(true) = tokio::task::spawn_blocking(move || group_free(&host, bdf)).await {
            info!(bdf = %bdf, "the holder let go; resetting");
            return HolderWait::Gone;
        }
        if tokio::time::Instant::now() >= until {
            return HolderWait::Deadline;
        }
    }
}

/// The kernel's word on whether the group is free, not the /proc scan: a holder in another PID
/// namespace is invisible there but still makes the group open fail. The probe open is made
/// under the device's lock, taken without waiting: a CLI session holding it is never told
/// "held" by us, and its lock wait is the engine's to do (so that counts as free).
fn group_free(host: &Host, bdf: Bdf) -> bool {
    let Ok(_lock) = crate::host::lock::DeviceLock::acquire(&host.run_dir, bdf, Duration::ZERO)
    else {
        return true;
    };
    let Ok(dev) = host.sysfs.device(bdf) else {
        return true;
    };
    let own = Ownership::take(&host.dev_vfio, &host.proc_root, &dev, &host.open_group);
    !matches!(
        own,
        Err(crate::Error::Held { .. } | crate::Error::HeldBySession { .. })
    )
}

/// Refusals are not failed attempts: nothing was written.
fn is_refusal(e: &crate::Error) -> bool {
    use crate::Error::*;
    matches!(
        e,
        Held { .. }
            | HeldBySession { .. }
            | RecordWaits { .. }
            | PciehpPolls { .. }
            | WrongDriver { .. }
            | NotTarget { .. }
            | NoSuchDevice(..)
            | Busy { .. }
            | UnknownProfile(_)
            | Experimental { .. }
            | Dpc { .. }
            | PortGuard { .. }
    )
}

/// What the health check before acting on a weak trigger found.
enum Verified {
    /// The device must be reset.
    Reset,
    /// The action that ends the episode: clean, a verdict the rescan policy leaves alone, not
    /// checkable.
    Done(Action),
    /// Not checked because something holds the device (result "held").
    Held(Action),
}

async fn verify_only(sh: &Arc<Shared>, bdf: Bdf, trigger: Trigger) -> Verified {
    let (host, open, dev_cfg) = (sh.host.clone(), sh.open.clone(), sh.device_cfg(bdf));
    let mode = if sh.cfg().observe_only {
        session::ReadMode::NoWrites
    } else {
        session::ReadMode::EnableAndRestore
    };
    if sh.cfg().observe_only && crate::access::opens_device(sh.cfg().access) {
        return Verified::Done(action(
            bdf,
            trigger,
            "skipped",
            format!(
                "not checked: {}; observe-only does not",
                crate::access::VFIO_OPEN_RESETS
            ),
        ));
    }
    let st = tokio::task::spawn_blocking(move || {
        let t = session::inspect(&host, bdf, dev_cfg.profile.as_deref(), dev_cfg.bar)?;
        session::status(&host, t, &mut |d, o| open(d, o), mode)
    })
    .await;
    let resets = |h: Health| match trigger {
        Trigger::Rescan => sh.cfg().rescan_resets.resets(h),
        _ => h != Health::Clean,
    };
    match st {
        Ok(Ok(s)) => match (s.verdict, s.skipped) {
            (Some(v), _) if v.health == Health::Clean => Verified::Done({
                sh.verdict(bdf, v.health, &v.detail);
                action(
                    bdf,
                    trigger,
                    "nothing-to-do",
                    format!("clean: {}", v.detail),
                )
            }),
            (Some(v), _) if !resets(v.health) => Verified::Done({
                sh.verdict(bdf, v.health, &v.detail);
                action(
                    bdf,
                    trigger,
                    "nothing-to-do",
                    format!(
                        "{} left alone (rescan_resets = {:?}): {}",
                        v.health,
                        sh.cfg().rescan_resets,
                        v.detail
                    ),
                )
            }),
            (Some(v), _) => {
                info!(bdf = %bdf, "{} ({}); resetting", v.health, v.detail);
                Verified::Reset
            }
            (None, Some(Unread::Held(why))) => {
                Verified::Held(action(bdf, trigger, "held", format!("not checked: {why}")))
            }
            (None, why) => Verified::Done(action(
                bdf,
                trigger,
                "skipped",
                format!(
                    "not checked: {}",
                    why.map(|w| w.to_string()).unwrap_or_default()
                ),
            )),
        },
        Ok(Err(e)) => Verified::Done(action(bdf, trigger, "skipped", format!("not checked: {e}"))),
        Err(e) => Verified::Done(action(
            bdf,
            trigger,
            "error",
            format!("status task failed: {e}"),
        )),
    }
}
