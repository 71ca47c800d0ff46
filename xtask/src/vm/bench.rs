//! `cargo xtask bench-lab`: the agent measured in the VM lab against a peer in the same guest.
//! One boot: five simulated cards (a WCN6855 for the release loop, four SDX65 released together),
//! Debian's bpftrace from the host's root shared read-only (virtio-9p) and run in a chroot, so
//! both tools see the same kernel at the same time. Prints one table; each figure with its ratio
//! to the peer where there is one.
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use super::scenarios::LIB;
use super::{Sim, build, guest_image_with, host, kernel, qemu, scenarios};

/// The probe set of `qcom-reset trace`, as bpftrace kprobes/kretprobes.
const FUNCS: [&str; 9] = [
    "pci_reset_function",
    "pci_try_reset_function",
    "pci_reset_function_locked",
    "__pci_reset_function_locked",
    "pci_reset_bus",
    "pci_dev_specific_reset",
    "pci_reset_bus_function",
    "vfio_pci_core_enable",
    "vfio_pci_core_disable",
];
const WLAN: &str = "0000:00:10.0";
const MODEMS: [&str; 4] = [
    "0000:00:11.0",
    "0000:00:12.0",
    "0000:00:13.0",
    "0000:00:14.0",
];

pub struct Options {
    pub kernel: String,
    pub releases: usize,
    pub idle_s: u64,
    /// Re-read a saved guest console instead of booting.
    pub from_log: Option<std::path::PathBuf>,
}

pub fn bench_lab(o: &Options) -> anyhow::Result<()> {
    ensure!(o.releases >= 50, "--releases must be at least 50 for a p99");
    if let Some(log) = &o.from_log {
        let console = std::fs::read_to_string(log)?;
        print!("{}", Results::parse(&console)?.table(&o.kernel, o));
        return Ok(());
    }
    if !std::path::Path::new("/usr/bin/bpftrace").exists() {
        eprintln!("xtask: installing bpftrace (the peer) from Debian");
        host::apt_install(&["bpftrace"])?;
    }
    let bins = build()?;
    let k = kernel(&o.kernel)?;
    let ird = guest_image_with(&k, &bins, &["virtio_pci", "9pnet_virtio", "9p"])?;
    ird.add_text("/init", scenarios::INIT, 0o755)?;
    ird.add(&bins.qcom_reset, "/bin/qcom-reset")?;
    ird.add(&bins.guest, "/bin/vmlab-guest")?;
    ird.add_text("/scenario.sh", &script(o), 0o755)?;
    let dir = host::cache_dir().join("runs").join(&k.version);
    std::fs::create_dir_all(&dir)?;
    let cpio = dir.join("bench.cpio");
    ird.write(&cpio)?;
    let mut sims = Vec::new();
    let mut args = vec![
        "-virtfs".to_string(),
        "local,path=/,mount_tag=host,security_model=none,readonly=on".into(),
    ];
    for (i, profile) in ["wcn6855", "sdx65", "sdx65", "sdx65", "sdx65"]
        .iter()
        .enumerate()
    {
        let sim = Sim::start(
            &bins.sim,
            super::CardKind::Ivshmem,
            (profile, ""),
            None,
            (
                "mission",
                super::scenarios::Topology::RootBus,
                "function-reset",
            ),
            &dir,
            &format!("bench{i}"),
        )?;
        let id = format!("simbar{i}");
        args.extend(sim.memory(&id));
        args.extend([
            "-device".into(),
            format!("ivshmem-plain,memdev={id},addr=0x{:x}", 0x10 + i),
        ]);
        sims.push(sim);
    }
    let log = dir.join("bench.log");
    let timeout = Duration::from_secs(600 + o.idle_s + 3 * o.releases as u64);
    println!(
        "bench-lab: {} on {}, {} releases, {} s idle (log {})",
        k.package,
        k.version,
        o.releases,
        o.idle_s,
        log.display()
    );
    let boot = qemu::boot(
        &qemu::Qemu::Host,
        &k.vmlinux,
        &cpio,
        &args,
        timeout,
        &log,
        false,
    )?;
    for s in sims {
        let _ = s.finish();
    }
    if boot.rc != Some(0) {
        let tail: Vec<&str> = boot.console.lines().rev().take(30).collect();
        bail!(
            "the guest ended with {:?}:\n{}",
            boot.rc,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let r = Results::parse(&boot.console)?;
    print!("{}", r.table(&k.version, o));
    Ok(())
}

fn script(o: &Options) -> String {
    let probes = FUNCS
        .iter()
        .map(|f| format!("kprobe:{f}"))
        .collect::<Vec<_>>()
        .join(",");
    let rets = FUNCS
        .iter()
        .map(|f| format!("kretprobe:{f}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut devices = String::new();
    devices.push_str(&format!(
        "[devices.\"{WLAN}\"]\nprofile = \"wcn6855\"\nbar = 2\n"
    ));
    for m in MODEMS {
        devices.push_str(&format!(
            "[devices.\"{m}\"]\nprofile = \"sdx65\"\nbar = 2\n"
        ));
    }
    format!(
        r#"{LIB}
modprobe virtio_pci; modprobe 9pnet_virtio; modprobe 9p
mkdir -p /host && mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host || {{ echo "VMLAB no 9p share"; exit 1; }}
for m in proc sys dev; do mount -o rbind /$m /host/$m; done
mount -t tmpfs tmp /host/tmp
BT="chroot /host /usr/bin/bpftrace -B line"
for d in {WLAN} {modems}; do bind_vfio $d; done
mkdir -p /etc/qcom-reset
cat > /etc/qcom-reset/config.toml <<CONFIG
rescan = false
debounce_ms = 200
journal = "/tmp/journal.jsonl"
state_file = "/tmp/state.json"
{devices}CONFIG
# Attach: time to the first attach record (ours) and to BEGIN after all probes (bpftrace).
for i in 1 2 3 4 5; do
  set -- $(vmlab-guest until '"kind":"attach"' /tmp/t$i.log qcom-reset trace --json); echo "VMLAB attach-ours $1"; kill -INT $2; sleep 1
  set -- $(vmlab-guest until 'ready-now' /tmp/b$i.log $BT -e 'BEGIN {{ printf("r%s\n", "eady-now"); }} {probes} {{ @s[tid] = nsecs; }} {rets} {{ @d = hist(nsecs - @s[tid]); }}'); echo "VMLAB attach-bpftrace $1"; kill -INT $2; sleep 1
done
grep -q Attaching /tmp/b5.log && ! grep -q WARNING /tmp/b5.log || {{ cat /tmp/b5.log; exit 1; }}
echo "VMLAB agent-spawn $(vmlab-guest now)"
set -- $(vmlab-guest until "agent running" /tmp/agent.log qcom-reset run); P=$2; echo "VMLAB agent-start $1"
rss() {{ echo "$(grep -E '^(VmRSS|VmHWM)' /proc/$P/status | tr -s ' \t' ' ' | tr '\n' ' ')threads=$(ls /proc/$P/task | wc -l)"; }}
cpu() {{ echo "$(cut -d' ' -f14,15 /proc/$P/stat) $(cat /proc/$P/task/*/status | awk '/ctxt_switches/ {{s+=$2}} END {{print s}}') $(vmlab-guest now)"; }}
echo "VMLAB rss-start $(rss)"
# Past the blocking pool's 10 s keep-alive: the threads counted live through the window.
sleep 12
echo "VMLAB idle-before $(cpu)"; sleep {idle}; echo "VMLAB idle-after $(cpu)"
echo "VMLAB rss-idle $(rss)"
$BT -e 'kretprobe:vfio_pci_core_disable {{ printf("%llu\n", nsecs); }}' 2>/dev/null | vmlab-guest stamp > /tmp/bt.txt &
wait_for /tmp/bt.txt Attaching 60 || exit 1
sleep 1
actions() {{ n=$(grep -c '"type":"action"' /tmp/journal.jsonl 2>/dev/null); echo ${{n:-0}}; }}
until_actions() {{ i=0; while [ $(actions) -lt $1 ]; do i=$((i+1)); [ $i -gt 1500 ] && {{ echo "VMLAB no action $1"; tail -5 /tmp/agent.log; exit 1; }}; sleep 0.02; done; }}
for i in $(seq 1 {releases}); do vmlab-guest vfio-cycle {WLAN} > /dev/null; until_actions $i; done
echo "VMLAB rss-after $(rss)"
n=$(actions); t0=$(vmlab-guest now); vmlab-guest vfio-cycle {m1} > /dev/null; until_actions $((n+1)); t1=$(vmlab-guest now)
echo "VMLAB one-card $(( (t1-t0)/1000000 ))"
n=$(actions); t0=$(vmlab-guest now); pids=""
for d in {modems}; do vmlab-guest vfio-cycle $d > /dev/null & pids="$pids $!"; done
wait $pids; until_actions $((n+4)); t1=$(vmlab-guest now)
echo "VMLAB four-cards $(( (t1-t0)/1000000 ))"
kill -TERM $P; while kill -0 $P 2>/dev/null; do sleep 0.1; done
kill -INT $(pidof bpftrace) 2>/dev/null; sleep 1
dump journal /tmp/journal.jsonl; dump bpftrace /tmp/bt.txt; head -30 /tmp/agent.log
"#,
        modems = MODEMS.join(" "),
        m1 = MODEMS[0],
        idle = o.idle_s,
        releases = o.releases,
    )
}

/// Every figure the guest and the journal give.
struct Results {
    attach_ours: Vec<f64>,
    attach_bt: Vec<f64>,
    agent_start_ms: f64,
    rss_start: (u64, u64, u64),
    rss_idle: (u64, u64, u64),
    rss_after: (u64, u64, u64),
    idle_cpu_ms: f64,
    idle_switches: u64,
    idle_s: f64,
    detect_ours: Vec<f64>,
    detect_bt: Vec<f64>,
    to_reset: Vec<f64>,
    overhead: Vec<f64>,
    resets: usize,
    one_card_ms: f64,
    four_cards_ms: f64,
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

/// (utime+stime ticks, context switches, monotonic ns) from an idle sample.
fn cpu(s: &str) -> anyhow::Result<(u64, u64, u64)> {
    let n: Vec<u64> = s
        .split_whitespace()
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    ensure!(n.len() == 4, "cpu sample {s:?}");
    Ok((n[0] + n[1], n[2], n[3]))
}

impl Results {
    fn parse(console: &str) -> anyhow::Result<Results> {
        let nums = |tag| -> anyhow::Result<Vec<f64>> {
            tagged(console, tag)
                .iter()
                .map(|s| Ok(s.trim().parse()?))
                .collect()
        };
        let (c0, s0, t0) = cpu(one(console, "idle-before")?)?;
        let (c1, s1, t1) = cpu(one(console, "idle-after")?)?;
        let journal: Vec<Value> = super::qemu::section(console, "journal")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let mut detect_ours = Vec::new();
        for v in journal.iter().filter(|v| {
            v["type"] == "event" && v["event"]["kind"] == "release" && v["event"]["bdf"] == WLAN
        }) {
            let done = v["event"]["ktime_ns"].as_u64().unwrap_or(0)
                + v["event"]["duration_ns"].as_u64().unwrap_or(0);
            let got = v["received_mono_ns"].as_u64().context("received_mono_ns")?;
            detect_ours.push(got.saturating_sub(done) as f64 / 1e6);
        }
        let wlan: Vec<&Value> = journal
            .iter()
            .filter(|v| {
                v["type"] == "action"
                    && v["action"]["bdf"] == WLAN
                    && v["action"]["result"] == "clean"
            })
            .map(|v| &v["action"])
            .collect();
        let to_reset = wlan
            .iter()
            .filter_map(|a| a["latency_ms"].as_f64())
            .collect();
        let overhead = wlan
            .iter()
            .map(|a| {
                let delays: u64 = a["report"]["ops"]
                    .as_array()
                    .map(|ops| {
                        ops.iter()
                            .filter(|o| o["op"] == "delay")
                            .filter_map(|o| o["ms"].as_u64())
                            .sum()
                    })
                    .unwrap_or(0);
                a["report"]["duration_ms"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(delays) as f64
            })
            .collect();
        let detect_bt = super::qemu::section(console, "bpftrace")
            .iter()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let at: u64 = it.next()?.parse().ok()?;
                let got: u64 = it.next()?.parse().ok()?;
                Some(got.saturating_sub(at) as f64 / 1e6)
            })
            .collect();
        Ok(Results {
            attach_ours: nums("attach-ours")?,
            attach_bt: nums("attach-bpftrace")?,
            agent_start_ms: one(console, "agent-start")?
                .split_whitespace()
                .next()
                .unwrap_or("")
                .parse()?,
            rss_start: rss(one(console, "rss-start")?)?,
            rss_idle: rss(one(console, "rss-idle")?)?,
            rss_after: rss(one(console, "rss-after")?)?,
            idle_cpu_ms: (c1 - c0) as f64 * 10.0,
            idle_switches: s1.saturating_sub(s0),
            idle_s: (t1 - t0) as f64 / 1e9,
            resets: wlan.len(),
            detect_ours,
            detect_bt,
            to_reset,
            overhead,
            one_card_ms: one(console, "one-card")?.trim().parse()?,
            four_cards_ms: one(console, "four-cards")?.trim().parse()?,
        })
    }

    fn table(&self, kernel: &str, o: &Options) -> String {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        let (a, b) = (median(&self.attach_ours), median(&self.attach_bt));
        let mut t = format!(
            "\n`cargo xtask bench-lab --kernel {} --releases {} --idle {}` (guest kernel {kernel}, QEMU/TCG, 2 vCPUs)\n\n| measure | qcom-reset | peer (bpftrace) | ratio |\n|---|---|---|---|\n",
            o.kernel, o.releases, o.idle_s
        );
        t.push_str(&format!(
            "| load + attach, median of {} (ms) | {a:.0} | {b:.0} | {} |\n",
            self.attach_ours.len(),
            ratio(a, b)
        ));
        for (p, name) in [(50.0, "p50"), (95.0, "p95"), (99.0, "p99")] {
            let (x, y) = (pct(&self.detect_ours, p), pct(&self.detect_bt, p));
            t.push_str(&format!(
                "| detection {name}: release returned -> received (ms; {} / {} releases) | {x:.2} | {y:.2} | {} |\n",
                self.detect_ours.len(),
                self.detect_bt.len(),
                ratio(x, y)
            ));
        }
        t.push_str(&format!(
            "| event -> reset start p50 / p99 (ms) | {:.1} / {:.1} | - | - |\n",
            pct(&self.to_reset, 50.0),
            pct(&self.to_reset, 99.0)
        ));
        t.push_str(&format!(
            "| WLAN reset + verify beyond the mandated delays, p50 / p99 (ms; {} resets) | {:.0} / {:.0} | - | - |\n",
            self.resets,
            pct(&self.overhead, 50.0),
            pct(&self.overhead, 99.0)
        ));
        t.push_str(&format!(
            "| agent start -> \"agent running\" (ms) | {:.0} | - | - |\n",
            self.agent_start_ms
        ));
        let r = |x: (u64, u64, u64)| {
            format!(
                "{:.1} / {:.1} MB, {} threads",
                x.0 as f64 / 1024.0,
                x.1 as f64 / 1024.0,
                x.2
            )
        };
        t.push_str(&format!(
            "| RSS / peak after start | {} | - | - |\n",
            r(self.rss_start)
        ));
        t.push_str(&format!(
            "| RSS / peak after {:.0} s idle | {} | - | - |\n",
            self.idle_s,
            r(self.rss_idle)
        ));
        t.push_str(&format!(
            "| RSS / peak after {} resets | {} | - | - |\n",
            self.resets,
            r(self.rss_after)
        ));
        t.push_str(&format!(
            "| idle {:.0} s: CPU time, context switches (all threads) | {:.0} ms, {} | - | - |\n",
            self.idle_s, self.idle_cpu_ms, self.idle_switches
        ));
        t.push_str(&format!(
            "| 4 modems released together vs 1 (ms, 2 s mandated each) | {:.0} vs {:.0} | - | {} |\n",
            self.four_cards_ms,
            self.one_card_ms,
            ratio(self.four_cards_ms, self.one_card_ms)
        ));
        t
    }
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
    s.sort_by(|a, b| a.total_cmp(b));
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
}
