//! The auto-remediation agent: probe items in, per-device tasks decide and act, verdicts out.
//! Event-driven: a release starts the reset at once unless the kernel's own `device_specific`
//! reset ran (a bind to vfio-pci, after a settle time); a bus reset's "success" is not a reset of these cards
//! (domain.md §7). There is no polling loop: the start-up and lost-event rescans are the only
//! sweeps, and a held device is re-checked only while a release waits for its holder.

mod action;
pub mod metrics;
pub mod policy;
mod shared;
mod startup;
pub mod state;
pub mod status;
mod task;
mod trigger;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::access::Backend;
use crate::bdf::Bdf;
use crate::config::Config;
use crate::host::Host;
use crate::host::holders::OWN_COMM;
use crate::host::own::Ownership;
use crate::host::sysfs::SysfsDevice;
use crate::probes::Item;
use crate::probes::events::{Kind, TraceEvent};
use crate::session::{self};
use metrics::Metrics;
use state::State;
use status::AgentStatus;

use action::now_ms;
pub use action::{Action, ActionResult};
pub use shared::Reloader;
use shared::binds_reset;
use shared::{JournalLine, Shared};
use startup::{startup_done, watchdog_interval};
use task::{Msg, device_task};
pub use trigger::Trigger;

/// How the agent opens a card's registers (tests give a simulator).
pub type OpenFn =
    Arc<dyn Fn(&SysfsDevice, &Ownership) -> crate::Result<Box<dyn Backend>> + Send + Sync>;

/// Where the agent's items come from: the probes in production, a script in tests.
pub trait ItemSource {
    /// The next item: an event, drops, an attachment change.
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

/// The auto-remediation agent: one task per card, fed by the probes.
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
    /// A handle that reloads the configuration (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.clone())
    }

    /// An agent with `cfg`, acting through `open`.
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
                    info!(bdf = %bdf, "recovered after a killed session: PCI_COMMAND {:?}, power/control {:?}", r.command, r.power_control);
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
            self.shared.journal(&JournalLine::Event {
                ts_ms: now_ms(),
                taken_mono_ns: d.taken_ns,
                received_mono_ns: d.received_ns,
                event: e,
            });
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
