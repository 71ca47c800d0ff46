//! `cargo xtask monitoring` (also the last step of `cargo xtask test`): the shipped alert rules,
//! their unit tests and the Grafana dashboard, held to the agent's metric contract below; and the
//! textfile the agent writes, read by a real node_exporter running as an unprivileged user, as
//! Debian's prometheus-node-exporter does. Installs promtool (Debian `prometheus`) and
//! node_exporter (`prometheus-node-exporter`) when missing.
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::{cargo, toolchain, workspace_root};

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

/// Runs promtool; its last line is the detail, its whole output the error.
fn promtool(cmd: &mut Command) -> anyhow::Result<String> {
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
fn slug(heading: &str) -> String {
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
fn check_alerts(rules: &str, runbook: &str) -> anyhow::Result<String> {
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
fn check_dashboard(text: &str, tmp: &Path) -> anyhow::Result<String> {
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
fn visit(v: &serde_json::Value, f: &mut dyn FnMut(&str, &serde_json::Value)) {
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
fn recorded_names(rules: &str, dashboard: &str) -> anyhow::Result<String> {
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

fn metric_names(text: &str) -> anyhow::Result<BTreeSet<String>> {
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
        "not in the metric contract (xtask/src/monitoring.rs, docs/operations.md): {unknown:?}"
    );
    Ok(used)
}

/// A histogram's family for its `_bucket`, `_sum` and `_count` series; any other name as is.
fn family_of(series: &str) -> &str {
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

/// The textfile the agent wrote: SAMPLE_ENV's file when it exists, else the one the agent's
/// textfile test writes (run here with SAMPLE_ENV set).
fn agent_sample(tmp: &Path) -> anyhow::Result<Option<PathBuf>> {
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
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Classic text format, enough for what the agent writes: `name{k="v",...} value [ts]`.
fn parse_sample_line(line: &str) -> anyhow::Result<Sample> {
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
fn check_sample(text: &str) -> anyhow::Result<String> {
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
    let mut problems = Vec::new();
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
    for s in &samples {
        if !AGENT_METRICS.iter().any(|m| m.0 == family_of(&s.name)) {
            problems.push(format!(
                "{}: not in the contract (add it to xtask/src/monitoring.rs and docs/operations.md)",
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
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(format!(
        "{} families, {} series",
        AGENT_METRICS.len(),
        samples.len()
    ))
}

/// node_exporter, killed and reaped when dropped (every exit path of the check), and killed by
/// the kernel should xtask itself die (PR_SET_PDEATHSIG).
struct NodeExporter {
    child: Child,
    log: PathBuf,
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeExporter {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// uid and gid of a user.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam reads the user database and returns null or a pointer to static storage,
    // read at once (xtask does not call getpw* from other threads).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points to a valid passwd.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!(
            "unexpected response: {}",
            resp.lines().next().unwrap_or("")
        ))),
    }
}

/// The sample, copied with its mode into a directory of its own as `qcom_reset.prom`, read by
/// node_exporter's textfile collector (nothing else collected) running as `prometheus` (Debian's
/// node_exporter user) or `nobody`: no scrape error, and every family typed as in the contract
/// (an OpenMetrics counter, `# TYPE x counter` + `x_total`, arrives untyped).
fn scrape_through_node_exporter(sample: &Path, tmp: &Path) -> anyhow::Result<String> {
    let dir = tmp.join("textfile");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))?;
    let file = dir.join("qcom_reset.prom");
    // std::fs::copy keeps the mode: a 0600 sample stays unreadable to node_exporter's user.
    std::fs::copy(sample, &file).with_context(|| format!("copying {}", sample.display()))?;
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    let port = free_port()?;
    let (mut exporter, user) = start_exporter(&dir, tmp, port, mode)?;
    let body = scrape(&mut exporter, port)?;
    let log = exporter.log();
    drop(exporter);
    let problems = problems(&body, mode, &user, &log);
    ensure!(
        problems.is_empty(),
        "through node_exporter (as {user}):\n{}",
        problems.join("\n")
    );
    Ok(format!(
        "node_textfile_scrape_error 0 and {} families typed as agreed, read as {user} (mode {mode:o})",
        AGENT_METRICS.len()
    ))
}

/// node_exporter with only its textfile collector on `dir`, as its own user when root (the
/// name of whom it runs as is returned).
fn start_exporter(
    dir: &Path,
    tmp: &Path,
    port: u16,
    mode: u32,
) -> anyhow::Result<(NodeExporter, String)> {
    let log = tmp.join("node_exporter.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = Command::new(NODE_EXPORTER);
    cmd.args([
        "--collector.disable-defaults",
        "--collector.textfile",
        "--web.disable-exporter-metrics",
    ])
    .arg(format!("--collector.textfile.directory={}", dir.display()))
    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
    .stdin(Stdio::null())
    .stdout(out.try_clone()?)
    .stderr(out);
    let user = if is_root() {
        let (name, (uid, gid)) = ["prometheus", "nobody"]
            .into_iter()
            .find_map(|n| user_ids(n).map(|ids| (n, ids)))
            .context("neither a prometheus nor a nobody user")?;
        // As setpriv/runuser would: groups dropped (std calls setgroups(0) as root), gid, uid.
        cmd.uid(uid).gid(gid);
        name.to_string()
    } else {
        // Not root: node_exporter runs as this user, who owns the copy; the mode is what tells.
        ensure!(
            mode & 0o004 != 0,
            "the sample's mode is {mode:o}: node_exporter's user (prometheus) cannot read it"
        );
        "this user".to_string()
    };
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let exporter = NodeExporter {
        child: cmd
            .spawn()
            .with_context(|| format!("starting {NODE_EXPORTER}"))?,
        log,
    };

    Ok((exporter, user))
}

/// `/metrics`, once node_exporter answers (10 s at most).
fn scrape(exporter: &mut NodeExporter, port: u16) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Some(status) = exporter.child.try_wait()? {
            bail!("node_exporter exited ({status}):\n{}", exporter.log());
        }
        match http_get(port, "/metrics") {
            Ok(body) => break body,
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "node_exporter on 127.0.0.1:{port} did not answer in 10 s ({e}):\n{}",
                    exporter.log()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    Ok(body)
}

/// What is wrong with the scrape: a textfile error, the file not read, a family missing,
/// mistyped or outside the contract.
fn problems(body: &str, mode: u32, user: &str, log: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !body.lines().any(|l| l == "node_textfile_scrape_error 0") {
        let line = body
            .lines()
            .find(|l| l.starts_with("node_textfile_scrape_error"))
            .unwrap_or("no node_textfile_scrape_error");
        problems.push(format!(
            "{line} (sample mode {mode:o}, read as {user}); node_exporter's log:\n{}",
            log.trim_end()
        ));
    }
    if !body
        .lines()
        .any(|l| l.starts_with("node_textfile_mtime_seconds{") && l.contains("qcom_reset.prom"))
    {
        problems.push("no node_textfile_mtime_seconds for qcom_reset.prom".into());
    }
    let typed: BTreeMap<&str, &str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|t| t.split_once(' '))
        .collect();
    for (family, kind, _) in AGENT_METRICS {
        match typed.get(family) {
            Some(k) if *k == kind.as_str() => {}
            Some(k) => problems.push(format!("{family} arrives as {k}, want {}", kind.as_str())),
            None => problems.push(format!("{family} does not arrive")),
        }
    }
    for (name, kind) in &typed {
        if name.starts_with("qcom_reset_") && !AGENT_METRICS.iter().any(|m| m.0 == *name) {
            problems.push(format!("{name} arrives as {kind}: not in the contract"));
        }
    }
    problems
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
