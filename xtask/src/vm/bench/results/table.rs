//! The results as the table docs/performance.md carries: each measure, qcom-reset's value,
//! bpftrace's where it has one, and their ratio.
use super::{MODEMS, OTHER, Options, PHASES, Results, median, pct};

impl Results {
    pub fn table(&self, kernel: &str, o: &Options) -> String {
        let mut t = Table(format!(
            "\n`cargo xtask bench-lab --kernel {} --releases {} --idle {}` (guest kernel {kernel}, QEMU/TCG, 2 vCPUs, vfio-user cards)\n\n| measure | qcom-reset | peer (bpftrace) | ratio |\n|---|---|---|---|\n",
            o.kernel, o.releases, o.idle_s
        ));
        self.attach_rows(&mut t);
        self.detection_rows(&mut t);
        self.reset_rows(&mut t);
        self.cost_rows(&mut t);
        self.scale_rows(&mut t);
        t.0
    }

    /// Loading and attaching, against bpftrace's; peak memory.
    fn attach_rows(&self, t: &mut Table) {
        let (a, b) = (median(&self.attach_ours), median(&self.attach_bt));
        t.row(
            format!("load + attach, median of {} (ms)", self.attach_ours.len()),
            format!("{a:.0}"),
            format!("{b:.0}"),
            ratio(a, b),
        );
        let k = median(&self.attach_kprobe);
        t.row(
            "... with `--flavour kprobe`".into(),
            format!("{k:.0}"),
            format!("{b:.0}"),
            ratio(k, b),
        );
        t.row(
            "peak memory at attach, median: auto / kprobe (MB)".into(),
            format!(
                "{:.1} / {:.1}",
                median(&self.hwm_auto) / 1024.0,
                median(&self.hwm_kprobe) / 1024.0
            ),
            dash(),
            dash(),
        );
    }

    /// Release returned → the agent has it, against bpftrace's, and where that time goes.
    fn detection_rows(&self, t: &mut Table) {
        for p in [50.0, 95.0, 99.0] {
            let (x, y) = (pct(&self.detect_ours, p), pct(&self.detect_bt, p));
            t.row(
                format!(
                    "detection p{p}: release returned -> agent has it (ms; {} / {} releases)",
                    self.detect_ours.len(),
                    self.detect_bt.len()
                ),
                format!("{x:.2}"),
                format!("{y:.2}"),
                ratio(x, y),
            );
        }
        t.row(
            "... of which ring-buffer wake-up / hand-off to the decision, p50 / p99 (ms)".into(),
            format!(
                "{:.2} / {:.2}, {:.3} / {:.3}",
                pct(&self.detect_wake, 50.0),
                pct(&self.detect_wake, 99.0),
                pct(&self.detect_handoff, 50.0),
                pct(&self.detect_handoff, 99.0)
            ),
            dash(),
            dash(),
        );
        t.row(
            "event -> reset start p50 / p99 (ms)".into(),
            format!(
                "{:.1} / {:.1}",
                pct(&self.to_reset, 50.0),
                pct(&self.to_reset, 99.0)
            ),
            dash(),
            dash(),
        );
    }

    /// The reset beyond the card's floor, the guest's unit costs, each phase.
    fn reset_rows(&self, t: &mut Table) {
        t.row(
            format!(
                "WLAN reset beyond the card's floor ({} ms), p50 / p99 (ms; {} resets)",
                self.floor_ms.map_or("?".into(), |f| format!("{f:.0}")),
                self.resets
            ),
            format!(
                "{:.1} / {:.1}",
                pct(&self.beyond_floor, 50.0),
                pct(&self.beyond_floor, 99.0)
            ),
            dash(),
            dash(),
        );
        let u = |k: &str| {
            let v = &self.unit_costs[k];
            format!(
                "{:.0} / {:.0}",
                v[0].as_f64().unwrap_or(f64::NAN),
                v[1].as_f64().unwrap_or(f64::NAN)
            )
        };
        t.row(
            "the guest's unit costs, p50 / p99 (µs): 1 ms sleep's overshoot; clock read (clocksource); VFIO config read; BAR0 read"
                .into(),
            format!(
                "{}; {} ({}); {}; {}",
                u("sleep_overshoot_us"),
                u("clock_read_us"),
                self.unit_costs["clocksource"].as_str().unwrap_or("?"),
                u("config_read_us"),
                u("mmio_read_us")
            ),
            dash(),
            dash(),
        );
        for (i, name) in PHASES.iter().enumerate() {
            let v: Vec<f64> = self.phases.iter().map(|p| p[i] / 1000.0).collect();
            t.row(
                format!("... phase {name}, p50 / p99 (ms)"),
                format!("{:.2} / {:.2}", pct(&v, 50.0), pct(&v, 99.0)),
                dash(),
                dash(),
            );
        }
    }

    /// Start-up, memory, and what idling costs.
    fn cost_rows(&self, t: &mut Table) {
        t.row(
            "agent start -> \"agent running\" (ms)".into(),
            format!("{:.0}", self.agent_start_ms),
            dash(),
            dash(),
        );
        let r = |x: (u64, u64, u64)| {
            format!(
                "{:.1} / {:.1} MB, {} threads",
                x.0 as f64 / 1024.0,
                x.1 as f64 / 1024.0,
                x.2
            )
        };
        t.row(
            "RSS / peak after start".into(),
            r(self.rss_start),
            dash(),
            dash(),
        );
        t.row(
            format!("RSS / peak after {:.0} s idle", self.idle.secs),
            r(self.rss_idle),
            dash(),
            dash(),
        );
        t.row(
            format!("RSS / peak after {} resets", self.resets),
            r(self.rss_after),
            dash(),
            dash(),
        );
        t.row(
            format!(
                "idle {:.0} s: CPU time, context switches (all threads)",
                self.idle.secs
            ),
            format!("{:.0} ms, {}", self.idle.cpu_ms, self.idle.switches),
            dash(),
            dash(),
        );
    }

    /// Eight modems at once, and a flood of non-target releases.
    fn scale_rows(&self, t: &mut Table) {
        t.row(
            format!(
                "{} modems released together vs 1 (ms, 2 s mandated each)",
                MODEMS.len()
            ),
            format!("{:.0} vs {:.0}", self.all_cards_ms, self.one_card_ms),
            dash(),
            ratio(self.all_cards_ms, self.one_card_ms),
        );
        if let Some((one, all)) = self.recovery.split_first().filter(|(_, a)| !a.is_empty()) {
            let worst = all.iter().copied().fold(f64::MIN, f64::max);
            t.row(
                "each modem's release -> its clean action: alone vs the slowest of the eight (ms)"
                    .into(),
                format!("{worst:.0} vs {one:.0}"),
                dash(),
                ratio(worst, *one),
            );
        }
        let f = &self.flood;
        t.row(
            format!("non-target ({OTHER}) VFIO releases per second reached"),
            f.rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            dash(),
            dash(),
        );
        t.row(
            "agent CPU during the releases: alone / with a target release (% of one CPU)".into(),
            format!(
                "{:.2} / {:.2} ({:.0} / {:.0} ms over {:.0} s)",
                f.alone.share(),
                f.with_target.share(),
                f.alone.cpu_ms,
                f.with_target.cpu_ms,
                f.alone.secs
            ),
            dash(),
            dash(),
        );
        t.row(
            "non-target events reaching the agent, lost events, target release detected in (ms)"
                .into(),
            format!("{}, {}, {:.2}", f.events, f.lost, f.detect),
            dash(),
            dash(),
        );
    }
}

/// The results table, a row at a time.
pub(super) struct Table(String);

impl Table {
    fn row(&mut self, m: String, ours: String, peer: String, ratio: String) {
        self.0
            .push_str(&format!("| {m} | {ours} | {peer} | {ratio} |\n"));
    }
}

fn dash() -> String {
    "-".to_string()
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}
