//! The textfile the agent writes, line by line against the contract.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};

use crate::{cargo, toolchain};

use super::rules::family_of;
use super::{AGENT_METRICS, COUNTER_VALUES, Kind, SAMPLE_ENV, SAMPLE_REQUIRED, SAMPLE_TEST};

/// The textfile the agent wrote: SAMPLE_ENV's file when it exists, else the one the agent's
/// textfile test writes (run here with SAMPLE_ENV set).
pub(super) fn agent_sample(tmp: &Path) -> anyhow::Result<Option<PathBuf>> {
    let given = std::env::var_os(SAMPLE_ENV).map(|p| std::path::absolute(PathBuf::from(p)));
    let path = match given {
        Some(p) => {
            let p = p.context("the sample path")?;
            if p.exists() {
                return Ok(Some(p));
            }
            p
        }
        None => tmp.join("agent-sample.prom"),
    };
    toolchain::ensure_ebpf()?;
    toolchain::run(cargo().args(SAMPLE_TEST).env(SAMPLE_ENV, &path))?;
    if path.exists() {
        Ok(Some(path))
    } else if SAMPLE_REQUIRED {
        bail!(
            "`cargo {}` with {SAMPLE_ENV}={} wrote no file",
            SAMPLE_TEST.join(" "),
            path.display()
        )
    } else {
        Ok(None)
    }
}

/// A sample line: name, labels, value.
pub(super) struct Sample {
    pub(super) name: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) value: f64,
}

/// Classic text format, enough for what the agent writes: `name{k="v",...} value [ts]`.
pub(super) fn parse_sample_line(line: &str) -> anyhow::Result<Sample> {
    let bad = || format!("unparsable sample line: {line}");
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .with_context(bad)?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = rest.split_once("=\"").with_context(bad)?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next().with_context(bad)? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().with_context(bad)?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.trim().to_string(), value);
            rest = &r[end + 1..];
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .with_context(bad)?
        .parse::<f64>()
        .with_context(bad)?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// The sample against the contract: every family, typed as agreed, with exactly its label names;
/// nothing outside the contract; the counters' label values all present; 0/1 gauges 0 or 1; the
/// heartbeat a unix time in seconds.
pub(super) fn check_sample(text: &str) -> anyhow::Result<String> {
    let (types, samples) = parse_sample(text)?;
    let mut problems = Vec::new();
    families(&types, &samples, &mut problems);
    values(&samples, &mut problems);
    born(&samples, &mut problems);
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(format!(
        "{} families, {} series",
        AGENT_METRICS.len(),
        samples.len()
    ))
}

/// The textfile's `# TYPE` lines and its samples.
fn parse_sample(text: &str) -> anyhow::Result<(BTreeMap<String, String>, Vec<Sample>)> {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            if let (Some(n), Some(k)) = (it.next(), it.next()) {
                types.insert(n.to_string(), k.to_string());
            }
        } else if !line.starts_with('#') {
            samples.push(parse_sample_line(line)?);
        }
    }
    Ok((types, samples))
}

/// Every family of the contract, typed and labelled as agreed, with a sample.
fn families(types: &BTreeMap<String, String>, samples: &[Sample], problems: &mut Vec<String>) {
    for (family, kind, label_names) in AGENT_METRICS {
        match types.get(*family).map(String::as_str) {
            Some(k) if k == kind.as_str() => {}
            other => problems.push(format!(
                "{family}: # TYPE {other:?}, want {}",
                kind.as_str()
            )),
        }
        let series: Vec<&Sample> = samples
            .iter()
            .filter(|s| family_of(&s.name) == *family)
            .collect();
        if series.is_empty() {
            problems.push(format!("{family}: no sample"));
        }
        for s in series {
            let mut want: BTreeSet<&str> = label_names.iter().copied().collect();
            if s.name.ends_with("_bucket") && *kind == Kind::Histogram {
                want.insert("le");
            }
            let have: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            if have != want {
                problems.push(format!("{}: labels {have:?}, want {want:?}", s.name));
            }
        }
    }
}

/// Each sample in the contract, and its value in range.
fn values(samples: &[Sample], problems: &mut Vec<String>) {
    for s in samples {
        if !AGENT_METRICS.iter().any(|m| m.0 == family_of(&s.name)) {
            problems.push(format!(
                "{}: not in the contract (add it to xtask/src/monitoring/mod.rs and docs/operations.md)",
                s.name
            ));
        }
        let zero_one = [
            "qcom_reset_device_clean",
            "qcom_reset_device_gave_up",
            "qcom_reset_probe_attached",
        ];
        if zero_one.contains(&s.name.as_str()) && s.value != 0.0 && s.value != 1.0 {
            problems.push(format!("{}: {}, want 0 or 1", s.name, s.value));
        }
        let info = ["qcom_reset_device_info", "qcom_reset_build_info"];
        if info.contains(&s.name.as_str()) && s.value != 1.0 {
            problems.push(format!("{}: {}, want 1", s.name, s.value));
        }
        // After 2020, before 2286: seconds, not milliseconds.
        if s.name == "qcom_reset_last_update_timestamp_seconds" && !(1.6e9..1e10).contains(&s.value)
        {
            problems.push(format!("{}: {}, not unix seconds", s.name, s.value));
        }
    }
}

/// Every counter value there from the start, at 0.
fn born(samples: &[Sample], problems: &mut Vec<String>) {
    for (family, label, values) in COUNTER_VALUES {
        for v in *values {
            if !samples
                .iter()
                .any(|s| s.name == *family && s.labels.get(*label).map(String::as_str) == Some(v))
            {
                problems.push(format!(
                    "{family}{{{label}=\"{v}\"}} missing (every value must be there from the start, at 0)"
                ));
            }
        }
    }
}
