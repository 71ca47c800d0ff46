//! Slot power cycle from user space, for a card already off the link ("rev ff"), which no BAR
//! reset can reach. Opt-in and only for a target alone below its port: through the hotplug
//! slot's `power` file where pciehp offers one, else by removing the function and letting the
//! port enter D3cold through runtime PM (real power removal needs firmware power resources,
//! ACPI `_PR3`). Then the function is found again, bound to vfio-pci again if it was, and the
//! caller runs the normal reset and verify. Global state this changes (`drivers_autoprobe`, the
//! port's `power/control` and `d3cold_allowed`, the card's binding) is recorded in
//! `/run/qcom-reset/<BDF>.power.json` before it changes and restored on every path; after a
//! SIGKILL, by the agent's next start or the next power cycle. `drivers_autoprobe` is bus-wide:
//! every change of it is serialized by the host-wide `autoprobe.lock`.
mod back;
mod failure;
mod recover;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bdf::Bdf;
use crate::host::Host;
use crate::host::lock::DeviceLock;
use crate::host::own::Ownership;
use crate::host::sysfs::{PciSysfs, SysfsDevice};
use crate::session::{self};
use crate::session::{port, record};
use crate::{Error, Result};
use back::{away_and_back, bring_back, remove, restore};
pub use failure::{CycleFailure, Failure, NoCycle};
use recover::recover_all;
pub use recover::recover_pending;

/// How the slot's power is cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `/sys/bus/pci/slots/N/power` (pciehp with a power controller).
    Slot(PathBuf),
    /// Remove, port to D3cold through runtime PM, wake, rescan. `power_resources`: the port has
    /// ACPI `_PR3`, so D3cold really removes power; without it this is a remove/rescan only.
    D3cold {
        /// The port has ACPI power resources.
        power_resources: bool,
    },
}

impl Method {
    /// The choice that plans this method again.
    fn choice(&self) -> Choice {
        match self {
            Method::Slot(_) => Choice::Slot,
            Method::D3cold { .. } => Choice::D3cold,
        }
    }
}

/// Which way to cut the power (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The slot's power file if there is one, else D3cold where firmware has power resources.
    Auto,
    /// The hotplug slot's `power` file only.
    Slot,
    /// Also without `_PR3` (then only a remove/rescan: the VM lab's root port).
    D3cold,
}

/// How long each step may take: the kernel's usual times with a margin (tests shorten them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// For the function to go after its removal or slot power 0, and to come back.
    pub enumerate: Duration,
    /// How long the slot stays off.
    pub off: Duration,
    /// For the port to reach D3cold or D0.
    pub port: Duration,
    /// For vfio-pci to bind the function after `drivers_probe` (at once, unless the kernel
    /// probes asynchronously).
    pub bind: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            enumerate: Duration::from_secs(10),
            off: Duration::from_secs(1),
            port: Duration::from_secs(5),
            bind: Duration::from_secs(2),
        }
    }
}

/// How this card is power-cycled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The card.
    pub target: Bdf,
    /// Its upstream port.
    pub port: Bdf,
    /// How.
    pub method: Method,
    /// How long each step may take.
    #[serde(skip)]
    pub timing: Timing,
}

/// What the run changed, before it changed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PowerRecord {
    /// The port whose power settings change.
    pub port: Option<Bdf>,
    /// The slot whose power is cut (None: the function is removed instead).
    pub slot: Option<PathBuf>,
    /// `drivers_autoprobe` as it was.
    pub autoprobe: Option<String>,
    /// The port's `power/control` as it was.
    pub port_power_control: Option<String>,
    /// The port's `d3cold_allowed` as it was.
    pub port_d3cold_allowed: Option<String>,
    /// The driver the card was bound to: vfio-pci or none, the only ones a cycle accepts.
    pub driver: Option<String>,
    /// None: "(null)", no override.
    pub driver_override: Option<String>,
}

impl PowerRecord {
    /// Reads what the cycle of `plan` will change. The caller holds the autoprobe lock, so no
    /// other cycle has `drivers_autoprobe` at 0 now.
    fn take(sysfs: &PciSysfs, plan: &Plan) -> Result<PowerRecord> {
        let target = device(sysfs, plan.target);
        let port = device(sysfs, plan.port);
        Ok(PowerRecord {
            port: Some(plan.port),
            slot: match &plan.method {
                Method::Slot(s) => Some(s.clone()),
                Method::D3cold { .. } => None,
            },
            autoprobe: read(&bus_file(sysfs, "drivers_autoprobe")),
            port_power_control: port.power_control()?,
            port_d3cold_allowed: read(&port.path("d3cold_allowed")),
            driver: target.driver()?,
            // A killed reset's hold is not the card's own override: its session record has that.
            driver_override: read(&target.path("driver_override"))
                .filter(|d| d != "(null)" && d != crate::session::HOLD_OVERRIDE),
        })
    }
}

const AUTOPROBE_LOCK: &str = "autoprobe.lock";

/// Proof that this process holds `<run_dir>/autoprobe.lock`, the host-wide lock around every
/// change of the bus-global `drivers_autoprobe`: two cycles that overlapped would each record
/// the other's 0 as the original, and autoprobe would stay off until reboot.
struct AutoprobeLock {
    _file: File,
}

impl AutoprobeLock {
    /// Waits up to `wait`; None while another qcom-reset still holds it then.
    fn acquire(run_dir: &Path, wait: Duration) -> Result<Option<AutoprobeLock>> {
        Ok(
            crate::host::lock::exclusive(&run_dir.join(AUTOPROBE_LOCK), wait)?
                .map(|f| AutoprobeLock { _file: f }),
        )
    }
}

fn record_path(run_dir: &Path, bdf: Bdf) -> PathBuf {
    record::Kind::PowerCycle.path(run_dir, bdf)
}

fn bus_file(sysfs: &PciSysfs, name: &str) -> PathBuf {
    sysfs.root.parent().unwrap_or(&sysfs.root).join(name)
}

/// A function's sysfs directory, whether or not it is present now.
fn device(sysfs: &PciSysfs, bdf: Bdf) -> SysfsDevice {
    SysfsDevice {
        bdf,
        dir: sysfs.root.join(bdf.to_string()),
    }
}

/// Whether and how this host can power-cycle `dev`'s slot; the error says why not.
pub fn plan(
    sysfs: &PciSysfs,
    dev: &SysfsDevice,
    choice: Choice,
) -> std::result::Result<Plan, NoCycle> {
    let port = port::upstream(dev).ok_or(NoCycle::RootBus)?;
    let mut others: Vec<Bdf> = std::fs::read_dir(&port.dir)
        .map_err(|err| NoCycle::PortUnreadable {
            dir: port.dir.clone(),
            err,
        })?
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.parse().ok())
        .filter(|b| *b != dev.bdf)
        .collect();
    others.sort();
    if !others.is_empty() {
        return Err(NoCycle::NotAlone {
            port: port.bdf,
            others,
        });
    }
    let slot = find_slot(sysfs, dev.bdf);
    let power_resources = port.path("firmware_node/power_resources_D3hot").exists();
    let method = match (choice, slot) {
        (Choice::Auto | Choice::Slot, Some(s)) => Method::Slot(s),
        (Choice::Slot, None) => return Err(NoCycle::NoSlot),
        (Choice::Auto, None) if !power_resources => {
            return Err(NoCycle::NoPowerControl { port: port.bdf });
        }
        (Choice::Auto | Choice::D3cold, _) => Method::D3cold { power_resources },
    };
    Ok(Plan {
        target: dev.bdf,
        port: port.bdf,
        method,
        timing: Timing::default(),
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
    what: &'static str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> std::result::Result<(), Failure> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() >= limit {
            return Err(Failure::Timeout { what, limit });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn in_state(dev: &SysfsDevice, state: &str) -> bool {
    dev.power_state().ok().flatten().as_deref() == Some(state)
}

/// Runs the plan; returns one line per step. Takes the target's lock, then the host-wide
/// autoprobe lock; restores what killed cycles left (one may have left autoprobe at 0); checks
/// the target again, since a VM may have opened it while we waited; holds its VFIO group until
/// the function is gone.
pub fn run(
    host: &Host,
    plan: &Plan,
    profile: Option<&str>,
    bar: Option<u8>,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    let _device = DeviceLock::acquire(&host.run_dir, plan.target, host.lock_wait)?;
    let Some(autoprobe) = AutoprobeLock::acquire(&host.run_dir, host.lock_wait)? else {
        return Err(Error::NoPowerCycle {
            bdf: plan.target,
            why: NoCycle::AnotherCycle(host.run_dir.join(AUTOPROBE_LOCK)),
        });
    };
    let mut steps = Vec::new();
    let mut step = |s: String| {
        log(&s);
        steps.push(s);
    };
    for said in recover_all(&host.sysfs, &host.run_dir, &autoprobe, plan.target)? {
        step(said);
    }
    let own = recheck(host, plan, profile, bar)?;
    cycle(&host.sysfs, &host.run_dir, plan, own, &mut step)?;
    Ok(steps)
}

/// The target checked again under the locks (no holder, vfio-pci or no driver, still alone
/// below its port), and its VFIO group held.
fn recheck(host: &Host, p: &Plan, profile: Option<&str>, bar: Option<u8>) -> Result<Ownership> {
    let t = session::inspect(host, p.target, profile, bar)?;
    if let Some(e) = t.refusal(false) {
        return Err(e);
    }
    plan(&host.sysfs, &t.dev, p.method.choice())
        .map_err(|why| Error::NoPowerCycle { bdf: p.target, why })?;
    Ownership::take(&host.dev_vfio, &host.proc_root, &t.dev, &host.open_group)
}

/// Records, turns autoprobe off, sends the function away and back, restores; the record goes
/// once everything in it is back.
fn cycle(
    sysfs: &PciSysfs,
    run_dir: &Path,
    plan: &Plan,
    own: Ownership,
    step: &mut dyn FnMut(String),
) -> Result<()> {
    let rec = PowerRecord::take(sysfs, plan)?;
    record::store(&record_path(run_dir, plan.target), &rec)?;
    // No driver may grab the function when it comes back: autoprobe off, then we bind it.
    let cycled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write(&bus_file(sysfs, "drivers_autoprobe"), "0").and_then(|()| {
            step("drivers_autoprobe 0 (the function comes back unbound)".into());
            away_and_back(sysfs, plan, &rec, own, step)
        })
    }))
    .unwrap_or_else(|panic| {
        // A panic (a bug, or a log line to a terminal that went away) must not leave the bus
        // without autoprobe or the card away: bring back, restore, then go on unwinding. The
        // record stays for the next run to check.
        bring_back(sysfs, &rec, plan.target, &plan.timing);
        let _ = restore(sysfs, plan.target, &rec, &plan.timing);
        std::panic::resume_unwind(panic)
    });
    let back = restore(sysfs, plan.target, &rec, &plan.timing);
    match &back {
        Ok(()) => remove(run_dir, plan.target),
        Err(failures) => step(format!("restore: {}", failure::joined(failures))),
    }
    cycled?;
    back.map_err(|failures| Error::PowerCycle {
        bdf: plan.target,
        why: Box::new(CycleFailure {
            restoring: None,
            failures,
            brought_back: None,
        }),
    })?;
    step(format!(
        "{} is back; binding, autoprobe and port power restored",
        plan.target
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::recover::pending;
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
        let e = plan(&sysfs, &dev, Choice::Auto).unwrap_err().to_string();
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
        let e = plan(&sysfs, &dev, Choice::Auto).unwrap_err().to_string();
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
            ..PowerRecord::default()
        };
        leave(&run, dev.bdf, &rec);
        assert_eq!(pending(&run), vec![dev.bdf]);
        let said = recover_pending(&sysfs, &run);
        assert!(said.len() == 1 && said[0].contains("restored"), "{said:?}");
        assert_eq!(
            read(&t.path().join("drivers_autoprobe")).as_deref(),
            Some("1")
        );
        assert_eq!(read(&port.join("power/control")).as_deref(), Some("auto"));
        assert_eq!(read(&port.join("d3cold_allowed")).as_deref(), Some("0"));
        assert!(pending(&run).is_empty(), "record removed");
        assert!(recover_pending(&sysfs, &run).is_empty());
    }

    /// A record as a killed cycle leaves it.
    fn leave(run: &Path, bdf: Bdf, rec: &PowerRecord) {
        record::store(&record_path(run, bdf), rec).unwrap();
    }

    const CARD: &str = "0000:03:00.0";

    /// What the fake kernel does differently from a healthy one.
    #[derive(Clone, Copy, Default)]
    struct Quirks {
        /// The port never returns to D0.
        stuck_in_d3cold: bool,
        /// pciehp ignores the slot's `power` file (the function neither goes nor comes back).
        deaf_pciehp: bool,
    }

    /// The kernel's side of a power cycle on the fake tree, polled: the function goes on
    /// `remove` or slot power 0 and comes back (unbound, or to its native driver while
    /// autoprobe is on) on a port rescan or slot power 1; the port follows `power/control`;
    /// `drivers_probe` binds the function to its override. Each action is logged.
    struct Kernel {
        stop: Arc<AtomicBool>,
        log: Arc<Mutex<Vec<String>>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Kernel {
        fn start(t: &Path, quirks: Quirks) -> Kernel {
            let (stop, log) = (Arc::new(AtomicBool::new(false)), Arc::default());
            let (s, l, t) = (stop.clone(), Arc::clone(&log), t.to_path_buf());
            let thread = std::thread::spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    kernel_step(&t, quirks, &l);
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            Kernel {
                stop,
                log,
                thread: Some(thread),
            }
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl Drop for Kernel {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = self.thread.take().map(std::thread::JoinHandle::join);
        }
    }

    fn kernel_step(t: &Path, q: Quirks, log: &Mutex<Vec<String>>) {
        let port = t.join("real/0000:00:1c.0");
        let card = port.join(CARD);
        let stash = t.join("removed");
        let slot = read(&t.join("slots/2/power"));
        let rescan = read(&port.join("rescan")).as_deref() == Some("1");
        let say = |s: String| log.lock().unwrap().push(s);
        if card.exists() {
            let slot_off = slot.as_deref() == Some("0") && !q.deaf_pciehp;
            if read(&card.join("remove")).as_deref() == Some("1") || slot_off {
                let rec = read(&t.join(format!("run/{CARD}.power.json")));
                std::fs::rename(&card, &stash).unwrap();
                say(format!("removed; record {}", rec.unwrap_or_default()));
            }
        } else if rescan || (slot.as_deref() == Some("1") && !q.deaf_pciehp) {
            // A new function, made whole before it appears: unbound, no override.
            let _ = std::fs::remove_file(stash.join("driver"));
            std::fs::write(stash.join("remove"), "").unwrap();
            std::fs::write(stash.join("driver_override"), "(null)\n").unwrap();
            let native = read(&t.join("drivers_autoprobe")).as_deref() == Some("1");
            if native {
                bind(t, &stash, "ath11k_pci");
            }
            std::fs::rename(&stash, &card).unwrap();
            say(format!("added; autoprobe bound it: {native}"));
        }
        if rescan {
            std::fs::write(port.join("rescan"), "").unwrap();
            say("port rescanned".into());
        }
        let state = match read(&port.join("power/control")).as_deref() {
            Some("auto") if read(&port.join("d3cold_allowed")).as_deref() == Some("1") => "D3cold",
            Some("on") if !q.stuck_in_d3cold => "D0",
            _ => "",
        };
        if !state.is_empty() {
            std::fs::write(port.join("power_state"), state).unwrap();
        }
        if read(&t.join("drivers_probe")).as_deref() == Some(CARD) && card.exists() {
            std::fs::write(t.join("drivers_probe"), "").unwrap();
            let over = read(&card.join("driver_override")).unwrap_or_default();
            if over != "(null)" && !over.is_empty() {
                bind(t, &card, &over);
            }
            say(format!("probed with override {over}"));
        }
    }

    fn bind(t: &Path, card: &Path, driver: &str) {
        let d = t.join("drivers").join(driver);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(d, card.join("driver")).unwrap();
    }

    /// `tree()` with what a power cycle reads and writes: autoprobe on, the port in D0 and
    /// forced on, the card bound to vfio-pci with no override.
    fn full_tree() -> (tempfile::TempDir, PciSysfs, SysfsDevice) {
        let (t, sysfs, dev) = tree();
        let port = t.path().join("real/0000:00:1c.0");
        std::fs::create_dir_all(port.join("power")).unwrap();
        for (f, v) in [
            (t.path().join("drivers_autoprobe"), "1"),
            (t.path().join("drivers_probe"), ""),
            (port.join("power/control"), "on"),
            (port.join("power_state"), "D0"),
            (port.join("d3cold_allowed"), "0"),
            (port.join("rescan"), ""),
            (dev.dir.join("remove"), ""),
            (dev.dir.join("driver_override"), "(null)\n"),
        ] {
            std::fs::write(f, v).unwrap();
        }
        std::fs::write(dev.dir.join("vendor"), "0x17cb\n").unwrap();
        std::fs::write(dev.dir.join("device"), "0x1103\n").unwrap();
        let group = t.path().join("iommu_groups/12");
        std::fs::create_dir_all(&group).unwrap();
        std::os::unix::fs::symlink(group, dev.dir.join("iommu_group")).unwrap();
        std::fs::create_dir_all(t.path().join("dev/vfio")).unwrap();
        std::fs::write(t.path().join("dev/vfio/12"), "").unwrap();
        bind(t.path(), &dev.dir, "vfio-pci");
        (t, sysfs, dev)
    }

    fn d3cold_plan() -> Plan {
        Plan {
            target: CARD.parse().unwrap(),
            port: "0000:00:1c.0".parse().unwrap(),
            method: Method::D3cold {
                power_resources: false,
            },
            // Ample for the fake kernel's 2 ms polls, also on a loaded machine.
            timing: Timing {
                enumerate: Duration::from_secs(3),
                off: Duration::from_millis(10),
                port: Duration::from_secs(1),
                bind: Duration::from_secs(2),
            },
        }
    }

    fn cycle_in(t: &Path, sysfs: &PciSysfs, plan: &Plan) -> Result<Vec<String>> {
        let host = Host {
            sysfs: sysfs.clone(),
            dev_vfio: t.join("dev/vfio"),
            proc_root: t.join("proc"),
            run_dir: t.join("run"),
            lock_wait: Duration::from_millis(200),
            open_group: Default::default(),
        };
        run(&host, plan, None, None, &mut |s| eprintln!("{s}"))
    }

    fn driver_of(dev: &Path) -> Option<String> {
        let l = std::fs::read_link(dev.join("driver")).ok()?;
        Some(l.file_name()?.to_str()?.to_string())
    }

    #[test]
    fn a_failed_write_after_the_remove_brings_the_function_back() {
        let (t, sysfs, dev) = full_tree();
        let port = t.path().join("real/0000:00:1c.0");
        std::fs::remove_file(port.join("d3cold_allowed")).unwrap();
        std::fs::create_dir(port.join("d3cold_allowed")).unwrap();
        let k = Kernel::start(t.path(), Quirks::default());
        let e = cycle_in(t.path(), &sysfs, &d3cold_plan())
            .unwrap_err()
            .to_string();
        assert!(e.contains("d3cold_allowed"), "the original error: {e}");
        assert!(e.contains("rescan"), "the recovery is reported: {e}");
        assert!(dev.dir.exists(), "the function is back: {:?}", k.log());
        assert_eq!(read(&port.join("power/control")).as_deref(), Some("on"));
        assert_eq!(
            read(&t.path().join("drivers_autoprobe")).as_deref(),
            Some("1")
        );
    }

    #[test]
    fn a_port_that_stays_in_d3cold_is_still_rescanned() {
        let (t, sysfs, dev) = full_tree();
        let quirks = Quirks {
            stuck_in_d3cold: true,
            ..Quirks::default()
        };
        let k = Kernel::start(t.path(), quirks);
        let e = cycle_in(t.path(), &sysfs, &d3cold_plan())
            .unwrap_err()
            .to_string();
        assert!(e.contains("wake"), "the original error: {e}");
        assert!(
            k.log().iter().any(|l| l == "port rescanned") && dev.dir.exists(),
            "{:?}",
            k.log()
        );
    }

    #[test]
    fn a_slot_left_off_is_powered_on_again() {
        let (t, sysfs, _dev) = full_tree();
        let slot = t.path().join("slots/2");
        std::fs::create_dir_all(&slot).unwrap();
        std::fs::write(slot.join("power"), "1").unwrap();
        std::fs::write(slot.join("address"), "0000:03:00\n").unwrap();
        let quirks = Quirks {
            deaf_pciehp: true,
            ..Quirks::default()
        };
        let _k = Kernel::start(t.path(), quirks);
        let plan = Plan {
            method: Method::Slot(slot.clone()),
            ..d3cold_plan()
        };
        let e = cycle_in(t.path(), &sysfs, &plan).unwrap_err().to_string();
        assert!(e.contains("to go"), "the original error: {e}");
        assert_eq!(read(&slot.join("power")).as_deref(), Some("1"), "{e}");
    }

    /// Holds `<run>/autoprobe.lock` as another power cycle would.
    fn hold_autoprobe(run: &Path) -> std::fs::File {
        std::fs::create_dir_all(run).unwrap();
        let f = std::fs::File::create(run.join("autoprobe.lock")).unwrap();
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        f
    }

    #[test]
    fn a_second_cycle_waits_for_the_first_and_then_refuses() {
        let (t, sysfs, dev) = full_tree();
        let k = Kernel::start(t.path(), Quirks::default());
        let _other = hold_autoprobe(&t.path().join("run"));
        let e = cycle_in(t.path(), &sysfs, &d3cold_plan())
            .unwrap_err()
            .to_string();
        assert!(e.contains("autoprobe.lock"), "{e}");
        assert!(k.log().is_empty() && dev.dir.exists(), "{:?}", k.log());
        assert_eq!(
            read(&t.path().join("drivers_autoprobe")).as_deref(),
            Some("1")
        );
    }

    #[test]
    fn autoprobe_left_0_by_a_killed_cycle_is_never_recorded_as_the_original() {
        let (t, sysfs, _dev) = full_tree();
        let run = t.path().join("run");
        std::fs::write(t.path().join("drivers_autoprobe"), "0").unwrap();
        let killed = PowerRecord {
            autoprobe: Some("1".into()),
            ..PowerRecord::default()
        };
        std::fs::create_dir_all(t.path().join("devices/0000:05:00.0")).unwrap();
        leave(&run, "0000:05:00.0".parse().unwrap(), &killed);
        let k = Kernel::start(t.path(), Quirks::default());
        cycle_in(t.path(), &sysfs, &d3cold_plan()).unwrap();
        let removed = k
            .log()
            .into_iter()
            .find(|l| l.starts_with("removed"))
            .unwrap();
        assert!(removed.contains(r#""autoprobe":"1""#), "{removed}");
        assert_eq!(
            read(&t.path().join("drivers_autoprobe")).as_deref(),
            Some("1")
        );
        assert!(pending(&run).is_empty(), "{:?}", pending(&run));
    }

    #[test]
    fn a_card_on_vfio_pci_without_override_is_bound_to_vfio_pci_again() {
        let (t, sysfs, dev) = full_tree();
        let k = Kernel::start(t.path(), Quirks::default());
        cycle_in(t.path(), &sysfs, &d3cold_plan()).unwrap();
        assert!(
            k.log().iter().any(|l| l == "probed with override vfio-pci"),
            "{:?}",
            k.log()
        );
        assert_eq!(driver_of(&dev.dir).as_deref(), Some("vfio-pci"));
        assert_eq!(
            std::fs::read_to_string(dev.dir.join("driver_override")).unwrap(),
            "\n",
            "the override is cleared again"
        );
    }

    #[test]
    fn recovery_leaves_a_record_whose_device_is_locked() {
        let (t, sysfs, dev) = full_tree();
        let run = t.path().join("run");
        std::fs::write(t.path().join("drivers_autoprobe"), "0").unwrap();
        let killed = PowerRecord {
            autoprobe: Some("1".into()),
            ..PowerRecord::default()
        };
        leave(&run, dev.bdf, &killed);
        let busy = DeviceLock::acquire(&run, dev.bdf, Duration::ZERO).unwrap();
        let said = recover_pending(&sysfs, &run);
        assert!(said[0].contains("left for the next start"), "{said:?}");
        assert_eq!(
            read(&t.path().join("drivers_autoprobe")).as_deref(),
            Some("0")
        );
        assert_eq!(pending(&run), vec![dev.bdf], "{said:?}");
        drop(busy);
        // A running cycle (the autoprobe lock held) restores the records itself.
        let cycling = hold_autoprobe(&run);
        let said = recover_pending(&sysfs, &run);
        assert!(said[0].contains("autoprobe.lock"), "{said:?}");
        assert_eq!(pending(&run), vec![dev.bdf], "{said:?}");
        drop(cycling);
        recover_pending(&sysfs, &run);
        assert_eq!(
            read(&t.path().join("drivers_autoprobe")).as_deref(),
            Some("1")
        );
        assert!(pending(&run).is_empty());
    }

    #[test]
    fn a_corrupt_power_record_is_reported_naming_the_file() {
        let (t, sysfs, dev) = full_tree();
        let run = t.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let file = run.join(format!("{CARD}.power.json"));
        std::fs::write(&file, "{\"autoprobe\": \"1").unwrap();
        let said = recover_pending(&sysfs, &run);
        assert!(
            said.len() == 1 && said[0].contains(&file.display().to_string()),
            "{said:?}"
        );
        // A cycle refuses before it writes anything: the record may hold autoprobe's original.
        let k = Kernel::start(t.path(), Quirks::default());
        let e = cycle_in(t.path(), &sysfs, &d3cold_plan())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(k.log().is_empty() && dev.dir.exists(), "{:?}", k.log());
    }
}
