//! `cargo xtask bench-lab`: the agent measured in the VM lab against a peer in the same guest.
//! One boot of the lab's vfio-user cards (the card as the guest kernel sees it: real IDs, BAR0,
//! config space with reset values): a WCN6855 for the release loop, eight SDX65 released
//! together, and a non-target device released as fast as the guest can. Debian's bpftrace runs
//! from the host's root shared read-only (virtio-9p) in a chroot, so both tools see the same
//! kernel at the same time. Prints one table; each figure with its ratio to the peer where there
//! is one. The guest's side is `guest.sh`; the figures are read in `results.rs`.
mod results;

use std::time::Duration;

use anyhow::{bail, ensure};

use super::scenarios::{LIB, Topology};
use super::{CardKind, Sim, build, guest_image_with, host, kernel, qemu, scenarios};
use results::Results;

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
/// Eight modems: the scale goal's card count.
const MODEMS: [&str; 8] = [
    "0000:00:11.0",
    "0000:00:12.0",
    "0000:00:13.0",
    "0000:00:14.0",
    "0000:00:15.0",
    "0000:00:16.0",
    "0000:00:17.0",
    "0000:00:18.0",
];
/// Not a target (QEMU's ivshmem, 1af4:1110), bound to vfio-pci like a busy host's other
/// passthrough devices.
const OTHER: &str = "0000:00:0a.0";
/// Seconds of each non-target flood.
const FLOOD_S: u64 = 10;

pub struct Options {
    pub kernel: String,
    pub releases: usize,
    pub idle_s: u64,
    /// Re-read a saved guest console instead of booting.
    pub from_log: Option<std::path::PathBuf>,
    /// The agent binary to measure instead of the tree's.
    pub agent: Option<std::path::PathBuf>,
}

pub fn bench_lab(o: &Options) -> anyhow::Result<()> {
    ensure!(o.releases >= 50, "--releases must be at least 50 for a p99");
    if let Some(log) = &o.from_log {
        let console = std::fs::read_to_string(log)?;
        let floor = std::fs::read_to_string(log.with_file_name("bench0-sim.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .map(|v: serde_json::Value| results::floor_ms(&v))
            .transpose()?;
        print!("{}", Results::parse(&console, floor)?.table(&o.kernel, o));
        return Ok(());
    }
    if !std::path::Path::new("/usr/bin/bpftrace").exists() {
        eprintln!("xtask: installing bpftrace (the peer) from Debian");
        host::apt_install(&["bpftrace"])?;
    }
    let bins = build()?;
    let k = kernel(&o.kernel)?;
    let qemu = CardKind::VfioUser.qemu()?;
    let ird = guest_image_with(&k, &bins, &["virtio_pci", "9pnet_virtio", "9p"])?;
    ird.add_text("/init", scenarios::INIT, 0o755)?;
    ird.add(
        o.agent.as_ref().unwrap_or(&bins.qcom_reset),
        "/bin/qcom-reset",
    )?;
    ird.add(&bins.guest, "/bin/vmlab-guest")?;
    ird.add_text("/scenario.sh", &script(o), 0o755)?;
    let dir = host::cache_dir().join("runs").join(&k.version);
    std::fs::create_dir_all(&dir)?;
    let cpio = dir.join("bench.cpio");
    ird.write(&cpio)?;
    let (sims, args) = cards(&bins.sim, &dir)?;
    let log = dir.join(if o.agent.is_some() {
        "bench-agent.log"
    } else {
        "bench.log"
    });
    let timeout = Duration::from_secs(900 + o.idle_s + 3 * o.releases as u64);
    println!(
        "bench-lab: {} on {}, {} releases, {} s idle (log {})",
        k.package,
        k.version,
        o.releases,
        o.idle_s,
        log.display()
    );
    let boot = qemu::boot(&qemu, &k.vmlinux, &cpio, &args, timeout, &log, false)?;
    let reports: Vec<_> = sims.into_iter().map(super::Sim::finish).collect();
    if boot.rc != Some(0) {
        let tail: Vec<&str> = boot.console.lines().rev().take(30).collect();
        bail!(
            "the guest ended with {:?}:\n{}",
            boot.rc,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let wlan_report = reports
        .into_iter()
        .next()
        .expect("the WLAN is the first card")?;
    let r = Results::parse(&boot.console, Some(results::floor_ms(&wlan_report)?))?;
    print!("{}", r.table(&k.version, o));
    Ok(())
}

/// The simulated cards (the WLAN first, its report gives the firmware's floor), the
/// non-target, and the 9p share of the host's root, as QEMU arguments.
fn cards(
    sim_bin: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<Sim>, Vec<String>)> {
    let mut sims = Vec::new();
    let mut args = vec![
        "-virtfs".to_string(),
        "local,path=/,mount_tag=host,security_model=none,readonly=on".into(),
        "-object".into(),
        "memory-backend-ram,id=othermem,size=1M".into(),
        "-device".into(),
        format!("ivshmem-plain,memdev=othermem,addr=0x{}", &OTHER[8..10]),
    ];
    let profiles = std::iter::once(("wcn6855", WLAN)).chain(MODEMS.iter().map(|m| ("sdx65", *m)));
    for (i, (profile, bdf)) in profiles.enumerate() {
        let sim = Sim::start(
            sim_bin,
            CardKind::VfioUser,
            (profile, ""),
            None,
            ("mission", Topology::RootBus, "function-reset"),
            dir,
            &format!("bench{i}"),
        )?;
        args.extend([
            "-device".into(),
            format!(
                "{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":\"{}\",\"type\":\"unix\"}},\"addr\":\"0x{}\"}}",
                sim.path.display(),
                &bdf[8..10]
            ),
        ]);
        sims.push(sim);
    }
    Ok((sims, args))
}

/// The guest's script, `guest.sh` with this run's values.
fn script(o: &Options) -> String {
    let probes = |kind: &str| {
        FUNCS
            .iter()
            .map(|f| format!("{kind}:{f}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let body = include_str!("guest.sh")
        .replace("@PROBES@", &probes("kprobe"))
        .replace("@RETS@", &probes("kretprobe"))
        .replace("@WLAN@", WLAN)
        .replace("@MODEMS@", &MODEMS.join(" "))
        .replace("@N_MODEMS@", &MODEMS.len().to_string())
        .replace("@M1@", MODEMS[0])
        .replace("@OTHER@", OTHER)
        .replace("@FLOOD@", &FLOOD_S.to_string())
        .replace("@IDLE@", &o.idle_s.to_string())
        .replace("@RELEASES@", &o.releases.to_string());
    format!("{LIB}\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every placeholder of the guest script is filled in.
    #[test]
    fn the_guest_script_has_every_value() {
        let s = script(&Options {
            kernel: "6.1".into(),
            releases: 50,
            idle_s: 5,
            from_log: None,
            agent: None,
        });
        // bpftrace's maps are `@name`; a placeholder is `@NAME@`.
        let left = s
            .split('@')
            .find(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        assert_eq!(left, None);
        assert!(s.contains("vfio-flood 0000:00:0a.0 10"));
    }
}
