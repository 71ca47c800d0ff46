//! Prometheus metrics (prometheus-client): served on `metrics_listen` by a small hyper HTTP/1
//! server with timeouts and a connection limit when a port is configured (OpenMetrics), and
//! written to a node_exporter textfile-collector file when a path is (classic text format, the
//! one that collector parses, mode 0644 so node_exporter's own user can read it, atomically),
//! so fleets that already scrape node_exporter see every host's resets with no new port. The
//! textfile carries a heartbeat timestamp rewritten every `status::HEARTBEAT`: a dead agent's
//! file goes stale instead of reporting its last `clean` forever.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{Atomic as _, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::warn;

/// Upper bounds (seconds) of the event-to-action latency histogram.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds (seconds) of the reset-duration histogram: a WLAN reset takes well under a
/// second, a modem's 2 s wait plus up to 8 s of verification.
const DURATION_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 30.0];
/// Every result a reset attempt can end with (`resets_total`'s label values).
const RESULTS: [&str; 9] = [
    "clean",
    "stale",
    "crashed",
    "not-ready",
    "link-down",
    "wrong-identity",
    "error",
    "dry-run",
    "taken",
];
/// At most this many scrapes served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 8;
/// A client gets this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Result {
    bdf: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Device {
    bdf: String,
}

/// `device_info`'s labels: what a dashboard joins the per-card series with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceInfo {
    /// The card's address.
    pub bdf: String,
    /// Its profile.
    pub profile: String,
    /// Its part's name.
    pub model: String,
    /// Its reset regime.
    pub regime: String,
    /// Its driver.
    pub driver: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Probe {
    function: String,
}

/// The agent's Prometheus metrics: served on the metrics port and, optionally, written for node_exporter.
pub struct Metrics {
    registry: Registry,
    events: Family<Kind, Counter>,
    resets: Family<Result, Counter>,
    skipped: Family<Reason, Counter>,
    dropped: Counter,
    /// The ring buffer's running total as last reported, so the counter grows by the news.
    dropped_seen: AtomicU64,
    latency: Histogram,
    duration: Histogram,
    clean: Family<Device, Gauge>,
    gave_up: Family<Device, Gauge>,
    info: Family<DeviceInfo, Gauge>,
    /// Each card's current `device_info` labels, so a changed one replaces its old series.
    info_of: Mutex<HashMap<String, DeviceInfo>>,
    probes: Family<Probe, Gauge>,
    heartbeat: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// node_exporter textfile collector output, rewritten on every change.
    textfile: Option<PathBuf>,
    write_lock: Mutex<()>,
}

/// Every known label value from 0: `increase()` ignores a series' first sample, so a counter
/// born at 1 would hide the first failure of its kind from alerts. The version, once.
fn born(
    events: &Family<Kind, Counter>,
    skipped: &Family<Reason, Counter>,
    build: &Family<Build, Gauge>,
) {
    for kind in ["attempt", "release", "open"] {
        let _ = events.get_or_create(&Kind { kind: kind.into() });
    }
    for reason in ["kill-switch", "policy", "refused"] {
        let _ = skipped.get_or_create(&Reason {
            reason: reason.into(),
        });
    }
    build
        .get_or_create(&Build {
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .set(1);
}

/// A new metric of its default value, registered under `name`.
fn register<M>(r: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let m = M::default();
    r.register(name, help, m.clone());
    m
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

impl Metrics {
    /// Registers every series; `textfile` is node_exporter's file to rewrite, if any.
    pub fn new(textfile: Option<PathBuf>) -> Metrics {
        let mut r = Registry::with_prefix("qcom_reset");
        let events: Family<Kind, Counter> =
            register(&mut r, "events", "Probe events received, by kind");
        let resets = register(
            &mut r,
            "resets",
            "Reset attempts, by result (clean, stale, crashed, not-ready, link-down, wrong-identity, error, dry-run, taken)",
        );
        let skipped: Family<Reason, Counter> =
            register(&mut r, "skipped", "Triggers not acted on, by reason");
        let dropped = register(
            &mut r,
            "ringbuf_dropped_events",
            "Events lost in the kernel ring buffer",
        );
        let latency = Histogram::new(BUCKETS);
        r.register(
            "event_to_action_seconds",
            "Time from receiving an event to starting the reset",
            latency.clone(),
        );
        let duration = Histogram::new(DURATION_BUCKETS);
        r.register(
            "reset_duration_seconds",
            "Duration of each reset, verification included",
            duration.clone(),
        );
        let clean = register(
            &mut r,
            "device_clean",
            "1 when the device's last verdict was clean (the next owner can use it), else 0",
        );
        let gave_up = register(
            &mut r,
            "device_gave_up",
            "1 while the agent has given up on the device (max_attempts failed; cool-down)",
        );
        let info = register(
            &mut r,
            "device_info",
            "Each target card: its profile, model, reset regime and driver (value 1)",
        );
        let probes = register(
            &mut r,
            "probe_attached",
            "1 when the probe on this kernel function is attached, 0 when not (the agent is blind to it)",
        );
        let build: Family<Build, Gauge> =
            register(&mut r, "build_info", "The agent's version (value 1)");
        let heartbeat = register(
            &mut r,
            "last_update_timestamp_seconds",
            "When the agent last wrote these metrics (Unix time; refreshed at least every 30 s)",
        );
        born(&events, &skipped, &build);
        Metrics {
            registry: r,
            clean,
            gave_up,
            info,
            info_of: Mutex::new(HashMap::new()),
            probes,
            heartbeat,
            events,
            resets,
            skipped,
            dropped,
            dropped_seen: AtomicU64::new(0),
            latency,
            duration,
            textfile,
            write_lock: Mutex::new(()),
        }
    }

    /// Counts a probe event of `kind`.
    pub fn event(&self, kind: &str) {
        self.events.get_or_create(&Kind { kind: kind.into() }).inc();
        self.changed();
    }

    /// A reset attempt ended with this result (a verdict, "error", "taken" or "dry-run").
    pub fn reset(&self, bdf: &str, result: &str) {
        self.resets
            .get_or_create(&Result {
                bdf: bdf.into(),
                result: result.into(),
            })
            .inc();
        self.changed();
    }

    /// A reset that ran to its verdict took this long.
    pub fn duration(&self, d: Duration) {
        self.duration.observe(d.as_secs_f64());
        self.changed();
    }

    /// Counts an action skipped for `reason`.
    pub fn skipped(&self, reason: &str) {
        self.skipped
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
        self.changed();
    }

    /// The ring buffer's running total of lost events.
    pub fn drops(&self, total: u64) {
        let before = self.dropped_seen.fetch_max(total, Ordering::Relaxed);
        self.dropped.inc_by(total.saturating_sub(before));
        self.changed();
    }

    /// The device's latest verdict; a clean one also ends any give-up.
    pub fn verdict(&self, bdf: &str, clean: bool) {
        let d = Device { bdf: bdf.into() };
        self.clean.get_or_create(&d).set(i64::from(clean));
        if clean {
            self.gave_up.get_or_create(&d).set(0);
        }
        self.changed();
    }

    /// Marks `bdf` as given up (until a clean verdict clears it).
    pub fn gave_up(&self, bdf: &str) {
        self.gave_up
            .get_or_create(&Device { bdf: bdf.into() })
            .set(1);
        self.changed();
    }

    /// A card's current description; a changed one replaces the old series.
    pub fn device_info(&self, info: DeviceInfo) {
        let mut of = self
            .info_of
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if of.get(&info.bdf) == Some(&info) {
            return;
        }
        match of.insert(info.bdf.clone(), info.clone()) {
            Some(old) => {
                self.info.remove(&old);
            }
            // A card's reset results from 0, from the moment it is known (see `new`).
            None => {
                for result in RESULTS {
                    let _ = self.resets.get_or_create(&Result {
                        bdf: info.bdf.clone(),
                        result: result.into(),
                    });
                }
            }
        }
        drop(of);
        self.info.get_or_create(&info).set(1);
        self.changed();
    }

    /// Whether the probe on `function` is attached; none: its module is not loaded (no series,
    /// so a host without VFIO loaded is not "blind").
    pub fn probe(&self, function: &str, attached: Option<bool>) {
        let p = Probe {
            function: function.into(),
        };
        match attached {
            Some(a) => {
                self.probes.get_or_create(&p).set(i64::from(a));
            }
            None => {
                self.probes.remove(&p);
            }
        }
        self.changed();
    }

    /// Observes the time from an event's arrival to its action's start (any trigger).
    pub fn latency(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
        self.changed();
    }

    /// Nothing changed, but the agent is alive: the timestamp moves and the textfile with it.
    pub fn heartbeat(&self) {
        self.changed();
    }

    /// The OpenMetrics text exposition (the HTTP endpoint).
    pub fn render(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.heartbeat.inner().set(now);
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }

    /// The classic text exposition (node_exporter's textfile collector).
    pub fn render_classic(&self) -> String {
        classic(&self.render())
    }

    /// Rewrites the textfile, if configured.
    fn changed(&self) {
        let Some(path) = &self.textfile else {
            return;
        };
        let _one_writer = self
            .write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let text = self.render_classic();
        let written = crate::session::record::write_atomically(
            path,
            text.as_bytes(),
            0o644,
            crate::session::record::Durability::Rename,
        );
        if let Err(e) = written {
            warn!("metrics textfile {}: {e}", path.display());
        }
    }
}

/// OpenMetrics text as the classic format's parsers read it: a counter's HELP and TYPE name
/// its `_total` samples (the classic parser would otherwise make those `untyped` and drop the
/// typed family), and no `# EOF`.
fn classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                out.push_str(&format!("{p}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Serves `GET /metrics` on `addr` (HTTP/1, header timeout, at most `MAX_CONNECTIONS` at once)
/// until the task is dropped.
pub async fn serve(
    metrics: std::sync::Arc<Metrics>,
    addr: std::net::SocketAddr,
) -> std::io::Result<()> {
    serve_with(metrics, addr, HEADER_TIMEOUT).await
}

async fn serve_with(
    metrics: std::sync::Arc<Metrics>,
    addr: std::net::SocketAddr,
    header_timeout: Duration,
) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (sock, _) = listener.accept().await?;
        let m = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let m = m.clone();
                async move {
                    if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                "Content-Type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(m.render())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::new()))
                    }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            // A whole connection gets a bound too, so a slow reader cannot hold a slot forever.
            let _ = tokio::time::timeout(header_timeout * 2, conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(port: u16, path: &str) -> String {
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                s.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).await.unwrap();
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no server on {port}");
    }

    #[tokio::test]
    async fn serves_metrics_on_loopback_only() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let m = std::sync::Arc::new(Metrics::default());
        m.event("release");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let server = tokio::spawn(serve_with(m, addr, Duration::from_millis(300)));
        let body = get(port, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains("qcom_reset_events_total{kind=\"release\"} 1"),
            "{body}"
        );
        assert!(get(port, "/").await.starts_with("HTTP/1.1 404"));
        // A client that never sends its request does not keep the server from others.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        let late = tokio::time::timeout(Duration::from_secs(5), get(port, "/metrics")).await;
        assert!(
            late.is_ok_and(|b| b.contains("200 OK")),
            "slots freed by the header timeout"
        );
        server.abort();
    }

    #[test]
    fn renders_counters_and_histogram_and_writes_the_textfile() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qcom_reset.prom");
        let m = Metrics::new(Some(file.clone()));
        m.event("release");
        m.reset("0000:03:00.0", "clean");
        m.latency(Duration::from_millis(3));
        m.drops(2);
        m.drops(5);
        m.verdict("0000:03:00.0", false);
        m.gave_up("0000:03:00.0");
        let t = m.render();
        for want in [
            "qcom_reset_device_clean{bdf=\"0000:03:00.0\"} 0",
            "qcom_reset_device_gave_up{bdf=\"0000:03:00.0\"} 1",
            "qcom_reset_events_total{kind=\"release\"} 1",
            "qcom_reset_resets_total{bdf=\"0000:03:00.0\",result=\"clean\"} 1",
            "qcom_reset_event_to_action_seconds_bucket{le=\"0.001\"} 0",
            "qcom_reset_event_to_action_seconds_bucket{le=\"0.005\"} 1",
            // A running total of 2, then 5: the counter is at 5, not 7.
            "qcom_reset_ringbuf_dropped_events_total 5",
            "# TYPE qcom_reset_ringbuf_dropped_events counter",
            &format!(
                "qcom_reset_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(t.contains(want), "{want}: {t}");
        }
        let written = std::fs::read_to_string(&file).unwrap();
        assert!(
            written.contains("qcom_reset_device_gave_up{bdf=\"0000:03:00.0\"} 1"),
            "the textfile follows every change: {written}"
        );
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() == 1,
            "no temporary left"
        );
    }

    /// Issue 20: node_exporter's textfile collector parses the classic format, as user
    /// `prometheus`. An OpenMetrics file made the counters `untyped` (their HELP/TYPE named the
    /// family without `_total`) and the unit's UMask=0077 made it unreadable (0600).
    #[test]
    fn the_textfile_is_classic_text_readable_by_others_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qcom_reset.prom");
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        let m = Metrics::new(Some(file.clone()));
        m.event("release");
        m.reset("0000:03:00.0", "clean");
        m.skipped("policy");
        m.drops(1);
        m.duration(Duration::from_millis(700));
        m.probe("vfio_pci_core_disable", Some(true));
        m.probe("vfio_pci_core_enable", Some(false));
        m.probe("vfio_pci_core_enable", None);
        m.verdict("0000:03:00.0", true);
        m.gave_up("0000:04:00.0");
        m.device_info(DeviceInfo {
            bdf: "0000:03:00.0".into(),
            profile: "wcn6855".into(),
            model: "WCN6855".into(),
            regime: "qcom-reset".into(),
            driver: "vfio-pci".into(),
        });
        let info = m.info_of.lock().unwrap()["0000:03:00.0"].clone();
        m.device_info(DeviceInfo {
            driver: "none".into(),
            ..info
        });
        m.heartbeat();
        rustix::process::umask(old);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let t = std::fs::read_to_string(&file).unwrap();
        assert!(!t.contains("# EOF"), "{t}");
        for counter in ["events", "resets", "skipped", "ringbuf_dropped_events"] {
            let name = format!("qcom_reset_{counter}_total");
            assert!(
                t.contains(&format!("# TYPE {name} counter\n")),
                "{name}: {t}"
            );
            assert!(t.contains(&format!("# HELP {name} ")), "{name}: {t}");
        }
        assert!(
            t.contains("# TYPE qcom_reset_reset_duration_seconds histogram"),
            "{t}"
        );
        assert_eq!(
            t.matches("qcom_reset_device_info{").count(),
            1,
            "a changed driver replaces the series: {t}"
        );
        assert!(t.contains("driver=\"none\""), "{t}");
        assert!(
            !t.contains("function=\"vfio_pci_core_enable\""),
            "an unloaded module's probe has no series: {t}"
        );
        let beat: f64 = t
            .lines()
            .find_map(|l| l.strip_prefix("qcom_reset_last_update_timestamp_seconds "))
            .expect("heartbeat")
            .parse()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - beat).abs() < 60.0, "{beat} vs {now}");
        // `cargo xtask monitoring` feeds this file to promtool and a real node_exporter.
        if let Some(sample) = std::env::var_os("QCOM_RESET_TEXTFILE_SAMPLE") {
            std::fs::copy(&file, sample).unwrap();
        }
    }
}
