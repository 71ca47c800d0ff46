//! When the agent may act on a device: kill switch, per-device enable, exponential backoff
//! between failed attempts, and a cool-down after too many. Pure functions of the configuration,
//! the device's history and the time, so they are tested without any device.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// What happened to a device so far; persisted in the state file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Failed attempts since the last clean verdict (or the last cool-down end).
    pub failures: u32,
    /// Unix time of the last attempt, in ms.
    pub last_attempt_ms: Option<u64>,
    /// The last verdict's name.
    pub last_verdict: Option<String>,
    /// Attempts ever.
    pub total_attempts: u64,
}

/// Whether the agent acts on a card now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Act,
    /// Try again after this long (backoff).
    Wait(Duration),
    /// Not now, and why.
    Skip(Skip),
}

/// Why the agent does not act on a card now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The kill switch file is present.
    KillSwitch(std::path::PathBuf),
    /// `enabled = false` for the card.
    Disabled,
    /// `max_attempts` failures in a row; the cool-down has `left_s` seconds to go.
    GaveUp {
        /// Failures in a row.
        failures: u32,
        /// Seconds left.
        left_s: u64,
    },
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::KillSwitch(p) => write!(f, "kill switch {} is present", p.display()),
            Skip::Disabled => f.write_str("disabled in the configuration"),
            Skip::GaveUp { failures, left_s } => write!(
                f,
                "gave up after {failures} failed attempts; cool-down ends in {left_s} s"
            ),
        }
    }
}

/// What stops every action, whatever the history.
pub struct Gate {
    /// The kill switch file is present.
    pub kill_switch_on: bool,
    /// The card is enabled in the configuration.
    pub enabled: bool,
}

/// Whether to act on a card with history `h` at `now_ms`.
pub fn decide(cfg: &Config, gate: &Gate, h: &History, now_ms: u64) -> Decision {
    if gate.kill_switch_on {
        return Decision::Skip(Skip::KillSwitch(cfg.kill_switch.clone()));
    }
    if !gate.enabled {
        return Decision::Skip(Skip::Disabled);
    }
    let Some(last) = h.last_attempt_ms else {
        return Decision::Act;
    };
    let since = now_ms.saturating_sub(last);
    if h.failures >= cfg.max_attempts {
        let cooldown = cfg.cooldown_s * 1000;
        return if since >= cooldown {
            Decision::Act
        } else {
            Decision::Skip(Skip::GaveUp {
                failures: h.failures,
                left_s: (cooldown - since).div_ceil(1000),
            })
        };
    }
    if h.failures == 0 {
        return Decision::Act;
    }
    let backoff = cfg.backoff_ms.saturating_mul(1 << (h.failures - 1).min(16));
    if since >= backoff {
        Decision::Act
    } else {
        Decision::Wait(Duration::from_millis(backoff - since))
    }
}

/// Records an attempt's result. A cool-down that has ended starts a fresh count.
pub fn record(cfg: &Config, h: &mut History, clean: bool, verdict: &str, now_ms: u64) {
    if h.failures >= cfg.max_attempts {
        h.failures = 0;
    }
    h.total_attempts += 1;
    h.last_attempt_ms = Some(now_ms);
    h.last_verdict = Some(verdict.to_string());
    h.failures = if clean { 0 } else { h.failures + 1 };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            max_attempts: 3,
            backoff_ms: 1000,
            cooldown_s: 60,
            ..Config::default()
        }
    }
    const OPEN: Gate = Gate {
        kill_switch_on: false,
        enabled: true,
    };

    #[test]
    fn backoff_doubles_then_cools_down() {
        let c = cfg();
        let mut h = History::default();
        assert_eq!(decide(&c, &OPEN, &h, 0), Decision::Act);
        record(&c, &mut h, false, "crashed", 0);
        assert_eq!(
            decide(&c, &OPEN, &h, 400),
            Decision::Wait(Duration::from_millis(600))
        );
        assert_eq!(decide(&c, &OPEN, &h, 1000), Decision::Act);
        record(&c, &mut h, false, "crashed", 1000);
        assert_eq!(
            decide(&c, &OPEN, &h, 1000),
            Decision::Wait(Duration::from_millis(2000))
        );
        record(&c, &mut h, false, "crashed", 3000);
        let Decision::Skip(why) = decide(&c, &OPEN, &h, 4000) else {
            panic!()
        };
        let why = why.to_string();
        assert!(
            why.contains("gave up after 3") && why.contains("59 s"),
            "{why}"
        );
        assert_eq!(
            decide(&c, &OPEN, &h, 63_000),
            Decision::Act,
            "cool-down over"
        );
        record(&c, &mut h, true, "clean", 63_000);
        assert_eq!((h.failures, h.total_attempts), (0, 4));
    }

    #[test]
    fn kill_switch_and_disable_win() {
        let c = cfg();
        let h = History::default();
        let d = decide(
            &c,
            &Gate {
                kill_switch_on: true,
                enabled: true,
            },
            &h,
            0,
        );
        assert!(matches!(d, Decision::Skip(w) if w.to_string().contains("kill switch")));
        let d = decide(
            &c,
            &Gate {
                kill_switch_on: false,
                enabled: false,
            },
            &h,
            0,
        );
        assert!(matches!(d, Decision::Skip(w) if w.to_string().contains("disabled")));
    }
}
