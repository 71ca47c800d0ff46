//! What the lab reads besides the journal's actions: `trace --json` lines, the journal's event
//! lines and the simulator's report, typed. Like `checks/journal.rs`, the names are written out
//! here apart from the library's (`TraceEvent`, `sim::shm::Report`): the lab reads these records
//! as their readers do, so a rename on one side fails a parse naming the line instead of a check
//! comparing with null. The bench (`bench/results`) reads the journal untyped on purpose: it
//! compares against agents of other versions (`--agent`), whose lines lack newer fields.
use anyhow::Context as _;
use serde::Deserialize;

use crate::vm::qemu::section;

/// What a trace event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    Attempt,
    Release,
    Open,
}

/// The probe that saw an event, or how a function is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Flavour {
    Kprobe,
    Fentry,
}

/// The strongest kernel reset that returned 0 inside an open or release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum KernelReset {
    DeviceSpecific,
    Bus,
    Unidentified,
    None,
}

impl KernelReset {
    /// Its name in the JSON (what the scenarios' expectations are written in).
    pub fn name(self) -> &'static str {
        match self {
            KernelReset::DeviceSpecific => "device-specific",
            KernelReset::Unidentified => "unidentified",
            KernelReset::Bus => "bus",
            KernelReset::None => "none",
        }
    }
}

/// A reset call made inside an open or release.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct Attempt {
    pub function: String,
    pub ret: i64,
}

/// One probe event (`trace --json`, and a journal event line's `event`).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Event {
    pub kind: Kind,
    pub flavour: Flavour,
    pub function: String,
    pub bdf: String,
    pub ret: i64,
    #[serde(default)]
    pub errno: Option<String>,
    pub duration_ns: u64,
    pub ktime_ns: u64,
    pub tgid: u32,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    #[serde(default)]
    pub needs_reset: Option<bool>,
    #[serde(default)]
    pub kernel_reset: Option<KernelReset>,
    #[serde(default)]
    pub left_unreset: Option<bool>,
}

impl Event {
    /// Whether a reset call `function` returned `ret` inside this open or release.
    pub fn tried(&self, function: &str, ret: i64) -> bool {
        self.attempts
            .iter()
            .any(|a| a.function == function && a.ret == ret)
    }

    /// When the probed call returned, ns of CLOCK_MONOTONIC.
    pub fn returned_ns(&self) -> u64 {
        self.ktime_ns + self.duration_ns
    }
}

/// How one function is attached.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Attachment {
    pub function: String,
    pub flavour: Option<Flavour>,
    #[serde(default)]
    pub note: Option<String>,
}

/// One `trace --json` line.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum TraceLine {
    Event(Event),
    Notice(Notice),
}

/// A `trace --json` line that is not an event (the checks read only the attachments; the others
/// are named so that a line of no known kind fails).
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum Notice {
    Attach { attachments: Vec<Attachment> },
    Drops,
    BadRecord,
    Bind,
    UeventsLost,
}

/// The `trace --json` lines of a console section; a line that parses as neither fails.
pub(crate) fn trace(console: &str, name: &str) -> anyhow::Result<Vec<TraceLine>> {
    json_section(console, name)
}

/// The events of `kind` among trace lines.
pub(crate) fn events(lines: &[TraceLine], kind: Kind) -> impl Iterator<Item = &Event> {
    lines.iter().filter_map(move |l| match l {
        TraceLine::Event(e) if e.kind == kind => Some(e),
        _ => None,
    })
}

/// The attach notices among trace lines, in order.
pub(crate) fn attaches(lines: &[TraceLine]) -> Vec<&[Attachment]> {
    lines
        .iter()
        .filter_map(|l| match l {
            TraceLine::Notice(Notice::Attach { attachments }) => Some(&attachments[..]),
            _ => None,
        })
        .collect()
}

/// One line of the agent's journal, as far as the lab reads it (actions: `checks/journal.rs`).
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum JournalLine {
    Event {
        event: Event,
        /// When the agent took the event from the ring buffer.
        #[serde(default)]
        received_mono_ns: Option<u64>,
    },
    #[serde(other)]
    Other,
}

/// A journal event line.
#[derive(Clone, Debug)]
pub(crate) struct Journaled {
    pub event: Event,
    pub received_mono_ns: Option<u64>,
}

/// The journal's event lines, in order; a line that does not parse fails naming it.
pub(crate) fn journal_events(console: &str) -> anyhow::Result<Vec<Journaled>> {
    Ok(json_section::<JournalLine>(console, "journal")?
        .into_iter()
        .filter_map(|l| match l {
            JournalLine::Event {
                event,
                received_mono_ns,
            } => Some(Journaled {
                event,
                received_mono_ns,
            }),
            JournalLine::Other => None,
        })
        .collect())
}

/// Every line of a console section that is JSON.
pub(crate) fn json_lines(console: &str, name: &str) -> Vec<serde_json::Value> {
    section(console, name)
        .into_iter()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}

/// Every JSON line of a console section as `T`. A line that is not JSON (the guest's own words,
/// or one a kernel message broke on the serial console) is skipped, as `json_lines` does; JSON
/// that is not a `T` fails, naming the line.
fn json_section<T: serde::de::DeserializeOwned>(
    console: &str,
    name: &str,
) -> anyhow::Result<Vec<T>> {
    json_lines(console, name)
        .into_iter()
        .map(|v| {
            let line = v.to_string();
            serde_json::from_value(v)
                .with_context(|| format!("{name}: a line the lab cannot read: {line}"))
        })
        .collect()
}

/// An upstream port's registers as the guest's `vmlab-guest port-regs` prints them (`VMLAB port
/// {json}`, the library's `PortState`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct PortReading {
    pub port: Option<String>,
    pub slot_control: Option<u16>,
    pub hotplug_events: bool,
    pub aer_uncor_mask: Option<u32>,
    pub surprise_down_unmasked: bool,
    pub dpc_enabled: bool,
}

/// The `VMLAB port {json}` lines of a console section, in order; one that does not parse fails.
pub(crate) fn port_readings(console: &str, name: &str) -> anyhow::Result<Vec<PortReading>> {
    section(console, name)
        .iter()
        .filter_map(|l| l.split("VMLAB port ").nth(1))
        .map(|j| serde_json::from_str(j.trim()).with_context(|| format!("a port reading: {j}")))
        .collect()
}

/// A card as `vmlab-guest card` and `handover` read it through sysfs (`VMLAB card-state {json}`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct CardState {
    pub driver: Option<String>,
    pub driver_override: String,
    pub command: u16,
    pub power_control: String,
    /// Config space, hex.
    pub config: String,
    /// A crash record for the card exists.
    pub record: bool,
}

/// `VMLAB handover {json}`: CLOCK_MONOTONIC ns at the handover's start and end, and the card
/// right after.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Handover {
    pub start_ns: u64,
    pub end_ns: u64,
    pub card: CardState,
}

/// The JSON of the guest's `VMLAB {tag} {json}` line, as `T`.
pub(crate) fn vmlab_json<T: serde::de::DeserializeOwned>(
    console: &str,
    tag: &str,
) -> anyhow::Result<T> {
    let text = console
        .lines()
        .find_map(|l| l.split(&format!("VMLAB {tag} ")).nth(1))
        .with_context(|| format!("the guest printed no {tag} line"))?;
    serde_json::from_str(text.trim()).with_context(|| format!("{tag}: {text}"))
}

/// A crash record as the guest printed it (`/run/qcom-reset/BDF.json`), as far as the checks
/// read it.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct CrashRecord {
    pub command: Option<u16>,
    pub power_control: Option<String>,
    /// The upstream port's masks, when the session had masked them.
    pub port: Option<serde::de::IgnoredAny>,
}

/// The crash record a console section holds.
pub(crate) fn crash_record(console: &str, name: &str) -> anyhow::Result<CrashRecord> {
    let text = section(console, name).join("");
    serde_json::from_str(text.trim()).with_context(|| format!("no crash record in {name}: {text}"))
}

/// One BAR write the simulated card received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct Write {
    /// µs of simulated time.
    pub at_us: u64,
    pub offset: u32,
    pub value: u32,
}

/// Whether the writes follow the reviewed sequence.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Conformance {
    pub ok: bool,
    pub problems: Vec<String>,
    pub sequences: usize,
}

/// A power-state change the host made (D0 = 0, D3hot = 3).
#[derive(Clone, Copy, Debug, Deserialize)]
pub(crate) struct PowerChange {
    pub at_us: u64,
    pub from: u8,
    pub to: u8,
}

/// The simulator's report (`qcom-reset-sim`): the shared-memory card's, and with vfio-user the
/// whole function's (`power`, `devctl`).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct SimReport {
    pub family: String,
    pub resets: u32,
    pub missed: u32,
    pub writes: Vec<Write>,
    pub conformance: Conformance,
    pub link_up: bool,
    pub beyond_model: Vec<u32>,
    /// None for the shared-memory card (no PM capability).
    #[serde(default)]
    pub power: Option<Vec<PowerChange>>,
    #[serde(default)]
    pub devctl: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release line of `trace --json` and the journal line that carries it, as 7.2 prints
    /// them behind a root port.
    #[test]
    fn trace_and_journal_lines_read_typed() {
        let ev = r#"{"schema":3,"kind":"release","flavour":"kprobe","function":"vfio_pci_core_disable","bdf":"0000:01:00.0","vendor":"0x17cb","device":"0x1103","ret":0,"errno":null,"duration_ns":900,"ktime_ns":1000,"pid":7,"tgid":7,"comm":"qemu","attempts":[{"function":"pci_reset_bus_function","ret":0,"errno":null,"duration_ns":5}],"attempts_seen":1,"needs_reset":false,"kernel_reset":"bus","left_unreset":true}"#;
        let console = format!(
            "VMLAB-BEGIN trace\n{ev}\n{{\"kind\":\"attach\",\"attachments\":[{{\"function\":\"pci_reset_function\",\"flavour\":\"fentry\",\"note\":null,\"unloaded\":false}}]}}\nguest words\nVMLAB-END trace\nVMLAB-BEGIN journal\n{{\"type\":\"event\",\"mono_ns\":5,\"event\":{ev},\"received_mono_ns\":2500}}\n{{\"type\":\"action\",\"action\":{{}}}}\nVMLAB-END journal\n"
        );
        let lines = trace(&console, "trace").unwrap();
        let rel: Vec<_> = events(&lines, Kind::Release).collect();
        assert_eq!(rel.len(), 1);
        assert!(rel[0].tried("pci_reset_bus_function", 0));
        assert_eq!(rel[0].kernel_reset, Some(KernelReset::Bus));
        assert_eq!(rel[0].returned_ns(), 1900);
        assert_eq!(attaches(&lines)[0][0].flavour, Some(Flavour::Fentry));
        let j = journal_events(&console).unwrap();
        assert_eq!(j.len(), 1);
        assert_eq!(j[0].received_mono_ns, Some(2500));
        assert_eq!(j[0].event.left_unreset, Some(true));
    }

    /// A renamed field fails the parse, naming the line.
    #[test]
    fn a_line_the_lab_cannot_read_fails_naming_it() {
        let console = "VMLAB-BEGIN trace\n{\"kind\":\"release\",\"bdf\":1}\nVMLAB-END trace\n";
        let e = trace(console, "trace").unwrap_err();
        assert!(format!("{e:#}").contains("\"bdf\":1"), "{e:#}");
    }
}
