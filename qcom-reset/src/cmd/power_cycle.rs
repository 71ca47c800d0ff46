//! `power-cycle`: a card off the link taken off the bus and back.

use qcom_reset::Error;
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::session::{self, Request};

use super::cli::PowerCycleArgs;
use super::reset::reset_and_report;
use super::{device_config, opt_in, require_root, resolve};

pub(super) fn power_cycle_cmd(host: &Host, a: PowerCycleArgs) -> anyhow::Result<Exit> {
    use qcom_reset::session::power;
    let cfg = device_config(a.device.config.clone())?;
    let dev = resolve(host, &cfg, a.bdf, &a.device);
    let req = Request {
        profile: dev.profile,
        bar: dev.bar,
        experimental: opt_in(&cfg, a.experimental),
        allow_dpc: cfg.allow_dpc,
        allow_unguarded_link_drop: cfg.allow_unguarded_link_drop,
        ..Request::new(a.bdf)
    };
    let t = session::inspect(host, a.bdf, req.profile.as_deref(), req.bar)?;
    // The reset after the cycle would refuse a profile not opted in: refuse before the power
    // is cut, not after.
    if !a.no_reset && req.profile.is_none() && !req.experimental.allows(&t.profile) {
        return Err(Error::Experimental {
            bdf: t.bdf,
            vendor: t.vendor,
            device: t.device,
            profile: t.profile.name,
        }
        .into());
    }
    if let Some(e) = t.refusal(false) {
        return Err(e.into());
    }
    let plan = power::plan(&host.sysfs, &t.dev, a.method)
        .map_err(|why| Error::NoPowerCycle { bdf: a.bdf, why })?;
    if a.dry_run {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            println!(
                "{}: would power-cycle through {:?} (port {}), then reset and verify",
                plan.target, plan.method, plan.port
            );
        }
        return Ok(Exit::Ok);
    }
    require_root()?;
    // Never a panic on a closed stderr (a terminal gone with SIGHUP deferred, `| tee` killed):
    // the cycle must reach its restore.
    let mut log = |s: &str| {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{}: power: {s}", a.bdf);
    };
    power::run(host, &plan, req.profile.as_deref(), req.bar, &mut log)?;
    if a.no_reset {
        return Ok(Exit::Ok);
    }
    reset_and_report(host, &req, a.device.access, a.json)
}
