//! Slot power cycle from user space, for a card already off the link ("rev ff"), which no BAR
//! reset can reach. Opt-in and only for a target alone below its port: through the hotplug
//! slot's `power` file where pciehp offers one, else by removing the function and letting the
//! port enter D3cold through runtime PM (real power removal needs firmware power resources,
//! ACPI `_PR3`). Then the function is found again (its vfio-pci binding restored) and the caller
//! runs the normal reset and verify. Global state this changes (`drivers_autoprobe`, the port's
//! `power/control` and `d3cold_allowed`) is recorded in `/run/qcom-reset/<BDF>.power.json`
//! before it changes and restored on every path, by the next run after a SIGKILL.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bdf::Bdf;
use crate::session::port;
use crate::sysfs::{PciSysfs, SysfsDevice};
use crate::{Error, Result};

/// How the slot's power is cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `/sys/bus/pci/slots/N/power` (pciehp with a power controller).
    Slot(PathBuf),
    /// Remove, port to D3cold through runtime PM, wake, rescan. `power_resources`: the port has
    /// ACPI `_PR3`, so D3cold really removes power; without it this is a remove/rescan only.
    D3cold { power_resources: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The slot's power file if there is one, else D3cold where firmware has power resources.
    Auto,
    Slot,
    /// Also without `_PR3` (then only a remove/rescan: the VM lab's root port).
    D3cold,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub target: Bdf,
    pub port: Bdf,
    pub method: Method,
}

/// What the run changed, before it changed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerRecord {
    pub port: Option<Bdf>,
    pub autoprobe: Option<String>,
    pub port_power_control: Option<String>,
    pub port_d3cold_allowed: Option<String>,
    pub driver_override: Option<String>,
}

fn record_path(run_dir: &Path, bdf: Bdf) -> PathBuf {
    run_dir.join(format!("{bdf}.power.json"))
}

fn bus_file(sysfs: &PciSysfs, name: &str) -> PathBuf {
    sysfs.root.parent().unwrap_or(&sysfs.root).join(name)
}

/// Whether and how this host can power-cycle `dev`'s slot; the error says why not.
pub fn plan(
    sysfs: &PciSysfs,
    dev: &SysfsDevice,
    choice: Choice,
) -> std::result::Result<Plan, String> {
    let port =
        port::upstream(dev).ok_or("on the root bus: there is no port whose power could be cut")?;
    let others: Vec<String> = std::fs::read_dir(&port.dir)
        .map_err(|e| format!("{}: {e}", port.dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<Bdf>().is_ok_and(|b| b != dev.bdf))
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "{} is not alone below its port {}: {} would lose power too; never power-cycled",
            dev.bdf,
            port.bdf,
            others.join(" ")
        ));
    }
    let slot = find_slot(sysfs, dev.bdf);
    let power_resources = port.path("firmware_node/power_resources_D3hot").exists();
    let method = match (choice, slot) {
        (Choice::Auto | Choice::Slot, Some(s)) => Method::Slot(s),
        (Choice::Slot, None) => {
            return Err(format!(
                "no hotplug slot with power control for {}",
                dev.bdf
            ));
        }
        (Choice::Auto, None) if !power_resources => {
            return Err(format!(
                "no slot power control and no ACPI power resources (_PR3) for port {}: this host cannot cut the slot's power from user space; power-cycle the host",
                port.bdf
            ));
        }
        (Choice::Auto | Choice::D3cold, _) => Method::D3cold { power_resources },
    };
    Ok(Plan {
        target: dev.bdf,
        port: port.bdf,
        method,
    })
}

/// The slot whose `address` (domain:bus:device) is the target's and that has a `power` file.
fn find_slot(sysfs: &PciSysfs, bdf: Bdf) -> Option<PathBuf> {
    let want = bdf.to_string();
    let want = want
        .rsplit_once('.')
        .map_or(want.as_str(), |(a, _)| a)
        .to_string();
    std::fs::read_dir(bus_file(sysfs, "slots"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|s| {
            s.join("power").exists()
                && std::fs::read_to_string(s.join("address")).is_ok_and(|a| a.trim() == want)
        })
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|err| Error::SysfsWrite {
        path: path.to_path_buf(),
        err,
    })
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn wait_for(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> std::result::Result<(), String> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() >= limit {
            return Err(format!("{what}: not within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs the plan; returns one line per step. The caller holds the target's lock.
pub fn run(
    sysfs: &PciSysfs,
    run_dir: &Path,
    plan: &Plan,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    recover(sysfs, run_dir, plan.target);
    let target = sysfs.root.join(plan.target.to_string());
    let port = SysfsDevice {
        bdf: plan.port,
        dir: sysfs.root.join(plan.port.to_string()),
    };
    let autoprobe = bus_file(sysfs, "drivers_autoprobe");
    let rec = PowerRecord {
        port: Some(plan.port),
        autoprobe: read(&autoprobe),
        port_power_control: port.power_control()?,
        port_d3cold_allowed: read(&port.path("d3cold_allowed")),
        driver_override: read(&target.join("driver_override")).filter(|d| d != "(null)"),
    };
    save(run_dir, plan.target, &rec)?;
    let mut steps = Vec::new();
    let mut step = |s: String| {
        log(&s);
        steps.push(s);
    };
    // No driver may grab the function when it comes back: autoprobe off, then our override.
    write(&autoprobe, "0")?;
    step("drivers_autoprobe 0 (the function comes back unbound)".into());
    let cycled = cycle(plan, &port, &target, &mut step);
    let back = restore(sysfs, plan.target, &rec);
    if let Err(e) = &back {
        step(format!("restore: {e}"));
    }
    cycled?;
    back.map_err(|why| Error::PowerCycle {
        bdf: plan.target,
        why,
    })?;
    remove(run_dir, plan.target);
    step(format!(
        "{} is back; autoprobe, override and port power restored",
        plan.target
    ));
    Ok(steps)
}

fn cycle(
    plan: &Plan,
    port: &SysfsDevice,
    target: &Path,
    step: &mut dyn FnMut(String),
) -> Result<()> {
    let fail = |why: String| Error::PowerCycle {
        bdf: plan.target,
        why,
    };
    match &plan.method {
        Method::Slot(slot) => {
            write(&slot.join("power"), "0")?;
            wait_for("the function to go", Duration::from_secs(10), || {
                !target.exists()
            })
            .map_err(fail)?;
            step(format!(
                "slot {} powered off; {} removed",
                slot.display(),
                plan.target
            ));
            std::thread::sleep(Duration::from_secs(1));
            write(&slot.join("power"), "1")?;
            step(format!("slot {} powered on", slot.display()));
            // pciehp enumerates once the link is up; if it has not, ask the port to rescan.
            if wait_for("pciehp", Duration::from_secs(10), || target.exists()).is_err() {
                port.write("rescan", "1")?;
                step(format!(
                    "not enumerated by pciehp within 10 s; port {} rescanned",
                    plan.port
                ));
            }
        }
        Method::D3cold { power_resources } => {
            write(&target.join("remove"), "1")?;
            wait_for("the function to go", Duration::from_secs(10), || {
                !target.exists()
            })
            .map_err(fail)?;
            step(format!("{} removed", plan.target));
            write(&port.path("d3cold_allowed"), "1")?;
            port.write("power/control", "auto")?;
            let reached = wait_for("D3cold", Duration::from_secs(5), || {
                port.power_state().ok().flatten().as_deref() == Some("D3cold")
            });
            let state = port.power_state().ok().flatten().unwrap_or_default();
            step(match (reached, power_resources) {
                (Ok(()), _) => format!("port {} in D3cold: slot power removed", plan.port),
                (Err(_), true) => format!(
                    "port {} reached {state}, not D3cold (runtime PM kept it up)",
                    plan.port
                ),
                (Err(_), false) => format!(
                    "port {} reached {state}: no _PR3, so the slot kept power (a remove/rescan only)",
                    plan.port
                ),
            });
            port.write("power/control", "on")?;
            wait_for("the port to wake", Duration::from_secs(5), || {
                port.power_state().ok().flatten().as_deref() == Some("D0")
            })
            .map_err(fail)?;
            port.write("rescan", "1")?;
            step(format!("port {} in D0, rescanned", plan.port));
        }
    }
    wait_for("the function to come back", Duration::from_secs(10), || {
        target.exists()
    })
    .map_err(fail)
}

/// Puts back the override (and binds it), autoprobe and the port's power settings.
fn restore(sysfs: &PciSysfs, bdf: Bdf, rec: &PowerRecord) -> std::result::Result<(), String> {
    let mut errors = Vec::new();
    let target = sysfs.root.join(bdf.to_string());
    if let Some(d) = &rec.driver_override
        && target.exists()
    {
        let r = write(&target.join("driver_override"), d)
            .and_then(|()| write(&bus_file(sysfs, "drivers_probe"), &bdf.to_string()));
        if let Err(e) = r {
            errors.push(e.to_string());
        }
    }
    if let Some(port) = rec.port {
        let dir = sysfs.root.join(port.to_string());
        for (attr, value) in [
            ("power/control", &rec.port_power_control),
            ("d3cold_allowed", &rec.port_d3cold_allowed),
        ] {
            if let Some(v) = value
                && let Err(e) = write(&dir.join(attr), v)
            {
                errors.push(e.to_string());
            }
        }
    }
    if let Some(a) = &rec.autoprobe
        && let Err(e) = write(&bus_file(sysfs, "drivers_autoprobe"), a)
    {
        errors.push(e.to_string());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn save(run_dir: &Path, bdf: Bdf, rec: &PowerRecord) -> Result<()> {
    let path = record_path(run_dir, bdf);
    std::fs::create_dir_all(run_dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_vec(rec).expect("records serialize")))
        .map_err(|err| Error::Lock { path, err })
}

fn remove(run_dir: &Path, bdf: Bdf) {
    let _ = std::fs::remove_file(record_path(run_dir, bdf));
}

/// Restores what a killed power cycle of `bdf` left (autoprobe off, the port forced on or
/// auto); returns what it did.
pub fn recover(sysfs: &PciSysfs, run_dir: &Path, bdf: Bdf) -> Option<String> {
    let text = std::fs::read(record_path(run_dir, bdf)).ok()?;
    let rec: PowerRecord = serde_json::from_slice(&text).ok()?;
    let r = restore(sysfs, bdf, &rec);
    if r.is_ok() {
        remove(run_dir, bdf);
    }
    Some(match r {
        Ok(()) => format!("{bdf}: restored what a killed power cycle left: {rec:?}"),
        Err(e) => format!("{bdf}: a killed power cycle's record could not be restored: {e}"),
    })
}

/// Devices with a power-cycle record in `run_dir`.
pub fn pending(run_dir: &Path) -> Vec<Bdf> {
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let name = e.ok()?.file_name().into_string().ok()?;
        name.strip_suffix(".power.json")?.parse().ok()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys/bus/pci with a port and its card below it, as real sysfs nests them.
    fn tree() -> (tempfile::TempDir, PciSysfs, SysfsDevice) {
        let t = tempfile::tempdir().unwrap();
        let devices = t.path().join("devices");
        let port = t.path().join("real/0000:00:1c.0");
        let card = port.join("0000:03:00.0");
        std::fs::create_dir_all(&card).unwrap();
        std::fs::create_dir_all(&devices).unwrap();
        std::os::unix::fs::symlink(&port, devices.join("0000:00:1c.0")).unwrap();
        std::os::unix::fs::symlink(&card, devices.join("0000:03:00.0")).unwrap();
        let sysfs = PciSysfs {
            root: devices.clone(),
        };
        let dev = sysfs
            .device("0000:03:00.0".parse().unwrap())
            .unwrap_or(SysfsDevice {
                bdf: "0000:03:00.0".parse().unwrap(),
                dir: devices.join("0000:03:00.0"),
            });
        (t, sysfs, dev)
    }

    #[test]
    fn plans_only_where_the_host_can_cut_power_and_the_card_is_alone() {
        let (t, sysfs, dev) = tree();
        let e = plan(&sysfs, &dev, Choice::Auto).unwrap_err();
        assert!(
            e.contains("no ACPI power resources") && e.contains("power-cycle the host"),
            "{e}"
        );
        // The lab's case: forced D3cold without _PR3 is a remove/rescan.
        let p = plan(&sysfs, &dev, Choice::D3cold).unwrap();
        assert_eq!(
            p.method,
            Method::D3cold {
                power_resources: false
            }
        );
        assert_eq!(p.port.to_string(), "0000:00:1c.0");
        std::fs::create_dir_all(
            t.path()
                .join("real/0000:00:1c.0/firmware_node/power_resources_D3hot"),
        )
        .unwrap();
        assert_eq!(
            plan(&sysfs, &dev, Choice::Auto).unwrap().method,
            Method::D3cold {
                power_resources: true
            }
        );
        let slot = t.path().join("slots/2");
        std::fs::create_dir_all(&slot).unwrap();
        std::fs::write(slot.join("address"), "0000:03:00\n").unwrap();
        std::fs::write(slot.join("power"), "1\n").unwrap();
        assert_eq!(
            plan(&sysfs, &dev, Choice::Auto).unwrap().method,
            Method::Slot(slot)
        );
        // A second function below the port: never.
        std::fs::create_dir_all(t.path().join("real/0000:00:1c.0/0000:03:00.1")).unwrap();
        let e = plan(&sysfs, &dev, Choice::Auto).unwrap_err();
        assert!(e.contains("not alone") && e.contains("0000:03:00.1"), "{e}");
    }

    #[test]
    fn a_killed_cycle_is_restored_from_its_record() {
        let (t, sysfs, dev) = tree();
        let run = t.path().join("run");
        let port = t.path().join("real/0000:00:1c.0");
        std::fs::create_dir_all(port.join("power")).unwrap();
        for (f, v) in [
            (t.path().join("drivers_autoprobe"), "0"),
            (port.join("power/control"), "on"),
            (port.join("d3cold_allowed"), "1"),
        ] {
            std::fs::write(f, v).unwrap();
        }
        let rec = PowerRecord {
            port: Some("0000:00:1c.0".parse().unwrap()),
            autoprobe: Some("1".into()),
            port_power_control: Some("auto".into()),
            port_d3cold_allowed: Some("0".into()),
            driver_override: None,
        };
        save(&run, dev.bdf, &rec).unwrap();
        assert_eq!(pending(&run), vec![dev.bdf]);
        let said = recover(&sysfs, &run, dev.bdf).unwrap();
        assert!(said.contains("restored"), "{said}");
        assert_eq!(
            read(&t.path().join("drivers_autoprobe")).as_deref(),
            Some("1")
        );
        assert_eq!(read(&port.join("power/control")).as_deref(), Some("auto"));
        assert_eq!(read(&port.join("d3cold_allowed")).as_deref(), Some("0"));
        assert!(pending(&run).is_empty(), "record removed");
        assert_eq!(recover(&sysfs, &run, dev.bdf), None);
    }
}
