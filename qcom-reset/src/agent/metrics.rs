//! Prometheus text metrics, served on 127.0.0.1 only when a port is configured.
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the event-to-action latency histogram.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Inner {
    events: BTreeMap<String, u64>,
    resets: BTreeMap<String, u64>,
    skipped: BTreeMap<String, u64>,
    ringbuf_drops: u64,
    latency_counts: [u64; BUCKETS.len()],
    latency_sum: f64,
    latency_n: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn event(&self, kind: &str) {
        self.with(|i| *i.events.entry(kind.into()).or_default() += 1);
    }

    /// A reset attempt ended with this result (a verdict, "error" or "dry-run").
    pub fn reset(&self, result: &str) {
        self.with(|i| *i.resets.entry(result.into()).or_default() += 1);
    }

    pub fn skipped(&self, reason: &str) {
        self.with(|i| *i.skipped.entry(reason.into()).or_default() += 1);
    }

    pub fn drops(&self, total: u64) {
        self.with(|i| i.ringbuf_drops = total);
    }

    pub fn latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        self.with(|i| {
            for (n, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    i.latency_counts[n] += 1;
                }
            }
            i.latency_sum += s;
            i.latency_n += 1;
        });
    }

    pub fn render(&self) -> String {
        self.with(|i| {
            let mut s = String::new();
            let mut counter = |name: &str, help: &str, label: &str, m: &BTreeMap<String, u64>| {
                s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
                for (k, v) in m {
                    s.push_str(&format!("{name}{{{label}=\"{k}\"}} {v}\n"));
                }
            };
            counter("qcom_reset_events_total", "Probe events received, by kind.", "kind", &i.events);
            counter("qcom_reset_resets_total", "Reset attempts, by resulting verdict.", "result", &i.resets);
            counter("qcom_reset_skipped_total", "Triggers not acted on, by reason.", "reason", &i.skipped);
            s.push_str("# HELP qcom_reset_ringbuf_drops_total Events lost in the kernel ring buffer.\n");
            s.push_str(&format!("# TYPE qcom_reset_ringbuf_drops_total counter\nqcom_reset_ringbuf_drops_total {}\n", i.ringbuf_drops));
            let h = "qcom_reset_event_to_action_seconds";
            s.push_str(&format!("# HELP {h} Time from receiving an event to starting the reset.\n# TYPE {h} histogram\n"));
            for (n, b) in BUCKETS.iter().enumerate() {
                s.push_str(&format!("{h}_bucket{{le=\"{b}\"}} {}\n", i.latency_counts[n]));
            }
            s.push_str(&format!("{h}_bucket{{le=\"+Inf\"}} {}\n{h}_sum {}\n{h}_count {}\n", i.latency_n, i.latency_sum, i.latency_n));
            s
        })
    }
}

/// Serves `GET /metrics` on 127.0.0.1:`port` until the task is dropped.
pub async fn serve(metrics: std::sync::Arc<Metrics>, port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut sock, _) = listener.accept().await?;
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            let req = String::from_utf8_lossy(&buf[..n]);
            let resp = if req.starts_with("GET /metrics ") {
                let body = m.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            sock.write_all(resp.as_bytes()).await.ok()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_on_loopback_only() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let m = std::sync::Arc::new(Metrics::default());
        m.event("release");
        let server = tokio::spawn(serve(m, port));
        let mut body = String::new();
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
                s.read_to_string(&mut body).await.unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains("qcom_reset_events_total{kind=\"release\"} 1"),
            "{body}"
        );
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut other = String::new();
        s.read_to_string(&mut other).await.unwrap();
        assert!(other.starts_with("HTTP/1.1 404"));
        server.abort();
    }

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.event("release");
        m.reset("clean");
        m.latency(Duration::from_millis(3));
        m.drops(2);
        let t = m.render();
        assert!(t.contains("qcom_reset_events_total{kind=\"release\"} 1"));
        assert!(t.contains("qcom_reset_resets_total{result=\"clean\"} 1"));
        assert!(t.contains("qcom_reset_event_to_action_seconds_bucket{le=\"0.001\"} 0"));
        assert!(t.contains("qcom_reset_event_to_action_seconds_bucket{le=\"0.005\"} 1"));
        assert!(t.contains("qcom_reset_ringbuf_drops_total 2"));
    }
}
