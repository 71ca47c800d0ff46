//! What the running agent publishes about itself and each card: `run_dir/agent.json` for
//! `qcom-reset health` (read without a lock or a device open) and the one-line `STATUS=` that
//! `systemctl status qcom-reset` shows. Rewritten on every change and at least every
//! `HEARTBEAT`, so a reader can tell a dead agent from an idle one; removed on a clean stop.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bdf::Bdf;
use crate::device::verdict::Health;

/// How often an idle agent rewrites the file (and the metrics textfile's timestamp).
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A heartbeat older than this means the agent is gone (three missed beats).
pub const STALE_AFTER: Duration = Duration::from_secs(90);

/// What the agent publishes in `<run_dir>/agent.json` for `health` and `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's pid.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// It writes nothing (`--observe-only`).
    pub observe_only: bool,
    /// Unix time, ms.
    pub started_ms: u64,
    /// Unix time of the last rewrite, ms.
    pub heartbeat_ms: u64,
    /// The start-up recovery and checks are done (systemd was told READY=1).
    pub ready: bool,
    /// Each probe's function and whether it is attached.
    pub probes: BTreeMap<String, bool>,
    /// Each card's last word.
    pub cards: BTreeMap<Bdf, Card>,
}

/// The agent's last word on one card.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Card {
    /// The last verdict (a check or a reset); none before the first.
    pub health: Option<Health>,
    /// Why, in a sentence.
    pub detail: String,
    /// Unix time of the verdict, ms.
    pub ts_ms: u64,
    /// `max_attempts` resets failed: no attempt until the cool-down ends.
    pub gave_up: bool,
    /// A check or reset is running.
    pub busy: bool,
}

impl AgentStatus {
    /// The file, in `run_dir`.
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("agent.json")
    }

    /// The published status; none when no agent runs (or it stopped cleanly).
    pub fn load(run_dir: &Path) -> crate::Result<Option<AgentStatus>> {
        crate::session::record::fetch(&Self::path(run_dir)).map_err(|e| match e {
            crate::Error::BadRecord { path, why } => crate::Error::AgentStatus { path, why },
            e => e,
        })
    }

    /// Readable by all (`health` needs no root; nothing in it is secret), and not fsynced: it
    /// lives in /run, is rewritten every 30 s and means nothing after a reboot.
    pub fn save(&self, run_dir: &Path) -> crate::Result<()> {
        let text = serde_json::to_vec(self).expect("the status serializes");
        crate::session::record::write_atomically(
            &Self::path(run_dir),
            &text,
            0o644,
            crate::session::record::Durability::Rename,
        )
    }

    /// Whether the probes the agent needs are all attached (none known yet: not blind).
    pub fn blind(&self) -> bool {
        self.probes.values().any(|attached| !attached)
    }

    /// systemd's `STATUS=`: one line, every card.
    pub fn line(&self) -> String {
        let mut s = if self.ready {
            String::new()
        } else {
            "start-up checks; ".into()
        };
        if self.blind() {
            let missing: Vec<&str> = self
                .probes
                .iter()
                .filter(|(_, a)| !**a)
                .map(|(f, _)| f.as_str())
                .collect();
            s.push_str(&format!("BLIND (not attached: {}); ", missing.join(", ")));
        }
        if self.cards.is_empty() {
            s.push_str("no target cards seen");
        }
        let cards: Vec<String> = self
            .cards
            .iter()
            .map(|(bdf, c)| {
                let state = match (c.busy, c.gave_up, c.health) {
                    (true, _, _) => "checking".to_string(),
                    (_, true, h) => {
                        format!("gave up ({})", h.map_or("?".into(), |h| h.to_string()))
                    }
                    (_, _, Some(h)) => h.to_string(),
                    (_, _, None) => "not checked yet".into(),
                };
                format!("{bdf} {state}")
            })
            .collect();
        s.push_str(&cards.join(", "));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_every_card_and_a_blind_probe() {
        let mut s = AgentStatus {
            ready: true,
            ..Default::default()
        };
        assert_eq!(s.line(), "no target cards seen");
        s.probes.insert("vfio_pci_core_disable".into(), true);
        s.probes.insert("pci_reset_function".into(), false);
        let bdf = |t: &str| t.parse::<Bdf>().unwrap();
        s.cards.insert(
            bdf("0000:03:00.0"),
            Card {
                health: Some(Health::Clean),
                ..Default::default()
            },
        );
        s.cards.insert(
            bdf("0000:04:00.0"),
            Card {
                health: Some(Health::Crashed),
                gave_up: true,
                ..Default::default()
            },
        );
        assert_eq!(
            s.line(),
            "BLIND (not attached: pci_reset_function); 0000:03:00.0 clean, 0000:04:00.0 gave up (crashed)"
        );
    }

    #[test]
    fn the_file_round_trips_and_a_torn_one_is_an_error_naming_the_fix() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(AgentStatus::load(t.path()).unwrap(), None);
        let mut s = AgentStatus {
            pid: 7,
            ..Default::default()
        };
        s.cards
            .insert("0000:03:00.0".parse().unwrap(), Card::default());
        s.save(t.path()).unwrap();
        assert_eq!(AgentStatus::load(t.path()).unwrap(), Some(s));
        std::fs::write(AgentStatus::path(t.path()), "{\"pid\": 7, \"car").unwrap();
        let e = AgentStatus::load(t.path()).unwrap_err().to_string();
        assert!(e.contains("systemctl restart qcom-reset"), "{e}");
    }
}
