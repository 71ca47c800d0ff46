//! Prometheus metrics (prometheus-client): served on 127.0.0.1 by a small hyper HTTP/1 server
//! with timeouts and a connection limit when a port is configured, and written to a
//! node_exporter textfile-collector file (atomic rename) when a path is, so fleets that already
//! scrape node_exporter see every host's resets with no new port.
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::warn;

/// Upper bounds (seconds) of the event-to-action latency histogram.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0];
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

pub struct Metrics {
    registry: Registry,
    events: Family<Kind, Counter>,
    resets: Family<Result, Counter>,
    skipped: Family<Reason, Counter>,
    drops: Gauge,
    latency: Histogram,
    clean: Family<Device, Gauge>,
    gave_up: Family<Device, Gauge>,
    /// node_exporter textfile collector output, rewritten on every change.
    textfile: Option<PathBuf>,
    write_lock: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

impl Metrics {
    pub fn new(textfile: Option<PathBuf>) -> Metrics {
        let mut registry = Registry::with_prefix("qcom_reset");
        let events = Family::<Kind, Counter>::default();
        let resets = Family::<Result, Counter>::default();
        let skipped = Family::<Reason, Counter>::default();
        let drops = Gauge::default();
        let latency = Histogram::new(BUCKETS);
        registry.register("events", "Probe events received, by kind", events.clone());
        registry.register(
            "resets",
            "Reset attempts, by resulting verdict (clean, stale, crashed, not-ready, link-down, wrong-identity, error, dry-run)",
            resets.clone(),
        );
        registry.register(
            "skipped",
            "Triggers not acted on, by reason",
            skipped.clone(),
        );
        registry.register(
            "ringbuf_drops",
            "Events lost in the kernel ring buffer since the agent started",
            drops.clone(),
        );
        registry.register(
            "event_to_action_seconds",
            "Time from receiving an event to starting the reset",
            latency.clone(),
        );
        let clean = Family::<Device, Gauge>::default();
        let gave_up = Family::<Device, Gauge>::default();
        registry.register(
            "device_clean",
            "1 when the device's last verdict was clean (the next owner can use it), else 0",
            clean.clone(),
        );
        registry.register(
            "device_gave_up",
            "1 while the agent has given up on the device (max_attempts failed; cool-down)",
            gave_up.clone(),
        );
        Metrics {
            registry,
            clean,
            gave_up,
            events,
            resets,
            skipped,
            drops,
            latency,
            textfile,
            write_lock: Mutex::new(()),
        }
    }

    pub fn event(&self, kind: &str) {
        self.events.get_or_create(&Kind { kind: kind.into() }).inc();
        self.changed();
    }

    /// A reset attempt ended with this result (a verdict, "error" or "dry-run").
    pub fn reset(&self, result: &str) {
        self.resets
            .get_or_create(&Result {
                result: result.into(),
            })
            .inc();
        self.changed();
    }

    pub fn skipped(&self, reason: &str) {
        self.skipped
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
        self.changed();
    }

    pub fn drops(&self, total: u64) {
        self.drops.set(total as i64);
        self.changed();
    }

    /// The device's latest verdict; a clean one also ends any give-up.
    pub fn verdict(&self, bdf: &str, clean: bool) {
        let d = Device { bdf: bdf.into() };
        self.clean.get_or_create(&d).set(clean as i64);
        if clean {
            self.gave_up.get_or_create(&d).set(0);
        }
        self.changed();
    }

    pub fn gave_up(&self, bdf: &str) {
        self.gave_up
            .get_or_create(&Device { bdf: bdf.into() })
            .set(1);
        self.changed();
    }

    pub fn latency(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
        self.changed();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }

    /// Rewrites the textfile, if configured: a temporary file renamed over the old one, so
    /// node_exporter never reads half a file.
    fn changed(&self) {
        let Some(path) = &self.textfile else {
            return;
        };
        let _one_writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = write_atomically(path, &self.render()) {
            warn!("metrics textfile {}: {e}", path.display());
        }
    }
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("prom.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Serves `GET /metrics` on 127.0.0.1:`port` (HTTP/1, header timeout, at most
/// `MAX_CONNECTIONS` at once) until the task is dropped.
pub async fn serve(metrics: std::sync::Arc<Metrics>, port: u16) -> std::io::Result<()> {
    serve_with(metrics, port, HEADER_TIMEOUT).await
}

async fn serve_with(
    metrics: std::sync::Arc<Metrics>,
    port: u16,
    header_timeout: Duration,
) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
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
        let server = tokio::spawn(serve_with(m, port, Duration::from_millis(300)));
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
        m.reset("clean");
        m.latency(Duration::from_millis(3));
        m.drops(2);
        m.verdict("0000:03:00.0", false);
        m.gave_up("0000:03:00.0");
        let t = m.render();
        assert!(
            t.contains("qcom_reset_device_clean{bdf=\"0000:03:00.0\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("qcom_reset_device_gave_up{bdf=\"0000:03:00.0\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("qcom_reset_events_total{kind=\"release\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("qcom_reset_resets_total{result=\"clean\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("qcom_reset_event_to_action_seconds_bucket{le=\"0.001\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("qcom_reset_event_to_action_seconds_bucket{le=\"0.005\"} 1"),
            "{t}"
        );
        assert!(t.contains("qcom_reset_ringbuf_drops 2"), "{t}");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            t,
            "the textfile follows every change"
        );
        assert!(!dir.path().join("qcom_reset.prom.tmp").exists());
    }
}
