//! `cargo xtask demo`: one loop-wlan run, told step by step for a newcomer.
use super::{
    CardKind, Lab, Outcome, Run, Scenario, Topology, build, guest_image, host, kernel, qemu,
    run_scenario,
};

/// The WLAN loop, narrated for someone without the hardware.
pub fn demo(kernel: &str, card: CardKind) -> anyhow::Result<()> {
    let bins = build()?;
    let k = self::kernel(kernel)?;
    let ird = guest_image(&k, &bins)?;
    let lab = Lab::new(card)?;
    explain(&k, card);
    println!("== Booting and running (about 10-20 s under TCG)");
    let run = Run {
        scenario: Scenario::LoopWlan,
        topology: Topology::RootPort,
        state: "mission",
    };
    let o = run_scenario(&lab, &k, &ird, &run, &bins, false)?;
    show(&o);
    println!("\n== Verdict");
    for n in o.notes {
        println!("  {n}");
    }
    Ok(())
}

/// What the demo simulates, before it boots.
fn explain(k: &host::Kernel, card: CardKind) {
    println!("\n== What is simulated");
    println!("A Debian {} kernel boots under QEMU.", k.version);
    match card {
        CardKind::VfioUser => {
            println!("Its PCI bus has a WCN6855 WLAN card (17cb:1103) served, on this host, over");
            println!("vfio-user by qcom-reset-sim: the card's config space and BAR0 with a");
            println!("register-level model of its firmware, whose VM was killed with the firmware");
            println!("session still running (M0). qcom-reset runs as the agent and finds the card");
            println!("by its device table, as on a real host.");
        }
        CardKind::Ivshmem => {
            println!(
                "Its PCI bus has an ivshmem device whose BAR2 is shared memory served, on this"
            );
            println!(
                "host, by qcom-reset-sim: a register-level model of a WCN6855 WLAN card whose VM"
            );
            println!("was killed with its firmware session still running (M0). qcom-reset runs as");
            println!("the agent, configured to treat the ivshmem device as a wcn6855 in BAR2.");
        }
    }
    println!("The card sits behind a PCIe root port, as in an M.2 slot. Kernels before 7.2 list");
    println!("the `bus` reset and secondary-bus-reset it at release, returning success; the");
    println!("simulated firmware, like the real one, does not notice. 7.2 and later (and stable");
    println!("kernels with the Sep 2026 backport) avoid the bus reset for these IDs altogether.\n");
}

/// What the guest, the probes, the agent and the simulated card saw.
fn show(o: &Outcome) {
    println!("\n== The card, as the guest sees it");
    for l in o
        .console
        .lines()
        .filter(|l| l.starts_with("VMLAB lspci:") || l.starts_with("VMLAB card at"))
    {
        println!("  {}", l.trim_start_matches("VMLAB "));
    }
    println!("\n== What the kernel did (seen by the probes)");
    for l in qemu::section(&o.console, "agent-log")
        .iter()
        .filter(|l| l.contains("release ") || l.contains("probe "))
    {
        println!("  {}", l.trim());
    }
    println!("\n== What the agent did");
    for l in qemu::section(&o.console, "agent-log")
        .iter()
        .filter(|l| l.contains("seq=") || l.contains("clean"))
    {
        println!("  {}", l.trim());
    }
    if let Some(sim) = &o.sim {
        println!("\n== What the simulated card received (host side)");
        let t0 = sim.writes.first().map_or(0, |w| w.at_us);
        for w in &sim.writes {
            println!(
                "  +{:>7.1} ms  write {:#06x} <- {:#x}",
                (w.at_us - t0) as f64 / 1000.0,
                w.offset,
                w.value
            );
        }
        let c = &sim.conformance;
        println!(
            "  conformance with the reviewed upstream sequence: {} ({} sequence(s)){}",
            if c.ok { "ok" } else { "NOT ok" },
            c.sequences,
            c.problems
                .iter()
                .map(|p| format!("\n    {p}"))
                .collect::<String>()
        );
    }
}
