//! The host's assertions on what a scenario's guest printed and the simulator reported; each
//! scenario's are in the file of its kind, the line readers they share here.
pub(super) mod handover;
pub(super) mod host;
pub(super) mod journal;
pub(super) mod judge;
pub(super) mod loops;
pub(super) mod probes;
pub(super) mod safety;

use anyhow::{Context as _, ensure};

use crate::vm::qemu::section;
use crate::vm::records::SimReport;
pub(crate) use crate::vm::records::json_lines;
/// The single sim-report expectation every loop shares: family, conformance, write count.
pub(crate) fn check_sim(
    sim: Option<&SimReport>,
    family: &str,
    writes: usize,
) -> anyhow::Result<()> {
    let sim = sim.context("no simulator report")?;
    ensure!(sim.family == family, "simulated family {}", sim.family);
    ensure!(
        writes == 0 || sim.conformance.ok,
        "the simulator saw a wrong sequence: {:?}",
        sim.conformance
    );
    ensure!(
        sim.writes.len() == writes,
        "expected {writes} write(s): {:?}",
        sim.writes
    );
    Ok(())
}
/// The first stamped agent log line holding `pattern`, and its CLOCK_MONOTONIC ns.
pub(crate) fn stamped<'a>(log: &[&'a str], pattern: &str) -> anyhow::Result<(&'a str, u64)> {
    log.iter()
        .find(|l| l.contains(pattern))
        .and_then(|l| Some((*l, l.rsplit(' ').next()?.trim().parse().ok()?)))
        .with_context(|| format!("no stamped agent line with {pattern:?}"))
}
/// One kprobe hit of the `trace` section: the task's comm, its time (ns), event and device.
pub(crate) struct Hit {
    comm: String,
    ns: u64,
    event: String,
    dev: String,
}
pub(crate) fn hits(console: &str) -> Vec<Hit> {
    section(console, "trace")
        .iter()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            // "  qcom-reset-152  [001] .....  35.123456: config: (pci_write_config+0x0/..) dev=\"..\" .."
            let (task, rest) = l.split_once(" [")?;
            let comm = task.trim().rsplit_once('-')?.0.to_string();
            let mut words = rest.split_whitespace();
            let ts = words.find_map(|w| w.strip_suffix(':')?.parse::<f64>().ok())?;
            let event = words.next()?.trim_end_matches(':').to_string();
            let dev = rest.split("dev=\"").nth(1)?.split('"').next()?.to_string();
            Some(Hit {
                comm,
                ns: (ts * 1e9) as u64,
                event,
                dev,
            })
        })
        .collect()
}
