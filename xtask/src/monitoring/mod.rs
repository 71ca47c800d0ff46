//! `cargo xtask monitoring` (also the last step of `cargo xtask test`): the shipped alert rules,
//! their unit tests and the Grafana dashboard, held to the agent's metric contract below; and the
//! textfile the agent writes, read by a real node_exporter running as an unprivileged user, as
//! Debian's prometheus-node-exporter does. Installs promtool (Debian `prometheus`) and
//! node_exporter (`prometheus-node-exporter`) when missing.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::workspace_root;

mod node_exporter;
mod rules;
mod sample;

use node_exporter::scrape_through_node_exporter;
use rules::{check_alerts, check_dashboard, metric_names, promtool, recorded_names};
use sample::{agent_sample, check_sample};

const RULES: &str = "dist/prometheus/qcom-reset.rules.yml";
const RULES_TEST: &str = "dist/prometheus/qcom-reset.rules.test.yml";
const DASHBOARD: &str = "dist/grafana/qcom-reset.json";
const RUNBOOK: &str = "docs/operations.md";
const PROMTOOL: &str = "/usr/bin/promtool";
const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";

/// Where the agent's textfile test writes its sample (set by this check; a path given by the
/// caller that already exists is checked as it is).
pub const SAMPLE_ENV: &str = "QCOM_RESET_TEXTFILE_SAMPLE";
/// The agent's test that writes the sample when SAMPLE_ENV is set.
const SAMPLE_TEST: &[&str] = &[
    "test",
    "--package",
    "qcom-reset",
    "--lib",
    "--features",
    "qcom-reset/vfio-user",
    "textfile",
    "--",
    "--nocapture",
];
/// Whether a run of SAMPLE_TEST that writes no sample fails the check (false: only skips the
/// sample's checks).
const SAMPLE_REQUIRED: bool = true;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The contract: every family the agent exposes (classic text format), its type and its label
/// names. docs/operations.md ("Monitoring") has the same table; rules, dashboard and the agent's
/// textfile are all checked against this one.
const AGENT_METRICS: &[(&str, Kind, &[&str])] = &[
    ("qcom_reset_events_total", Kind::Counter, &["kind"]),
    ("qcom_reset_resets_total", Kind::Counter, &["bdf", "result"]),
    ("qcom_reset_skipped_total", Kind::Counter, &["reason"]),
    (
        "qcom_reset_ringbuf_dropped_events_total",
        Kind::Counter,
        &[],
    ),
    ("qcom_reset_event_to_action_seconds", Kind::Histogram, &[]),
    ("qcom_reset_reset_duration_seconds", Kind::Histogram, &[]),
    ("qcom_reset_device_clean", Kind::Gauge, &["bdf"]),
    ("qcom_reset_device_gave_up", Kind::Gauge, &["bdf"]),
    (
        "qcom_reset_device_info",
        Kind::Gauge,
        &["bdf", "profile", "model", "regime", "driver"],
    ),
    ("qcom_reset_build_info", Kind::Gauge, &["version"]),
    ("qcom_reset_probe_attached", Kind::Gauge, &["function"]),
    ("qcom_reset_last_update_timestamp_seconds", Kind::Gauge, &[]),
];

/// The closed label sets of the counters. Each value must be in the textfile from the agent's
/// start (at 0): `increase()` does not count a series' first sample, so a `result="crashed"`
/// series born at 1 would hide the first crash from QcomResetResetsFailing and the dashboard.
const COUNTER_VALUES: &[(&str, &str, &[&str])] = &[
    (
        "qcom_reset_events_total",
        "kind",
        &["attempt", "release", "open"],
    ),
    (
        "qcom_reset_resets_total",
        "result",
        &[
            "clean",
            "stale",
            "crashed",
            "not-ready",
            "link-down",
            "wrong-identity",
            "error",
            "dry-run",
            "taken",
        ],
    ),
    (
        "qcom_reset_skipped_total",
        "reason",
        &["kill-switch", "policy", "refused"],
    ),
];

/// node_exporter's own series the rules may use (the textfile and systemd collectors).
const NODE_EXPORTER_METRICS: &[&str] = &[
    "node_textfile_mtime_seconds",
    "node_textfile_scrape_error",
    "node_systemd_unit_state",
];

/// Words with a metric prefix that are no metric (prose in comments and descriptions).
const NOT_METRICS: &[&str] = &["node_exporter"];

/// One check: its name, what it took, and a line of detail.
fn step(name: &str, f: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    let start = Instant::now();
    let result = f();
    let took = start.elapsed().as_secs_f64();
    match &result {
        Ok(detail) if detail.is_empty() => println!("monitoring: {name}: ok ({took:.1} s)"),
        Ok(detail) => println!("monitoring: {name}: ok, {detail} ({took:.1} s)"),
        Err(_) => println!("monitoring: {name}: FAILED ({took:.1} s)"),
    }
    result
        .map(|_| ())
        .with_context(|| format!("monitoring: {name}"))
}

pub fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    let root = workspace_root();
    let tmp = tempfile::tempdir().context("temporary directory")?;
    step("promtool and node_exporter installed", ensure_packages)?;
    step("promtool check rules", || {
        promtool(
            Command::new(PROMTOOL)
                .args(["check", "rules"])
                .arg(root.join(RULES)),
        )
    })?;
    step("promtool test rules", || {
        promtool(
            Command::new(PROMTOOL)
                .args(["test", "rules"])
                .arg(root.join(RULES_TEST)),
        )
    })?;
    step("alerts have a severity and a runbook_url in docs", || {
        check_alerts(&read(&root.join(RULES))?, &read(&root.join(RUNBOOK))?)
    })?;
    step("dashboard JSON", || {
        check_dashboard(&read(&root.join(DASHBOARD))?, tmp.path())
    })?;
    step("rules and dashboard use only contract metrics", || {
        let mut used = metric_names(&read(&root.join(RULES))?)?;
        used.extend(metric_names(&read(&root.join(DASHBOARD))?)?);
        Ok(format!("{} names", used.len()))
    })?;
    step("dashboard's recorded series are the rules'", || {
        recorded_names(&read(&root.join(RULES))?, &read(&root.join(DASHBOARD))?)
    })?;

    let mut sample = None;
    step("agent textfile sample", || {
        sample = agent_sample(tmp.path())?;
        Ok(match &sample {
            Some(p) => p.display().to_string(),
            None => format!("none written by `cargo {}`: skipped", SAMPLE_TEST.join(" ")),
        })
    })?;
    if let Some(sample) = sample {
        // All three, so one run names every problem of the agent's output.
        let results = [
            step("promtool check metrics (sample)", || {
                let file = std::fs::File::open(&sample)
                    .with_context(|| format!("opening {}", sample.display()))?;
                promtool(
                    Command::new(PROMTOOL)
                        .args(["check", "metrics"])
                        .stdin(file),
                )
            }),
            step("node_exporter reads the sample", || {
                scrape_through_node_exporter(&sample, tmp.path())
            }),
            step("sample matches the contract", || {
                check_sample(&read(&sample)?)
            }),
        ];
        let failed: Vec<String> = results
            .into_iter()
            .filter_map(Result::err)
            .map(|e| format!("{e:#}"))
            .collect();
        if !failed.is_empty() {
            bail!("{}", failed.join("\n\n"));
        }
    }
    println!(
        "monitoring: all checks passed ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ensure_packages() -> anyhow::Result<String> {
    let missing: Vec<&str> = [
        (PROMTOOL, "prometheus"),
        (NODE_EXPORTER, "prometheus-node-exporter"),
    ]
    .into_iter()
    .filter(|(bin, _)| !Path::new(bin).exists())
    .map(|(_, pkg)| pkg)
    .collect();
    if missing.is_empty() {
        return Ok(String::new());
    }
    eprintln!("xtask: installing {} (Debian)", missing.join(" "));
    let start = Instant::now();
    crate::vm::apt_install(&missing)?;
    Ok(format!(
        "installed {} in {:.0} s",
        missing.join(" "),
        start.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dashboard_query_of_an_unrecorded_series_is_caught() {
        let rules = "  - record: instance:qcom_reset_blind:max\n    expr: x\n";
        assert!(
            super::recorded_names(rules, r#"{"expr": "sum(instance:qcom_reset_blind:max)"}"#)
                .is_ok()
        );
        assert!(
            super::recorded_names(rules, r#"{"expr": "sum(instance:qcom_reset_blnd:max)"}"#)
                .is_err()
        );
        assert!(super::recorded_names(rules, r#"{"expr": "qcom_reset_device_clean"}"#).is_err());
    }

    use super::rules::slug;
    use super::sample::parse_sample_line;
    use super::*;

    #[test]
    fn slugs_like_github() {
        assert_eq!(slug(" QcomResetGaveUp"), "qcomresetgaveup");
        assert_eq!(
            slug(" The textfile (node_exporter)"),
            "the-textfile-node_exporter"
        );
    }

    #[test]
    fn names_outside_the_contract_are_refused() {
        let ok = "rate(qcom_reset_event_to_action_seconds_bucket[5m]) node_exporter's\n\
                  qcom_reset_event_to_action_seconds: the latency";
        assert_eq!(
            metric_names(ok).unwrap().into_iter().collect::<Vec<_>>(),
            ["qcom_reset_event_to_action_seconds"]
        );
        let err = metric_names("qcom_reset_ringbuf_drops > 0").unwrap_err();
        assert!(
            err.to_string().contains("qcom_reset_ringbuf_drops"),
            "{err}"
        );
    }

    #[test]
    fn sample_lines_parse() {
        let s =
            parse_sample_line(r#"qcom_reset_device_info{bdf="0000:03:00.0",model="a \"b\""} 1"#)
                .unwrap();
        assert_eq!(s.name, "qcom_reset_device_info");
        assert_eq!(s.labels["model"], "a \"b\"");
        assert_eq!(s.value, 1.0);
        assert!(parse_sample_line("qcom_reset_x{bdf=\"0\" 1").is_err());
    }
}
