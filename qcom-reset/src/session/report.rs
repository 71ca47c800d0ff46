//! What a reset did (or, a dry run, would do): one record for `reset --json`, the journal and
//! the hooks, whose JSON keeps one shape for both.
use serde::Serialize;

use crate::bdf::Bdf;
use crate::device::Family;
use crate::device::regio::Op;
use crate::device::sequence::Outcome;
use crate::device::verdict::Verdict;

use super::guard::Restored;
use super::port::PortState;
use super::step::Step;

/// How the card was reset, as `method` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Our replay of the reviewed register sequence through the BAR.
    RegisterSequence,
    /// The kernel's own `device_specific` reset through sysfs `reset`.
    KernelDeviceSpecific,
    /// Nothing touched; `plan` lists what would be done.
    DryRun,
}

/// What one reset of one card did, or (a dry run) would do.
#[derive(Clone, Debug)]
pub struct Report {
    /// The card.
    pub bdf: Bdf,
    /// The profile it was reset as.
    pub profile: &'static str,
    /// Its reset family.
    pub family: Family,
    /// The sequence's version.
    pub sequence_version: &'static str,
    /// How the registers were reached: sysfs, vfio, or none (a dry run).
    pub access: &'static str,
    /// Register operations of the sequence, in order (for dry runs: those it would do).
    pub ops: Vec<Op>,
    /// The upstream port as the reset found it (what was masked is in `restored.port`).
    pub port: Option<PortState>,
    /// Whether it was reset, and what came of it.
    pub ran: Ran,
}

/// Whether the card was reset.
#[derive(Clone, Debug)]
pub enum Ran {
    /// It was reset and verified.
    Reset(Box<Reset>),
    /// Nothing touched: the sequence's outcome against a card that answers as a healthy one
    /// would, and every step.
    DryRun {
        /// How the sequence ended against the pretend card (none where the kernel would reset).
        outcome: Option<Outcome>,
        /// Every step it would take, register operations included.
        plan: Vec<Step>,
    },
}

/// A reset that ran, and its verification.
#[derive(Clone, Debug)]
pub struct Reset {
    /// Ours or the kernel's (never [`Method::DryRun`]).
    pub kernel: bool,
    /// How our sequence ended; none when the kernel reset the card or it was off the link.
    pub outcome: Option<Outcome>,
    /// The verification's verdict.
    pub verdict: Verdict,
    /// What the session put back.
    pub restored: Restored,
    /// What a killed qcom-reset had left on this device and this run put back first.
    pub recovered: Option<Restored>,
    /// From the lock to the restore, in ms.
    pub duration_ms: u64,
    /// Where `duration_ms` went.
    pub phases: Phases,
    /// Every step the session took, in the dry run's words; the register operations are `ops`.
    pub steps: Vec<Step>,
}

/// Where a reset's time went, in µs: what the card needed (the sequence and its verification)
/// against what qcom-reset added around it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Phases {
    /// Owning the card: the VFIO group, the driver hold, the crash record, the saved config space
    /// (in a check that then resets, the check's reads too).
    pub own_us: u64,
    /// The upstream port: its lock and state, masking its link-drop reports.
    pub guard_us: u64,
    /// The register sequence (or the kernel's reset), its delays included.
    pub sequence_us: u64,
    /// Verification, until the verdict.
    pub verify_us: u64,
    /// Putting back what the session changed.
    pub restore_us: u64,
}

impl Report {
    /// How the card was reset, as `method` says it.
    pub fn method(&self) -> Method {
        match &self.ran {
            Ran::Reset(r) if r.kernel => Method::KernelDeviceSpecific,
            Ran::Reset(_) => Method::RegisterSequence,
            Ran::DryRun { .. } => Method::DryRun,
        }
    }

    /// The reset, when one ran.
    pub fn reset(&self) -> Option<&Reset> {
        match &self.ran {
            Ran::Reset(r) => Some(r),
            Ran::DryRun { .. } => None,
        }
    }

    /// The verdict, when a reset ran.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.reset().map(|r| &r.verdict)
    }

    /// How the sequence ended (a dry run's: against the pretend card).
    pub fn outcome(&self) -> Option<Outcome> {
        match &self.ran {
            Ran::Reset(r) => r.outcome,
            Ran::DryRun { outcome, .. } => *outcome,
        }
    }

    /// A dry run's steps (none for a reset that ran).
    pub fn plan(&self) -> &[Step] {
        match &self.ran {
            Ran::Reset(_) => &[],
            Ran::DryRun { plan, .. } => plan,
        }
    }
}

/// The flat shape `reset --json`, the journal and the hooks have always read: a dry run has a
/// `plan`, a null `verdict`, nothing restored and no time.
impl Serialize for Report {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let none = Restored::default();
        let (restored, recovered, duration_ms, phases, steps) = match &self.ran {
            Ran::Reset(r) => (
                &r.restored,
                r.recovered.as_ref(),
                r.duration_ms,
                r.phases,
                &r.steps[..],
            ),
            Ran::DryRun { .. } => (&none, None, 0, Phases::default(), &[][..]),
        };
        let mut st = s.serialize_struct("Report", 16)?;
        st.serialize_field("bdf", &self.bdf)?;
        st.serialize_field("profile", self.profile)?;
        st.serialize_field("family", &self.family)?;
        st.serialize_field("sequence_version", self.sequence_version)?;
        st.serialize_field("method", &self.method())?;
        st.serialize_field("access", self.access)?;
        st.serialize_field("outcome", &self.outcome())?;
        st.serialize_field("verdict", &self.verdict())?;
        st.serialize_field("ops", &self.ops)?;
        st.serialize_field("plan", self.plan())?;
        st.serialize_field("steps", steps)?;
        st.serialize_field("restored", restored)?;
        match recovered {
            Some(r) => st.serialize_field("recovered", r)?,
            None => st.skip_field("recovered")?,
        }
        match &self.port {
            Some(p) => st.serialize_field("port", p)?,
            None => st.skip_field("port")?,
        }
        st.serialize_field("duration_ms", &duration_ms)?;
        st.serialize_field("phases", &phases)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::verdict::{Health, Registers};

    fn report(ran: Ran) -> Report {
        Report {
            bdf: "0000:03:00.0".parse().unwrap(),
            profile: "wcn6855",
            family: Family::Wlan,
            sequence_version: "wlan-v1",
            access: "sysfs",
            ops: Vec::new(),
            port: None,
            ran,
        }
    }

    /// The JSON keeps the keys readers have always had, whichever way the reset went.
    #[test]
    fn both_kinds_serialize_to_the_one_flat_shape() {
        let dry = serde_json::to_value(report(Ran::DryRun {
            outcome: Some(Outcome::Completed),
            plan: vec![Step::Lock("0000:03:00.0".parse().unwrap())],
        }))
        .unwrap();
        assert_eq!(dry["method"], "dry-run");
        assert_eq!(dry["verdict"], serde_json::Value::Null);
        assert_eq!(dry["plan"][0], "lock 0000:03:00.0");
        assert_eq!(dry["duration_ms"], 0);
        assert!(dry.get("recovered").is_none() && dry.get("port").is_none());
        let done = report(Ran::Reset(Box::new(Reset {
            kernel: true,
            outcome: None,
            verdict: Verdict {
                health: Health::Clean,
                expected: "MHI READY",
                detail: "ready".into(),
                registers: Registers::default(),
            },
            restored: Restored::default(),
            recovered: Some(Restored::default()),
            duration_ms: 42,
            phases: Phases::default(),
            steps: vec![Step::KernelReset],
        })));
        assert_eq!(done.method(), Method::KernelDeviceSpecific);
        let json = serde_json::to_value(&done).unwrap();
        assert_eq!(json["method"], "kernel-device-specific");
        assert_eq!(json["verdict"]["health"], "clean");
        assert_eq!(json["duration_ms"], 42);
        assert_eq!(json["plan"], serde_json::json!([]));
        assert!(json.get("recovered").is_some(), "{json}");
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(json["steps"], serde_json::json!(["sysfs reset <- 1"]));
        assert_eq!(keys.len(), 15, "{keys:?}");
    }
}
