//! Why a card cannot be power-cycled, and what failed in a cycle that began.
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;
use crate::bdf::Bdf;

/// Why a card cannot be power-cycled here; nothing was changed.
#[derive(Debug)]
pub enum NoCycle {
    /// The card is on the root bus: no port above it.
    RootBus,
    /// The port's sysfs directory cannot be listed (for its other functions).
    PortUnreadable {
        /// The port's directory.
        dir: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// Other functions below the port would lose power with the card.
    NotAlone {
        /// The port.
        port: Bdf,
        /// The other functions.
        others: Vec<Bdf>,
    },
    /// `--method slot` without a hotplug slot that has a `power` file.
    NoSlot,
    /// Neither a slot's power nor the port's ACPI power resources.
    NoPowerControl {
        /// The port.
        port: Bdf,
    },
    /// Another cycle holds the host-wide autoprobe lock.
    AnotherCycle(PathBuf),
    /// A killed cycle's record that cannot be restored first.
    Leftover {
        /// The record.
        path: PathBuf,
        /// Why it cannot be restored.
        err: Box<Error>,
    },
}

impl std::fmt::Display for NoCycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoCycle::RootBus => {
                f.write_str("on the root bus: there is no port whose power could be cut")
            }
            NoCycle::PortUnreadable { dir, err } => write!(f, "{}: {err}", dir.display()),
            NoCycle::NotAlone { port, others } => {
                let others: Vec<String> = others.iter().map(Bdf::to_string).collect();
                write!(
                    f,
                    "it is not alone below its port {port}: {} would lose power too; never power-cycled",
                    others.join(" ")
                )
            }
            NoCycle::NoSlot => f.write_str("no hotplug slot with power control for it"),
            NoCycle::NoPowerControl { port } => write!(
                f,
                "no slot power control and no ACPI power resources (_PR3) for port {port}: this host cannot cut the slot's power from user space; power-cycle the host"
            ),
            NoCycle::AnotherCycle(lock) => write!(
                f,
                "another power cycle holds {} (drivers_autoprobe is bus-wide: one cycle at a time); wait for it to finish",
                lock.display()
            ),
            NoCycle::Leftover { path, err } => write!(
                f,
                "{} (left by a killed power cycle) must be restored first, drivers_autoprobe may be 0 from it: {err}",
                path.display()
            ),
        }
    }
}

/// One step of a cycle that failed.
#[derive(Debug)]
pub enum Failure {
    /// A wait that ran out.
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        limit: Duration,
    },
    /// A sysfs read or write.
    Sysfs(Box<Error>),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Sysfs(Box::new(e))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout { what, limit } => write!(f, "{what}: not within {limit:?}"),
            Failure::Sysfs(e) => write!(f, "{e}"),
        }
    }
}

/// A cycle that failed once it began: what failed (every setting a restore could not put
/// back), and what the best-effort bring-back did.
#[derive(Debug)]
pub struct CycleFailure {
    /// The record being restored, when it is a killed cycle's.
    pub restoring: Option<PathBuf>,
    /// Each step that failed.
    pub failures: Vec<Failure>,
    /// The bring-back's steps, when it ran.
    pub brought_back: Option<Vec<String>>,
}

impl std::fmt::Display for CycleFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.restoring {
            write!(f, "restoring {}: ", p.display())?;
        }
        f.write_str(&joined(&self.failures))?;
        if let Some(said) = &self.brought_back {
            write!(f, "; brought back: {}", said.join("; "))?;
        }
        Ok(())
    }
}

/// Failures as one sentence.
pub(super) fn joined(failures: &[Failure]) -> String {
    let each: Vec<String> = failures.iter().map(Failure::to_string).collect();
    each.join("; ")
}
