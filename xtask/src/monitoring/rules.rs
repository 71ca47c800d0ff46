//! The alert rules (promtool's check and unit tests) and the Grafana dashboard, against the
//! metric contract.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, ensure};

use super::{AGENT_METRICS, Kind, NODE_EXPORTER_METRICS, NOT_METRICS, PROMTOOL, RULES, RUNBOOK};

/// Runs promtool; its last line is the detail, its whole output the error.
pub(super) fn promtool(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?}: {}\n{text}", out.status);
    Ok(text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string())
}

/// GitHub's anchor for a Markdown heading.
pub(super) fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every alert has `severity: critical|warning` and a runbook_url whose anchor is a heading of
/// docs/operations.md.
pub(super) fn check_alerts(rules: &str, runbook: &str) -> anyhow::Result<String> {
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect();
    let mut alerts = 0;
    for block in rules.split("- alert:").skip(1) {
        let name = block.split_whitespace().next().unwrap_or("?");
        alerts += 1;
        let value = |key: &str| {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .map(|v| v.trim().trim_matches('"').to_string())
        };
        let severity = value("severity:");
        ensure!(
            matches!(severity.as_deref(), Some("critical" | "warning")),
            "{name}: severity {severity:?}, not critical or warning"
        );
        let url = value("runbook_url:").with_context(|| format!("{name}: no runbook_url"))?;
        let anchor = url
            .split_once("operations.md#")
            .map(|(_, a)| a)
            .with_context(|| format!("{name}: runbook_url {url} is not an operations.md anchor"))?;
        ensure!(
            anchors.contains(anchor),
            "{name}: runbook_url anchor #{anchor} is no heading of {RUNBOOK}"
        );
    }
    ensure!(alerts > 0, "no alert in {RULES}");
    Ok(format!("{alerts} alerts"))
}

/// Parses, takes its datasource from the `DS_PROMETHEUS` input (import) or the variable of that
/// name (provisioning), has unique panel ids, and every query parses as PromQL.
pub(super) fn check_dashboard(text: &str, tmp: &Path) -> anyhow::Result<String> {
    let dash: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    let inputs = dash["__inputs"]
        .as_array()
        .context("no __inputs (import variables)")?;
    ensure!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "__inputs has no DS_PROMETHEUS prometheus datasource"
    );
    let mut datasources = 0;
    let mut bad = Vec::new();
    visit(&dash, &mut |key, v| {
        if key == "datasource" {
            datasources += 1;
            let uid = v["uid"].as_str().unwrap_or("");
            if uid != "${DS_PROMETHEUS}" && uid != "-- Grafana --" {
                bad.push(v.to_string());
            }
        }
    });
    ensure!(
        bad.is_empty(),
        "datasources other than ${{DS_PROMETHEUS}}: {bad:?}"
    );
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for p in dash["panels"].as_array().context("no panels")? {
        let id = p["id"].as_u64().context("a panel without an id")?;
        ensure!(ids.insert(id), "panel id {id} twice");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .with_context(|| format!("panel {id}: a target without expr"))?;
            queries.push((id, expr));
        }
    }
    // Every query is PromQL promtool parses: each becomes a recording rule of a scratch file,
    // Grafana's interval variables replaced by durations ($instance sits in label regexes).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (id, expr)) in queries.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        // A JSON string is a YAML double-quoted scalar.
        rules.push_str(&format!(
            "      - record: dashboard_panel_{id}_query_{i}\n        expr: {}\n",
            serde_json::Value::String(expr)
        ));
    }
    let file = tmp.join("dashboard-queries.rules.yml");
    std::fs::write(&file, rules)?;
    promtool(Command::new(PROMTOOL).args(["check", "rules"]).arg(&file))
        .context("a dashboard query is not valid PromQL")?;
    Ok(format!(
        "{} panels, {} queries parse as PromQL, {datasources} datasource references",
        ids.len(),
        queries.len()
    ))
}

/// Calls f(key, value) for every object member, at any depth.
pub(super) fn visit(v: &serde_json::Value, f: &mut dyn FnMut(&str, &serde_json::Value)) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                f(k, x);
                visit(x, f);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| visit(x, f)),
        _ => {}
    }
}

/// The metric names a file uses (words with the `qcom_reset_` or `node_` prefix, histograms'
/// `_bucket`/`_sum`/`_count` series by their family); an error names any outside the contract.
/// Every `level:qcom_reset_…:operation` name the dashboard queries is recorded by a rule.
pub(super) fn recorded_names(rules: &str, dashboard: &str) -> anyhow::Result<String> {
    let recorded: BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::trim)
        .collect();
    let used: BTreeSet<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.split(':').count() == 3 && w.contains(":qcom_reset_"))
        .collect();
    let missing: Vec<&&str> = used.difference(&recorded).collect();
    ensure!(
        missing.is_empty(),
        "the dashboard queries series no rule records: {missing:?}"
    );
    ensure!(
        !used.is_empty(),
        "the dashboard has no fleet view (no recorded series)"
    );
    Ok(format!(
        "{} of {} recorded series used",
        used.len(),
        recorded.len()
    ))
}

pub(super) fn metric_names(text: &str) -> anyhow::Result<BTreeSet<String>> {
    let known: BTreeSet<&str> = AGENT_METRICS
        .iter()
        .map(|m| m.0)
        .chain(NODE_EXPORTER_METRICS.iter().copied())
        .collect();
    let mut used = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    let words = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        // "name:" in prose; a colon inside is a recording rule's name.
        .map(|w| w.trim_end_matches(':'));
    for word in words {
        if !(word.starts_with("qcom_reset_") || word.starts_with("node_"))
            || NOT_METRICS.contains(&word)
        {
            continue;
        }
        let family = family_of(word);
        if known.contains(family) {
            used.insert(family.to_string());
        } else {
            unknown.insert(word.to_string());
        }
    }
    ensure!(
        unknown.is_empty(),
        "not in the metric contract (xtask/src/monitoring/mod.rs, docs/operations.md): {unknown:?}"
    );
    Ok(used)
}

/// A histogram's family for its `_bucket`, `_sum` and `_count` series; any other name as is.
pub(super) fn family_of(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        let histogram = |base: &str| {
            AGENT_METRICS
                .iter()
                .any(|m| m.0 == base && m.1 == Kind::Histogram)
        };
        match series.strip_suffix(suffix) {
            Some(base) if histogram(base) => return base,
            _ => {}
        }
    }
    series
}
