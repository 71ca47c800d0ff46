//! The journal's action records as the checks read them (docs/operations.md, "The journal"):
//! typed, so a renamed trigger or result, or a report without a field a check needs, fails the
//! parse naming the line instead of comparing with null. The names are written out here, apart
//! from the library's `Trigger`, `ActionResult` and `Health`, on purpose: the lab checks the
//! journal as its readers see it, so a rename in the library fails here instead of changing both
//! sides at once.
use anyhow::Context as _;
use serde::Deserialize;

use crate::vm::scenarios::checks::json_lines;

/// What called for an action (the agent's `Trigger`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Trigger {
    Rescan,
    ResetCall,
    KernelResetCall,
    KernelReset,
    FailedOpen,
    Bind,
    Release,
}

/// What an action came to (the agent's `ActionResult`, a verdict's health among them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Outcome {
    Clean,
    Stale,
    Crashed,
    NotReady,
    LinkDown,
    WrongIdentity,
    NothingToDo,
    DryRun,
    Skipped,
    Held,
    Taken,
    Error,
}

/// How a report's card was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Method {
    RegisterSequence,
    KernelDeviceSpecific,
    DryRun,
}

/// One journaled action.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Action {
    /// Unix time, ms.
    pub ts_ms: u64,
    pub trigger: Trigger,
    pub result: Outcome,
    pub detail: String,
    /// From the event's arrival to the session's start, ms.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    #[serde(default)]
    pub report: Option<Report>,
}

/// The session's report, as far as the checks read it.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Report {
    pub profile: String,
    pub method: Method,
    pub duration_ms: u64,
    /// The sequence's register operations (only their number is checked).
    pub ops: Vec<serde::de::IgnoredAny>,
    /// The upstream port as the reset found it.
    #[serde(default)]
    pub port: Option<PortState>,
    pub restored: Restored,
}

/// The port a report names.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct PortState {
    pub port: Option<String>,
}

/// What a session put back.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Restored {
    pub command: Option<u16>,
    pub power_control: Option<String>,
    /// Config words put back after the link dropped.
    pub config: Vec<String>,
    pub port: Vec<String>,
    pub taken_by: Option<String>,
    pub errors: Vec<String>,
}

impl Action {
    /// The report, which every reset that ran has.
    pub fn report(&self) -> anyhow::Result<&Report> {
        self.report
            .as_ref()
            .with_context(|| format!("the action has no report: {self:?}"))
    }

    /// The reset's method, when a report says it.
    pub fn method(&self) -> Option<Method> {
        self.report.as_ref().map(|r| r.method)
    }
}

/// The journal's actions, in order; a line that is an action but does not parse as one fails.
pub(crate) fn actions(console: &str) -> anyhow::Result<Vec<Action>> {
    json_lines(console, "journal")
        .into_iter()
        .filter(|v| v["type"] == "action")
        .map(|v| {
            serde_json::from_value(v["action"].clone()).with_context(|| {
                format!("a journal action the checks cannot read: {}", v["action"])
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's journal line, as the `loop-wlan` scenario's guest prints it.
    #[test]
    fn a_journaled_reset_reads_with_its_report() {
        let console = "VMLAB-BEGIN journal\n{\"type\":\"action\",\"action\":{\"ts_ms\":1,\"bdf\":\"0000:01:00.0\",\"trigger\":\"release\",\"result\":\"clean\",\"detail\":\"wlan in 108 ms: ready\",\"latency_ms\":13.2,\"report\":{\"bdf\":\"0000:01:00.0\",\"profile\":\"wcn6855\",\"method\":\"register-sequence\",\"duration_ms\":108,\"ops\":[{\"write\":[12296,1]}],\"port\":{\"port\":\"0000:00:1c.0\",\"hotplug_events\":true},\"restored\":{\"command\":6,\"power_control\":\"auto\",\"config\":[],\"port\":[\"0000:00:1c.0 SltCtl 0x1038\"],\"errors\":[]}}}}\n{\"type\":\"event\"}\nVMLAB-END journal\n";
        let acts = actions(console).unwrap();
        assert_eq!(acts.len(), 1);
        let a = &acts[0];
        assert_eq!((a.trigger, a.result), (Trigger::Release, Outcome::Clean));
        assert_eq!(a.method(), Some(Method::RegisterSequence));
        let r = a.report().unwrap();
        assert_eq!(r.restored.power_control.as_deref(), Some("auto"));
        assert_eq!(
            r.port.as_ref().unwrap().port.as_deref(),
            Some("0000:00:1c.0")
        );
        let bad = console.replace("\"result\":\"clean\"", "\"result\":\"spotless\"");
        assert!(actions(&bad).is_err(), "an unknown result fails the parse");
    }
}
