//! The card away from the bus and back: the slot's power or D3cold, the function found again,
//! the bus and the port restored as recorded, the driver bound again.
use std::path::Path;

use crate::bdf::Bdf;
use crate::host::own::Ownership;
use crate::host::sysfs::{PciSysfs, SysfsDevice};
use crate::session::record;

use super::{
    CycleFailure, Error, Failure, Method, Plan, PowerRecord, Result, Timing, bus_file, device,
    in_state, read, wait_for, write,
};

/// Cuts the slot's power (or removes the function), then brings the function back. Once it was
/// told to go, an error first brings it back (best effort); the error says both.
pub(super) fn away_and_back(
    sysfs: &PciSysfs,
    plan: &Plan,
    rec: &PowerRecord,
    own: Ownership,
    step: &mut dyn FnMut(String),
) -> Result<()> {
    let target = device(sysfs, plan.target);
    match &plan.method {
        Method::Slot(slot) => {
            step(format!(
                "powering slot {} off; waiting up to {:?} for {} to go",
                slot.display(),
                plan.timing.enumerate,
                plan.target
            ));
            write(&slot.join("power"), "0")?;
        }
        Method::D3cold { .. } => {
            step(format!(
                "removing {}; waiting up to {:?} for it to go",
                plan.target, plan.timing.enumerate
            ));
            target.write("remove", "1")?;
        }
    }
    let port = device(sysfs, plan.port);
    let cycled = gone(plan, &target, own, step).and_then(|()| match &plan.method {
        Method::Slot(slot) => slot_back(plan, slot, &port, &target, step),
        Method::D3cold { power_resources } => d3cold_back(plan, *power_resources, &port, step),
    });
    let cycled = cycled.and_then(|()| {
        step(format!(
            "waiting up to {:?} for {} to come back",
            plan.timing.enumerate, plan.target
        ));
        wait_for("the function to come back", plan.timing.enumerate, || {
            target.dir.exists()
        })
    });
    cycled.map_err(|failure| {
        let said = bring_back(sysfs, rec, plan.target, &plan.timing);
        step(format!("brought back after the error: {}", said.join("; ")));
        Error::PowerCycle {
            bdf: plan.target,
            why: Box::new(CycleFailure {
                restoring: None,
                failures: vec![failure],
                brought_back: Some(said),
            }),
        }
    })
}

/// Waits for the function to go, then lets its VFIO group go. Held until now: removal
/// unregisters the vfio device, and vfio_unregister_group_dev waits only for open device fds
/// (asking their user, a VM, to release them, for as long as it takes); our group fd is none,
/// so it does not block the removal, while it keeps any VM from opening the device before it
/// is gone. Then the kernel has revoked the group, and vfio-pci makes a new one on return.
pub(super) fn gone(
    plan: &Plan,
    target: &SysfsDevice,
    own: Ownership,
    step: &mut dyn FnMut(String),
) -> std::result::Result<(), Failure> {
    wait_for("the function to go", plan.timing.enumerate, || {
        !target.dir.exists()
    })?;
    drop(own);
    step(format!("{} removed", plan.target));
    Ok(())
}

pub(super) fn slot_back(
    plan: &Plan,
    slot: &Path,
    port: &SysfsDevice,
    target: &SysfsDevice,
    step: &mut dyn FnMut(String),
) -> std::result::Result<(), Failure> {
    step(format!(
        "slot {} stays off for {:?}, then power on; pciehp has {:?} to enumerate",
        slot.display(),
        plan.timing.off,
        plan.timing.enumerate
    ));
    std::thread::sleep(plan.timing.off);
    write(&slot.join("power"), "1")?;
    step(format!("slot {} powered on", slot.display()));
    // pciehp enumerates once the link is up; if it has not, ask the port to rescan.
    if wait_for("pciehp", plan.timing.enumerate, || target.dir.exists()).is_err() {
        port.write("rescan", "1")?;
        step(format!(
            "not enumerated by pciehp within {:?}; port {} rescanned",
            plan.timing.enumerate, plan.port
        ));
    }
    Ok(())
}

pub(super) fn d3cold_back(
    plan: &Plan,
    power_resources: bool,
    port: &SysfsDevice,
    step: &mut dyn FnMut(String),
) -> std::result::Result<(), Failure> {
    step(format!(
        "letting port {} suspend; waiting up to {:?} for D3cold",
        plan.port, plan.timing.port
    ));
    port.write("d3cold_allowed", "1")?;
    port.write("power/control", "auto")?;
    let reached = wait_for("D3cold", plan.timing.port, || in_state(port, "D3cold"));
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
    step(format!(
        "waking port {}; waiting up to {:?} for D0",
        plan.port, plan.timing.port
    ));
    port.write("power/control", "on")?;
    wait_for("the port to wake", plan.timing.port, || {
        in_state(port, "D0")
    })?;
    port.write("rescan", "1")?;
    step(format!("port {} in D0, rescanned", plan.port));
    Ok(())
}

/// Best effort to get back a function that left: slot power on, the port forced on and
/// (briefly) waited for in D0, a port rescan, a wait for the function. One line per step;
/// `restore` puts the port's power settings back afterwards.
pub(super) fn bring_back(
    sysfs: &PciSysfs,
    rec: &PowerRecord,
    bdf: Bdf,
    timing: &Timing,
) -> Vec<String> {
    let outcome = |what: &str, r: Result<()>| match r {
        Ok(()) => what.to_string(),
        Err(e) => format!("{what}: {e}"),
    };
    let mut said = Vec::new();
    if let Some(slot) = &rec.slot
        && read(&slot.join("power")).as_deref() != Some("1")
    {
        said.push(outcome("slot power 1", write(&slot.join("power"), "1")));
    }
    if let Some(port) = rec.port.map(|p| device(sysfs, p)) {
        said.push(outcome(
            "port power/control on",
            port.write("power/control", "on"),
        ));
        said.push(
            match wait_for("port in D0", timing.port, || in_state(&port, "D0")) {
                Ok(()) => "port in D0".into(),
                Err(e) => e.to_string(),
            },
        );
        said.push(outcome("port rescan", port.write("rescan", "1")));
    }
    let target = device(sysfs, bdf);
    said.push(
        match wait_for("the function back", timing.enumerate, || {
            target.dir.exists()
        }) {
            Ok(()) => "the function is back".into(),
            Err(e) => e.to_string(),
        },
    );
    said
}

/// Puts back what the record holds: the function's binding and override (when it is present),
/// the port's power settings, then autoprobe (last: with it on, a native driver could take a
/// function not yet bound). Only recorded values are written.
pub(super) fn restore(
    sysfs: &PciSysfs,
    bdf: Bdf,
    rec: &PowerRecord,
    timing: &Timing,
) -> std::result::Result<(), Vec<Failure>> {
    let mut errors = Vec::new();
    let target = device(sysfs, bdf);
    if target.dir.exists()
        && let Err(e) = rebind(sysfs, &target, rec, timing)
    {
        errors.push(e);
    }
    if let Some(port) = rec.port.map(|p| device(sysfs, p)) {
        for (attr, value) in [
            ("power/control", &rec.port_power_control),
            ("d3cold_allowed", &rec.port_d3cold_allowed),
        ] {
            if let Some(v) = value
                && let Err(e) = port.write(attr, v)
            {
                errors.push(e.into());
            }
        }
    }
    if let Some(a) = &rec.autoprobe
        && let Err(e) = write(&bus_file(sysfs, "drivers_autoprobe"), a)
    {
        errors.push(e.into());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Binds the function to vfio-pci again if it was bound there and is unbound now (autoprobe
/// was 0 when it came back, and restoring autoprobe probes nothing): through a one-time
/// override, so no other driver can take it, and `drivers_probe`. Then the recorded override
/// goes back ("\n" clears it).
pub(super) fn rebind(
    sysfs: &PciSysfs,
    dev: &SysfsDevice,
    rec: &PowerRecord,
    timing: &Timing,
) -> std::result::Result<(), Failure> {
    let unbound = dev.driver()?.is_none();
    let bind = unbound && rec.driver.as_deref() == Some("vfio-pci");
    let bound = if bind {
        dev.write("driver_override", "vfio-pci")
            .and_then(|()| write(&bus_file(sysfs, "drivers_probe"), &dev.bdf.to_string()))
            .map_err(Failure::from)
            .and_then(|()| {
                wait_for("vfio-pci to bind it", timing.bind, || {
                    dev.driver().ok().flatten().as_deref() == Some("vfio-pci")
                })
            })
    } else {
        Ok(())
    };
    let put = match (&rec.driver_override, bind) {
        (Some(d), _) => dev.write("driver_override", d),
        (None, true) => dev.write("driver_override", "\n"),
        (None, false) => Ok(()),
    };
    bound.and(put.map_err(Failure::from))
}

pub(super) fn remove(run_dir: &Path, bdf: Bdf) {
    record::Kind::PowerCycle.remove(run_dir, bdf);
}
