//! What the agent's device tasks share: the configuration, the host, the journal, the state
//! and the status it publishes.
use std::fs::File;
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tracing::{error, info, warn};

use super::OpenFn;
use super::action::{Action, ActionResult, now_ms};
use super::metrics::{self, Metrics};
use super::policy::{self};
use super::state::State;
use super::status::AgentStatus;
use crate::bdf::Bdf;
use crate::config::{self, Config};
use crate::device::verdict::Health;
use crate::host::Host;
use crate::session::{self};

/// One line of the journal (docs/operations.md, "The journal"). The stamps are CLOCK_MONOTONIC,
/// the clock of an event's `ktime_ns`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(super) enum JournalLine<'a> {
    /// A probe event: from the kernel's return to `taken_mono_ns` is the ring buffer's wake-up,
    /// from there to `received_mono_ns` the agent's hand-off to the decision.
    Event {
        ts_ms: u64,
        taken_mono_ns: u64,
        received_mono_ns: u64,
        event: &'a crate::probes::TraceEvent,
    },
    /// An action, stamped when it ended: an event's release to its action's end.
    Action { mono_ns: u64, action: &'a Action },
}

pub(super) struct Shared {
    /// Swapped whole by a reload (`cfg()` gives the current one; a session in flight keeps the
    /// request it was started with).
    pub(super) cfg: std::sync::RwLock<Arc<Config>>,
    pub(super) host: Host,
    pub(super) open: OpenFn,
    pub(super) metrics: Arc<Metrics>,
    pub(super) journal: Option<Mutex<File>>,
    pub(super) state: Mutex<State>,
    pub(super) actions: broadcast::Sender<Action>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// Whether a bind to vfio-pci is followed by a reset (`bind_reset`, resolved at start and
    /// at each reload).
    pub(super) binds_reset: std::sync::atomic::AtomicBool,
    /// What `health` and `systemctl status` see.
    pub(super) status: Mutex<AgentStatus>,
    /// A device's episode ended (its task has nothing in hand): what READY waits for.
    pub(super) settled: broadcast::Sender<Bdf>,
}

/// `bind_reset` resolved against this host (its libvirt hook), said once when `auto` turns it
/// off.
pub(super) fn binds_reset(cfg: &Config) -> bool {
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
pub struct Reloader(pub(super) Arc<Shared>);

impl Reloader {
    /// Reads the configuration with `read` and applies it; a bad one is refused whole and the
    /// running configuration stays. systemd hears RELOADING=1 and READY=1 around it once the
    /// agent is ready (before, READY=1 belongs to the start-up).
    pub fn reload(&self, read: impl FnOnce() -> anyhow::Result<Config>) -> Option<config::Reload> {
        let ready = self
            .0
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    pub(super) fn apply(&self, new: Config) -> config::Reload {
        let sh = &self.0;
        let r = sh.cfg().reload(new);
        sh.binds_reset
            .store(binds_reset(&r.cfg), std::sync::atomic::Ordering::Relaxed);
        *sh.cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(r.cfg.clone());
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
    pub(super) fn cfg(&self) -> Arc<Config> {
        self.cfg
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn journal(&self, record: &JournalLine<'_>) {
        if let Some(j) = &self.journal {
            let mut line = serde_json::to_vec(record).expect("records serialize");
            line.push(b'\n');
            let mut f = j.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = f.write_all(&line) {
                warn!("journal write failed: {e}");
            }
        }
    }

    pub(super) fn act(&self, a: Action) {
        match a.result {
            ActionResult::Verdict(Health::Clean)
            | ActionResult::NothingToDo
            | ActionResult::DryRun => {
                info!(bdf = %a.bdf, trigger = ?a.trigger, "{}: {}", a.result, a.detail);
            }
            _ => warn!(bdf = %a.bdf, trigger = ?a.trigger, "{}: {}", a.result, a.detail),
        }
        self.journal(&JournalLine::Action {
            mono_ns: crate::probes::mono_ns(),
            action: &a,
        });
        let _ = self.actions.send(a);
    }

    /// Changes the published status, then writes it out and tells systemd.
    pub(super) fn publish(&self, change: impl FnOnce(&mut AgentStatus)) {
        change(
            &mut self
                .status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.write_status();
    }

    /// Writes the status as it is now (a late write writes the latest state, never an older
    /// one) and tells systemd.
    pub(super) fn write_status(&self) {
        let mut st = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.heartbeat_ms = now_ms();
        if let Err(e) = st.save(&self.host.run_dir) {
            warn!("agent status: {e}");
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&st.line())]);
    }

    /// The device's latest verdict, for the metrics and the published status.
    pub(super) fn verdict(&self, bdf: Bdf, health: Health, detail: &str) {
        self.metrics
            .verdict(&bdf.to_string(), health == Health::Clean);
        self.publish(|st| {
            let c = st.cards.entry(bdf).or_default();
            (c.health, c.detail, c.ts_ms) = (Some(health), detail.to_string(), now_ms());
            c.gave_up &= health != Health::Clean;
        });
    }

    /// A target's description, for `device_info`.
    pub(super) fn describe(&self, t: &session::Target) {
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
    pub(super) fn opened(&self, bdf: Bdf, comm: &str) {
        let detail = format!("opened by {comm}; not verified since");
        self.publish(|st| {
            let c = st.cards.entry(bdf).or_default();
            (c.health, c.detail, c.ts_ms) = (None, detail, now_ms());
        });
    }

    pub(super) fn gave_up(&self, bdf: Bdf) {
        self.metrics.gave_up(&bdf.to_string());
        self.publish(|st| st.cards.entry(bdf).or_default().gave_up = true);
    }

    /// A check or reset of the device runs (`busy`) or ended. The start is written from the
    /// blocking pool, so the session does not wait for the file; the end at once.
    pub(super) fn busy(self: &Arc<Self>, bdf: Bdf, busy: bool) {
        if !busy {
            return self.publish(|st| st.cards.entry(bdf).or_default().busy = false);
        }
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cards
            .entry(bdf)
            .or_default()
            .busy = true;
        let sh = self.clone();
        tokio::task::spawn_blocking(move || sh.write_status());
    }

    pub(super) fn history(&self, bdf: Bdf) -> policy::History {
        let s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.devices.get(&bdf.to_string()).cloned().unwrap_or_default()
    }

    pub(super) fn record(&self, bdf: Bdf, clean: bool, verdict: &str) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let h = s.devices.entry(bdf.to_string()).or_default();
        policy::record(&self.cfg(), h, clean, verdict, now_ms());
        if let Err(e) = s.save(&self.cfg().state_file) {
            warn!("{e}");
        }
    }

    pub(super) fn is_target(&self, bdf: Bdf, vendor: u16, device: u16) -> bool {
        self.cfg().acts_on(bdf, vendor, device)
    }

    /// The device's settings, `[[device]]` rules matched against its current IDs.
    pub(super) fn device_cfg(&self, bdf: Bdf) -> crate::config::DeviceConfig {
        let ids = self.host.sysfs.device(bdf).and_then(|d| d.ids()).ok();
        self.cfg().device_with_ids(bdf, ids)
    }

    /// Explicit profiles by address and by `[[device]]` rule, for the devices present now.
    pub(super) fn overrides(&self) -> Vec<(Bdf, String, Option<u8>)> {
        self.cfg().overrides(&self.host.sysfs.present_ids())
    }
}
