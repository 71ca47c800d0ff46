//! The figures of one bench-lab boot: read from the guest's `VMLAB` lines, the agent's journal
//! and bpftrace's stamped output, then printed as one table.
mod table;

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{MODEMS, OTHER, Options, WLAN};
use crate::vm::qemu::section;

/// Every figure the guest and the journal give.
pub struct Results {
    attach_ours: Vec<f64>,
    attach_kprobe: Vec<f64>,
    /// Peak memory (kB) of `trace` at its attach record: auto (now kprobes where the kernel has them), kprobe.
    hwm_auto: Vec<f64>,
    hwm_kprobe: Vec<f64>,
    /// The guest's price of a 1 ms sleep's overshoot, a VFIO config read and a BAR0 read (µs,
    /// p50 and p99).
    unit_costs: Value,
    attach_bt: Vec<f64>,
    agent_start_ms: f64,
    rss_start: (u64, u64, u64),
    rss_idle: (u64, u64, u64),
    rss_after: (u64, u64, u64),
    idle: Window,
    /// Release returned -> the agent has it, per WLAN release (ms).
    detect_ours: Vec<f64>,
    /// ...split: release returned -> taken from the ring buffer...
    detect_wake: Vec<f64>,
    /// ...and taken -> at the decision.
    detect_handoff: Vec<f64>,
    detect_bt: Vec<f64>,
    to_reset: Vec<f64>,
    /// Each clean WLAN reset beyond the card's floor (ms), and its phases (µs).
    beyond_floor: Vec<f64>,
    phases: Vec<[f64; 5]>,
    floor_ms: Option<f64>,
    resets: usize,
    one_card_ms: f64,
    all_cards_ms: f64,
    /// Each modem's own release (its return) to its clean action (ms): the one alone, then the
    /// eight released together.
    recovery: Vec<f64>,
    flood: Flood,
}

/// The agent's CPU over a window: (utime+stime ticks, context switches, monotonic ns) at both
/// ends.
struct Window {
    cpu_ms: f64,
    switches: u64,
    secs: f64,
}

impl Window {
    fn of(console: &str, before: &str, after: &str) -> anyhow::Result<Window> {
        let (c0, s0, t0) = cpu(one(console, before)?)?;
        let (c1, s1, t1) = cpu(one(console, after)?)?;
        Ok(Window {
            // USER_HZ is 100 on every Debian kernel.
            cpu_ms: c1.saturating_sub(c0) as f64 * 10.0,
            switches: s1.saturating_sub(s0),
            secs: t1.saturating_sub(t0) as f64 / 1e9,
        })
    }

    /// Share of one CPU, in percent.
    fn share(&self) -> f64 {
        self.cpu_ms / (self.secs * 1000.0) * 100.0
    }
}

/// Non-target releases: the rate reached, the agent's CPU alone and with a target release in
/// the middle, and what reached the agent.
struct Flood {
    rates: Vec<f64>,
    alone: Window,
    with_target: Window,
    /// Events of the non-target in the journal (the in-kernel filter should leave none).
    events: u64,
    /// "events lost" warnings of the agent.
    lost: u64,
    /// Detection of the target release made during the flood (ms).
    detect: f64,
}

fn tagged<'a>(console: &'a str, tag: &str) -> Vec<&'a str> {
    let t = format!("VMLAB {tag} ");
    console.lines().filter_map(|l| l.split(&t).nth(1)).collect()
}

fn one<'a>(console: &'a str, tag: &str) -> anyhow::Result<&'a str> {
    tagged(console, tag)
        .into_iter()
        .next()
        .with_context(|| format!("the guest printed no {tag}"))
}

/// (VmRSS kB, VmHWM kB, threads) from "VmRSS: N kB VmHWM: N kB threads=T".
fn rss(s: &str) -> anyhow::Result<(u64, u64, u64)> {
    let w: Vec<&str> = s.split_whitespace().collect();
    let after = |k: &str| -> anyhow::Result<u64> {
        let i = w
            .iter()
            .position(|x| *x == k)
            .with_context(|| format!("{k} in {s:?}"))?;
        Ok(w[i + 1].parse()?)
    };
    let threads = w
        .iter()
        .find_map(|x| x.strip_prefix("threads="))
        .context("threads")?
        .parse()?;
    Ok((after("VmRSS:")?, after("VmHWM:")?, threads))
}

/// (utime+stime ticks, context switches, monotonic ns) from a CPU sample.
fn cpu(s: &str) -> anyhow::Result<(u64, u64, u64)> {
    let n: Vec<u64> = s
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(n.len() == 4, "cpu sample {s:?}");
    Ok((n[0] + n[1], n[2], n[3]))
}

/// The least a WLAN reset can take on the simulated card (ms), from its simulator's report.
pub fn floor_ms(report: &Value) -> anyhow::Result<f64> {
    let us = report["reset_floor_us"]
        .as_u64()
        .context("the WLAN simulator's report has no reset_floor_us")?;
    Ok(us as f64 / 1000.0)
}

/// (return -> taken, taken -> decision) of a release event in the journal, in ms. An agent from
/// before the split (`--agent`) journals only the decision's stamp: all of it is the first.
fn detection(v: &Value) -> anyhow::Result<(f64, f64)> {
    let done = v["event"]["ktime_ns"].as_u64().unwrap_or(0)
        + v["event"]["duration_ns"].as_u64().unwrap_or(0);
    let got = v["received_mono_ns"].as_u64().context("received_mono_ns")?;
    let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
    Ok(match v["taken_mono_ns"].as_u64() {
        Some(taken) => (ms(taken, done), ms(got, taken)),
        None => (ms(got, done), f64::NAN),
    })
}

const PHASES: [&str; 5] = ["own", "guard", "sequence", "verify", "restore"];

/// Each modem action's time from its card's latest release before it (ms), in journal order.
fn recoveries(journal: &[Value]) -> Vec<f64> {
    let mut released = std::collections::HashMap::new();
    let mut out = Vec::new();
    for v in journal {
        if v["type"] == "event" && v["event"]["kind"] == "release" {
            let done = v["event"]["ktime_ns"].as_u64().unwrap_or(0)
                + v["event"]["duration_ns"].as_u64().unwrap_or(0);
            released.insert(v["event"]["bdf"].to_string(), done);
        }
        let bdf = v["action"]["bdf"].as_str().unwrap_or("");
        if v["type"] == "action" && MODEMS.contains(&bdf) && v["action"]["result"] == "clean" {
            let (Some(end), Some(start)) = (
                v["mono_ns"].as_u64(),
                released.get(&v["action"]["bdf"].to_string()),
            ) else {
                continue;
            };
            out.push(end.saturating_sub(*start) as f64 / 1e6);
        }
    }
    out
}

impl Results {
    pub fn parse(console: &str, floor_ms: Option<f64>) -> anyhow::Result<Results> {
        let nums = |tag| -> anyhow::Result<Vec<f64>> {
            tagged(console, tag)
                .iter()
                .map(|s| Ok(s.trim().parse()?))
                .collect()
        };
        let journal: Vec<Value> = section(console, "journal")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let releases: Vec<(f64, f64)> = journal
            .iter()
            .filter(|v| {
                v["type"] == "event" && v["event"]["kind"] == "release" && v["event"]["bdf"] == WLAN
            })
            .map(detection)
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            releases.len() >= 2,
            "the journal has {} WLAN releases",
            releases.len()
        );
        // The last WLAN release is the one made during the flood.
        let (flood_release, loop_releases) = releases.split_last().expect("checked");
        let wlan: Vec<&Value> = journal
            .iter()
            .filter(|v| {
                v["type"] == "action"
                    && v["action"]["bdf"] == WLAN
                    && v["action"]["result"] == "clean"
            })
            .map(|v| &v["action"])
            .collect();
        let phases = phases(&wlan);
        let beyond_floor = beyond_floor(&wlan, &phases, floor_ms);
        let detect_bt = bpftrace_detection(console);
        let rates = flood_rates(console);
        Ok(Results {
            attach_ours: nums("attach-ours")?,
            attach_kprobe: nums("attach-kprobe")?,
            hwm_auto: nums("hwm-auto")?,
            hwm_kprobe: nums("hwm-kprobe")?,
            unit_costs: serde_json::from_str(one(console, "unit-costs")?)?,
            attach_bt: nums("attach-bpftrace")?,
            agent_start_ms: one(console, "agent-start")?
                .split_whitespace()
                .next()
                .unwrap_or("")
                .parse()?,
            rss_start: rss(one(console, "rss-start")?)?,
            rss_idle: rss(one(console, "rss-idle")?)?,
            rss_after: rss(one(console, "rss-after")?)?,
            idle: Window::of(console, "idle-before", "idle-after")?,
            resets: wlan.len(),
            // `max` drops the NaN hand-off of an agent that journals one stamp.
            detect_ours: loop_releases.iter().map(|(w, h)| w + h.max(0.0)).collect(),
            detect_wake: loop_releases.iter().map(|(w, _)| *w).collect(),
            detect_handoff: loop_releases.iter().map(|(_, h)| *h).collect(),
            detect_bt,
            to_reset: wlan
                .iter()
                .filter_map(|a| a["latency_ms"].as_f64())
                .collect(),
            beyond_floor,
            phases,
            floor_ms,
            one_card_ms: one(console, "one-card")?.trim().parse()?,
            all_cards_ms: one(console, "all-cards")?.trim().parse()?,
            recovery: recoveries(&journal),
            flood: Flood {
                rates,
                alone: Window::of(console, "flood-before", "flood-after")?,
                with_target: Window::of(console, "flood-with-before", "flood-with-after")?,
                events: one(console, "flood-events")?.trim().parse()?,
                lost: one(console, "lost")?.trim().parse()?,
                detect: flood_release.0 + flood_release.1.max(0.0),
            },
        })
    }
}

/// Each clean WLAN reset's phases, in µs.
fn phases(wlan: &[&Value]) -> Vec<[f64; 5]> {
    wlan.iter()
        .map(|a| {
            PHASES.map(|p| {
                a["report"]["phases"][format!("{p}_us")]
                    .as_f64()
                    .unwrap_or(0.0)
            })
        })
        .collect()
}

/// Each reset beyond the card's floor, in ms; an agent without phases (`--agent`): its whole
/// duration, to the ms.
fn beyond_floor(wlan: &[&Value], phases: &[[f64; 5]], floor_ms: Option<f64>) -> Vec<f64> {
    wlan.iter()
        .zip(phases)
        .map(|(a, p)| {
            let total = match p.iter().sum::<f64>() {
                0.0 => a["report"]["duration_ms"].as_f64().unwrap_or(f64::NAN),
                us => us / 1000.0,
            };
            total - floor_ms.unwrap_or(f64::NAN)
        })
        .collect()
}

/// bpftrace's detection of each release: its stamp minus the release's, in ms.
fn bpftrace_detection(console: &str) -> Vec<f64> {
    section(console, "bpftrace")
        .iter()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let at: u64 = it.next()?.parse().ok()?;
            let got: u64 = it.next()?.parse().ok()?;
            Some(got.saturating_sub(at) as f64 / 1e6)
        })
        .collect()
}

/// The non-target releases per second each flood reached.
fn flood_rates(console: &str) -> Vec<f64> {
    tagged(console, "flood-rate")
        .iter()
        .filter_map(|s| {
            let mut it = s.split_whitespace();
            let n: f64 = it.next()?.parse().ok()?;
            let ns: f64 = it.next()?.parse().ok()?;
            Some(n / (ns / 1e9))
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    pct(v, 50.0)
}

/// Nearest-rank percentile.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            (pct(&v, 50.0), pct(&v, 95.0), pct(&v, 99.0)),
            (50.0, 95.0, 99.0)
        );
        assert_eq!(pct(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert!(pct(&[], 50.0).is_nan());
    }

    #[test]
    fn parses_the_guest_samples() {
        assert_eq!(
            rss("VmRSS: 12345 kB VmHWM: 20000 kB threads=4").unwrap(),
            (12345, 20000, 4)
        );
        assert_eq!(cpu("3 4 120 5000000000").unwrap(), (7, 120, 5_000_000_000));
        assert!(cpu("3 4").is_err());
    }

    /// The journal's two stamps split the detection; the simulator's report gives the floor.
    #[test]
    fn splits_detection_and_reads_the_floor() {
        let v = serde_json::json!({"taken_mono_ns": 3_500_000u64, "received_mono_ns": 3_600_000u64,
            "event": {"ktime_ns": 1_000_000u64, "duration_ns": 500_000u64}});
        let (wake, handoff) = detection(&v).unwrap();
        assert!((wake - 2.0).abs() < 1e-9 && (handoff - 0.1).abs() < 1e-9);
        assert!(detection(&serde_json::json!({"event": {}})).is_err());
        let old = serde_json::json!({"received_mono_ns": 3_600_000u64,
            "event": {"ktime_ns": 1_000_000u64, "duration_ns": 500_000u64}});
        let (all, none) = detection(&old).unwrap();
        assert!((all - 2.1).abs() < 1e-9 && none.is_nan());
        let r = serde_json::json!({"family": "wlan", "reset_floor_us": 60_000});
        assert_eq!(floor_ms(&r).unwrap(), 60.0);
        assert!(floor_ms(&serde_json::json!({})).is_err());
    }

    /// Each modem's action is timed from its own card's latest release; other cards, actions
    /// without a stamp and verdicts other than clean are left out.
    #[test]
    fn recovery_is_timed_from_each_cards_own_release() {
        let rel = |bdf: &str, at: u64| {
            serde_json::json!({"type": "event", "event": {"kind": "release", "bdf": bdf,
                "ktime_ns": at, "duration_ns": 0}})
        };
        let act = |bdf: &str, at: u64, result: &str| {
            serde_json::json!({"type": "action", "mono_ns": at,
                "action": {"bdf": bdf, "result": result}})
        };
        let (a, b) = (MODEMS[0], MODEMS[1]);
        let j = vec![
            rel(a, 1_000_000),
            rel(b, 2_000_000),
            rel(WLAN, 2_500_000),
            act(WLAN, 3_000_000, "clean"),
            act(b, 5_000_000, "clean"),
            act(a, 9_000_000, "stale"),
            rel(a, 10_000_000),
            act(a, 14_000_000, "clean"),
            serde_json::json!({"type": "action", "action": {"bdf": a, "result": "clean"}}),
        ];
        assert_eq!(recoveries(&j), [3.0, 4.0]);
    }

    /// A share of one CPU from tick counts over a window.
    #[test]
    fn cpu_share_of_a_window() {
        let w = Window {
            cpu_ms: 50.0,
            switches: 0,
            secs: 10.0,
        };
        assert!((w.share() - 0.5).abs() < 1e-9);
    }
}
