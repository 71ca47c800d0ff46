//! Exit statuses: one per outcome, stable, so hooks and fleet tooling can tell "the card is not
//! clean" from "refused, nothing written" and from a usage error. The man pages' EXIT STATUS
//! section and docs/operations.md are generated from / checked against `Exit::ALL`.
use crate::Error;

/// How a `qcom-reset` command ended (`health` has its own, node-problem-detector's: see
/// `Condition`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The card is clean, or there was nothing to do.
    Ok,
    /// An error: I/O, the card vanished, a reset failed part-way.
    Error,
    /// A usage error (clap's own code).
    Usage,
    /// The reset ran and the card is not clean afterwards (stale, crashed, not-ready, link-down,
    /// wrong identity).
    NotClean,
    /// Refused, nothing written: not a target, a host driver owns it, DPC, the port guard.
    Refused,
    /// The host cannot do it: no usable probes (kernel features, lockdown), kernel too old.
    Unavailable,
    /// Busy, nothing written: a VM or another qcom-reset holds the card; try again later.
    Busy,
    /// Needs root.
    NoPermission,
    /// The configuration is invalid or unreadable.
    Config,
    /// `health`'s answer, with its own codes.
    Health(Condition),
}

/// What 128+N means, wherever the exit statuses are listed.
pub const SIGNALLED: &str = "interrupted by signal N (the device was restored first)";

impl Exit {
    /// Every fixed exit status, for `--help` and the man page (`health`'s own are apart).
    pub const ALL: [Exit; 9] = [
        Exit::Ok,
        Exit::Error,
        Exit::Usage,
        Exit::NotClean,
        Exit::Refused,
        Exit::Unavailable,
        Exit::Busy,
        Exit::NoPermission,
        Exit::Config,
    ];

    /// sysexits(3) where one fits (69, 75, 77, 78); 2 stays clap's.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Error => 1,
            Exit::Usage => 2,
            Exit::NotClean => 3,
            Exit::Refused => 4,
            Exit::Unavailable => 69,
            Exit::Busy => 75,
            Exit::NoPermission => 77,
            Exit::Config => 78,
            Exit::Health(c) => c as u8,
        }
    }

    /// The name `--json` errors carry.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Error => "error",
            Exit::Usage => "usage",
            Exit::NotClean => "not-clean",
            Exit::Refused => "refused",
            Exit::Unavailable => "unavailable",
            Exit::Busy => "busy",
            Exit::NoPermission => "no-permission",
            Exit::Config => "config",
            Exit::Health(_) => "health",
        }
    }

    /// What the status means, in a sentence.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "the card is clean, or there was nothing to do",
            Exit::Error => "an error: I/O, the card vanished, a reset failed part-way",
            Exit::Usage => "usage error (unknown option, malformed argument)",
            Exit::NotClean => {
                "the reset ran and the card is not clean afterwards (stale, crashed, not-ready, link-down, wrong identity)"
            }
            Exit::Refused => {
                "refused, nothing written: not a target, a host driver owns the card, DPC, the port guard"
            }
            Exit::Unavailable => {
                "the host cannot trace (kernel features, lockdown) or its kernel is too old"
            }
            Exit::Busy => {
                "busy, nothing written: a VM or another qcom-reset holds the card; try again later"
            }
            Exit::NoPermission => "needs root",
            Exit::Config => "the configuration is invalid or unreadable",
            Exit::Health(_) => "health's answer (see `qcom-reset health --help`)",
        }
    }

    /// The outcome a library error stands for.
    pub fn of(e: &Error) -> Exit {
        use Error::*;
        match e {
            Held { .. } | HeldBySession { .. } | Busy { .. } => Exit::Busy,
            NotTarget { .. }
            | NoSuchDevice(..)
            | Experimental { .. }
            | PortGuard { .. }
            | Dpc { .. }
            | WrongDriver { .. }
            | UnknownProfile(_)
            | RecordWaits { .. }
            | PciehpPolls { .. }
            | NoPowerCycle { .. } => Exit::Refused,
            NotRoot => Exit::NoPermission,
            _ => Exit::Error,
        }
    }

    /// The EXIT STATUS text of the man pages and `--help`.
    pub fn table() -> String {
        let mut s = String::from("Exit status:\n");
        for e in Exit::ALL {
            s.push_str(&format!("  {:>3}  {}\n", e.code(), e.meaning()));
        }
        s.push_str(&format!("  128+N  {SIGNALLED}\n"));
        s
    }
}

/// `qcom-reset health`'s answer and exit status: node-problem-detector's custom-plugin
/// convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    /// Every card is clean or in use, and the agent runs with its probes attached.
    Ok = 0,
    /// A card is not clean, or the agent gave up on one.
    Problem = 1,
    /// Not known: the agent is not running or is blind, or a card has no verdict yet.
    Unknown = 2,
}

impl Condition {
    /// Two findings as one: a problem outweighs not knowing, not knowing outweighs fine.
    pub fn and(self, other: Condition) -> Condition {
        use Condition::*;
        match (self, other) {
            (Problem, _) | (_, Problem) => Problem,
            (Unknown, _) | (_, Unknown) => Unknown,
            (Ok, Ok) => Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_leave_clap_its_2() {
        let mut codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Exit::ALL.len());
        assert_eq!(Exit::Usage.code(), 2);
        assert_ne!(Exit::NotClean.code(), Exit::Refused.code());
    }

    #[test]
    fn refusals_busy_and_errors_are_told_apart() {
        let bdf: crate::bdf::Bdf = "0000:03:00.0".parse().unwrap();
        let held = Error::Held {
            bdf,
            holder: "pid 1".into(),
        };
        let driver = Error::WrongDriver {
            bdf,
            driver: "ath11k_pci".into(),
        };
        let gone = Error::SysfsRead {
            path: "/x".into(),
            err: std::io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert_eq!(Exit::of(&held), Exit::Busy);
        assert_eq!(Exit::of(&driver), Exit::Refused);
        assert_eq!(Exit::of(&gone), Exit::Error);
        assert_eq!(Exit::of(&Error::NotRoot), Exit::NoPermission);
    }

    /// The unit does not restart what a restart cannot fix: the codes in its
    /// RestartPreventExitStatus= are ours for configuration, root and an untraceable kernel.
    #[test]
    fn the_unit_does_not_restart_what_a_restart_cannot_fix() {
        let unit = include_str!("../../dist/qcom-reset.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
            .expect("RestartPreventExitStatus=");
        let mut got: Vec<u8> = line.split(' ').map(|c| c.parse().unwrap()).collect();
        got.sort();
        let mut want: Vec<u8> = [Exit::Unavailable, Exit::NoPermission, Exit::Config]
            .iter()
            .map(|e| e.code())
            .collect();
        want.sort();
        assert_eq!(got, want);
        // An ExecStartPre= failure is not the main process's: systemd would restart it anyway.
        assert!(!unit.lines().any(|l| l.starts_with("ExecStartPre=")));
    }
}
