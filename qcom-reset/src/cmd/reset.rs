//! `reset`: one card's reset, and the report printed for it.

use qcom_reset::access;
use qcom_reset::device::verdict::Health;
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::session::{self, Ran, Report, Request};
use qcom_reset::{Error, device::regs};

use super::cli::ResetArgs;
use super::{device_config, opt_in, require_root, resolve};

pub(super) fn reset_cmd(host: &Host, a: ResetArgs) -> anyhow::Result<Exit> {
    let cfg = device_config(a.device.config.clone())?;
    let dev = resolve(host, &cfg, a.bdf, &a.device);
    let req = Request {
        bdf: a.bdf,
        profile: dev.profile,
        bar: dev.bar,
        force: a.force,
        dry_run: a.dry_run,
        ignore_kernel_reset: a.ignore_kernel_reset,
        experimental: opt_in(&cfg, a.experimental),
        allow_dpc: a.allow_dpc || cfg.allow_dpc,
        allow_unguarded_link_drop: a.allow_unguarded_link_drop || cfg.allow_unguarded_link_drop,
    };
    // Refuse a missing or non-target device before asking for root: that answer is more useful.
    match session::inspect(host, req.bdf, req.profile.as_deref(), req.bar) {
        Err(e @ Error::NotTarget { .. }) if a.only_targets => {
            nothing_to_do(req.bdf, &format!("not a target ({e})"), a.json);
            return Ok(Exit::Ok);
        }
        Err(e) => return Err(e.into()),
        Ok(t) if req.profile.is_none() && !req.experimental.allows(&t.profile) => {
            if a.only_targets {
                let why = format!("experimental profile {} not opted in", t.profile.name);
                nothing_to_do(req.bdf, &why, a.json);
                return Ok(Exit::Ok);
            }
        }
        Ok(_) => {}
    }
    if !a.dry_run {
        require_root()?;
    }
    reset_and_report(host, &req, a.device.access, a.json)
}
/// `--only-targets` on a device qcom-reset does not act on: said on stdout, JSON with `--json`.
fn nothing_to_do(bdf: qcom_reset::bdf::Bdf, why: &str, json: bool) {
    if json {
        let out = serde_json::json!({"bdf": bdf, "nothing_to_do": why});
        println!("{out}");
    } else {
        println!("{bdf}: {why}; nothing to do");
    }
}
/// Runs the reset, prints its report; exit 0 when clean (or a dry run), 3 when not.
pub(super) fn reset_and_report(
    host: &Host,
    req: &Request,
    access: access::Access,
    json: bool,
) -> anyhow::Result<Exit> {
    let report = session::reset(
        host,
        req,
        &mut |dev, own| access::open(dev, access, own),
        access::backend_name(access),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(match report.verdict() {
        Some(v) if v.health != Health::Clean => Exit::NotClean,
        _ => Exit::Ok,
    })
}
fn print_report(r: &Report) {
    let Ran::Reset(done) = &r.ran else {
        println!(
            "dry run: {} as {} ({}), sequence {}; nothing will be touched",
            r.bdf,
            r.profile,
            r.family.name(),
            r.sequence_version
        );
        for (i, p) in r.plan().iter().enumerate() {
            println!("  {:>2}. {p}", i + 1);
        }
        return;
    };
    let how = if done.kernel {
        "the kernel's device_specific reset".to_string()
    } else {
        format!("register sequence {} via {}", r.sequence_version, r.access)
    };
    println!(
        "{} {}: reset with {how} in {} ms",
        r.bdf, r.profile, done.duration_ms
    );
    if let Some(o) = &done.outcome {
        println!("  sequence: {o:?}, {} register operations", r.ops.len());
    }
    let v = &done.verdict;
    println!("  verdict: {} ({})", v.health, v.detail);
    println!("  clean means: {}", v.expected);
    println!("  registers: {}", registers_line(&v.registers));
    let rs = &done.restored;
    println!(
        "  restored: PCI_COMMAND={} power/control={}{}",
        rs.command
            .map_or("unchanged".into(), |c| format!("{c:#06x}")),
        rs.power_control.as_deref().unwrap_or("unchanged"),
        if rs.errors.is_empty() {
            String::new()
        } else {
            format!(" ERRORS: {}", rs.errors.join("; "))
        }
    );
}
pub(super) fn registers_line(r: &qcom_reset::device::verdict::Registers) -> String {
    let h = |v: Option<u32>| v.map_or("-".to_string(), |v| format!("{v:#010x}"));
    let mut s = format!(
        "config {:04x}:{:04x} MHICTRL={} MHISTATUS={} BHIOFF={} EXECENV={}",
        r.config_vendor,
        r.config_device,
        h(r.mhictrl),
        h(r.mhistatus),
        h(r.bhioff),
        h(r.execenv)
    );
    if let Some(st) = r.mhistatus.filter(|s| *s != regs::ALL_ONES) {
        s.push_str(&format!(
            " (MHI {})",
            regs::mhi_state_name(regs::mhi_state(st))
        ));
    }
    s
}
