//! `status` and `health`: a card's state read without resetting it, and the agent's word.

use anyhow::Context as _;
use qcom_reset::access;
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::session::{self, Reading, Status, Target};

use super::cli::{HealthArgs, StatusArgs};
use super::reset::registers_line;
use super::{device_config, profile_status, require_root, resolve};

pub(super) fn status_cmd(host: &Host, a: StatusArgs) -> anyhow::Result<Exit> {
    let cfg = device_config(a.device.config.clone())?;
    let targets = match a.bdf {
        Some(b) => {
            let dev = resolve(host, &cfg, b, &a.device);
            vec![session::inspect(host, b, dev.profile.as_deref(), dev.bar)?]
        }
        None => session::targets(host, &cfg.overrides(&host.sysfs.present_ids()))?,
    };
    require_root()?;
    let out = read_all(host, &a, targets)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Exit::Ok);
    }
    if out.is_empty() {
        println!(
            "no target devices present (supported: {})",
            qcom_reset::device::profile_names()
        );
    }
    for s in &out {
        let named = a.device.profile.is_some()
            || cfg
                .device_with_ids(s.target.bdf, Some((s.target.vendor, s.target.device)))
                .profile
                .is_some();
        print_status(
            s,
            &profile_status(&s.target.profile, &cfg.experimental, named),
        );
    }
    Ok(Exit::Ok)
}

/// Each target's status; its registers only where reading them cannot reset it (through VFIO
/// only with `--registers`).
fn read_all(host: &Host, a: &StatusArgs, targets: Vec<Target>) -> anyhow::Result<Vec<Status>> {
    let access = a.device.access;
    let unread = (access::opens_device(access) && !a.registers).then(|| {
        format!(
            "{}; pass --registers to read them anyway",
            access::VFIO_OPEN_RESETS
        )
    });
    let mut out = Vec::new();
    for t in targets {
        let bdf = t.bdf;
        if let Some(why) = &unread {
            out.push(session::unread_status(
                t,
                session::Unread::Refused(why.clone()),
            ));
            continue;
        }
        out.push(
            session::status(
                host,
                t,
                &mut |dev, own| access::open(dev, access, own),
                session::ReadMode::EnableAndRestore,
            )
            .with_context(|| format!("status of {bdf}"))?,
        );
    }
    Ok(out)
}

fn print_status(s: &Status, profile: &str) {
    let t = &s.target;
    let holders: Vec<String> = t
        .holders
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    println!(
        "{} {} ({:04x}:{:04x}, {})",
        t.bdf, t.profile.name, t.vendor, t.device, t.profile.model
    );
    println!("  profile: {profile}");
    match session::upstream_port(t) {
        Ok(p) => println!("  port: {}", p.summary()),
        Err(e) => println!("  port: unreadable ({e})"),
    }
    println!(
        "  driver: {}  iommu_group: {}  holder: {}",
        t.driver.as_deref().unwrap_or("none"),
        t.iommu_group.as_deref().unwrap_or("none"),
        if holders.is_empty() {
            "none".into()
        } else {
            holders.join(", ")
        }
    );
    println!(
        "  power: {} (control {})  reset_method: {}{}",
        t.power_state.as_deref().unwrap_or("?"),
        t.power_control.as_deref().unwrap_or("?"),
        t.reset_methods
            .as_ref()
            .map_or("none".into(), |m| m.join(" ")),
        if s.kernel_device_specific {
            " (kernel has device_specific)"
        } else {
            ""
        }
    );
    println!("  regime: {}: {}", s.regime, s.regime.meaning());
    match &s.reading {
        Reading::Judged(v) => {
            println!("  verdict: {} ({})", v.health, v.detail);
            println!("  registers: {}", registers_line(&v.registers));
        }
        Reading::Unread(why) => println!("  registers not read: {why}"),
    }
}

/// Read-only: the agent's published status and sysfs, never a lock, a group or a write.
pub(super) fn health_cmd(host: &Host, a: HealthArgs) -> anyhow::Result<Exit> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let answer = device_config(None)
        .and_then(|cfg| Ok(qcom_reset::health::assess(host, &cfg, &a.bdf, now)?));
    let answer = match answer {
        Ok(answer) => answer,
        // NPD's contract: a health that cannot be read is "unknown" (2), with one line.
        Err(e) => {
            if a.json {
                let err = serde_json::json!({"condition": "unknown", "error": format!("{e:#}")});
                println!("{err}");
            } else {
                println!("UNKNOWN: {e:#}");
            }
            return Ok(Exit::Health(qcom_reset::exit::Condition::Unknown));
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", answer.line());
    }
    Ok(Exit::Health(answer.condition))
}
