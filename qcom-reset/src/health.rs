//! `qcom-reset health`: a read-only answer for monitoring, hooks' pre-checks and fleet tooling
//! (node-problem-detector's custom-plugin contract). It reads the running agent's published
//! status and sysfs; it takes no lock, opens no VFIO group, writes nothing, and reads a card's
//! config space only when the card is awake and nobody else has it (a read of a
//! runtime-suspended card's config space would resume it). Without root it cannot see QEMU's
//! open files, so a card in use by a VM is judged by the agent's word alone.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::agent::status::{AgentStatus, STALE_AFTER};
use crate::bdf::Bdf;
use crate::config::Config;
use crate::device::verdict::Health;
use crate::exit::Condition;
use crate::host::Host;
use crate::session::{self, Target};

/// What `health`'s exit statuses mean, for `--help`.
pub const EXIT_HELP: &str = "Exit status (node-problem-detector's custom-plugin convention):
    0  every card is clean or in use by a VM, and the agent runs with its probes attached
    1  a problem: a card is not clean (or off the link), or the agent gave up on it
    2  unknown: the agent is not running, is blind (a probe not attached) or has not checked a
       card yet; or health could not be read
One line of message on stdout (NPD shows it); --json gives the whole answer.";

/// What `health` answers: the worst condition, the agent's, and each card's.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    /// The worst of the agent's and the cards' conditions.
    pub condition: Condition,
    /// The agent's state.
    pub agent: Agent,
    /// Each card's health.
    pub cards: BTreeMap<Bdf, CardHealth>,
}

/// The agent's state, as its published status shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Agent {
    /// Running and publishing.
    Running {
        /// Its process.
        pid: u32,
        /// Its start-up checks are done.
        ready: bool,
        /// Probes that are not attached (the agent does not see those calls).
        not_attached: Vec<String>,
    },
    /// No agent publishes its status (not running, or stopped cleanly).
    NotRunning,
    /// The last status is older than `STALE_AFTER`, or its process is gone.
    Stale {
        /// Its process.
        pid: u32,
        /// How old its last status is, in s.
        age_s: u64,
    },
}

/// One card's health.
#[derive(Clone, Debug, Serialize)]
pub struct CardHealth {
    /// Its condition.
    pub condition: Condition,
    /// Its profile.
    pub profile: &'static str,
    /// What decided the condition, in words.
    pub why: String,
    /// The agent's last verdict, if it has one.
    pub verdict: Option<Health>,
}

/// The health of `only` (every card the agent acts on under `cfg` when empty) as of `now_ms`.
pub fn assess(host: &Host, cfg: &Config, only: &[Bdf], now_ms: u64) -> crate::Result<Answer> {
    let published = AgentStatus::load(&host.run_dir)?;
    let agent = agent_state(host, published.as_ref(), now_ms);
    let overrides = cfg.overrides(&host.sysfs.present_ids());
    let targets: Vec<Target> = if only.is_empty() {
        session::targets(host, &overrides)?
            .into_iter()
            .filter(|t| cfg.acts_on(t.bdf, t.vendor, t.device))
            .filter(|t| cfg.device(t.bdf).enabled != Some(false))
            .collect()
    } else {
        only.iter()
            .map(|b| {
                let o = overrides.iter().find(|o| o.0 == *b);
                session::inspect(host, *b, o.map(|o| o.1.as_str()), o.and_then(|o| o.2))
            })
            .collect::<crate::Result<_>>()?
    };
    let cards = published
        .as_ref()
        .filter(|_| matches!(agent, Agent::Running { .. }))
        .map(|p| &p.cards);
    let cards: BTreeMap<Bdf, CardHealth> = targets
        .iter()
        .map(|t| (t.bdf, card(t, cards.and_then(|c| c.get(&t.bdf)))))
        .collect();
    let own = match &agent {
        Agent::Running { not_attached, .. } if not_attached.is_empty() => Condition::Ok,
        _ => Condition::Unknown,
    };
    let condition = cards.values().fold(own, |c, h| c.and(h.condition));
    Ok(Answer {
        condition,
        agent,
        cards,
    })
}

fn agent_state(host: &Host, p: Option<&AgentStatus>, now_ms: u64) -> Agent {
    let Some(p) = p else {
        return Agent::NotRunning;
    };
    let age = Duration::from_millis(now_ms.saturating_sub(p.heartbeat_ms));
    let alive = host.proc_root.join(p.pid.to_string()).exists();
    if age > STALE_AFTER || !alive {
        return Agent::Stale {
            pid: p.pid,
            age_s: age.as_secs(),
        };
    }
    Agent::Running {
        pid: p.pid,
        ready: p.ready,
        not_attached: p
            .probes
            .iter()
            .filter(|(_, a)| !**a)
            .map(|(f, _)| f.clone())
            .collect(),
    }
}

/// One card: what sysfs shows now first (in use, a host driver's, off the link), then the
/// agent's last verdict.
fn card(t: &Target, published: Option<&crate::agent::status::Card>) -> CardHealth {
    let verdict = published.and_then(|c| c.health);
    let answer = |condition, why: String| CardHealth {
        condition,
        profile: t.profile.name,
        why,
        verdict,
    };
    // Who has the card first: its config space is theirs then, and is not read.
    if let Some(h) = t.holders.first() {
        return answer(Condition::Ok, format!("in use by {h}"));
    }
    if let Some(d) = t.driver.as_deref().filter(|d| *d != "vfio-pci") {
        return answer(
            Condition::Ok,
            format!("owned by the host driver {d} (reset when it is handed to vfio-pci)"),
        );
    }
    if published.is_some_and(|c| c.busy) {
        return answer(Condition::Ok, "being checked or reset by the agent".into());
    }
    if awake(t) && config_all_ones(t) {
        return answer(
            Condition::Problem,
            "config space reads all-ones: off the link (`qcom-reset power-cycle`)".into(),
        );
    }
    match published {
        Some(c) if c.gave_up => answer(
            Condition::Problem,
            format!(
                "the agent gave up after failed resets ({})",
                verdict.map_or("?".into(), |h| h.to_string())
            ),
        ),
        Some(c) => match c.health {
            Some(Health::Clean) => answer(Condition::Ok, "clean".into()),
            Some(h) => answer(Condition::Problem, format!("{h}: {}", c.detail)),
            None if c.detail.is_empty() => {
                answer(Condition::Unknown, "not checked by the agent yet".into())
            }
            None => answer(Condition::Unknown, c.detail.clone()),
        },
        None => answer(Condition::Unknown, "no verdict from a running agent".into()),
    }
}

/// Whether the card is runtime-active: only then is a config read free of side effects.
fn awake(t: &Target) -> bool {
    std::fs::read_to_string(t.dev.path("power/runtime_status")).is_ok_and(|s| s.trim() == "active")
}

/// The first dword of config space through sysfs (a read; sysfs serves it from the device).
fn config_all_ones(t: &Target) -> bool {
    use std::io::Read as _;
    let mut b = [0u8; 4];
    std::fs::File::open(t.dev.path("config"))
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok_and(|()| b == [0xff; 4])
}

impl Answer {
    /// The one line NPD shows: the condition and each card that is not fine, or "ok".
    pub fn line(&self) -> String {
        let agent = match &self.agent {
            Agent::Running { not_attached, .. } if !not_attached.is_empty() => {
                format!("agent blind: not attached: {}", not_attached.join(", "))
            }
            Agent::Running { ready: false, .. } => "agent starting".into(),
            Agent::Running { .. } => "agent running".into(),
            Agent::NotRunning => "agent not running (`systemctl start qcom-reset`)".into(),
            Agent::Stale { pid, age_s } => {
                format!("agent gone (pid {pid}, last status {age_s} s ago)")
            }
        };
        let cards: Vec<String> = self
            .cards
            .iter()
            .map(|(b, c)| format!("{b} {}: {}", c.profile, c.why))
            .collect();
        let cards = if cards.is_empty() {
            "no target cards".to_string()
        } else {
            cards.join("; ")
        };
        let word = match self.condition {
            Condition::Ok => "ok",
            Condition::Problem => "PROBLEM",
            Condition::Unknown => "UNKNOWN",
        };
        format!("{word}: {agent}; {cards}")
    }
}
