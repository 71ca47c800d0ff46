//! Power cycles a killed process left half done: finished from their records, at the agent's
//! start or the next power cycle.
use std::path::Path;
use std::time::Duration;

use crate::bdf::Bdf;
use crate::host::lock::DeviceLock;
use crate::host::sysfs::PciSysfs;
use crate::session::record;

use super::back::{bring_back, remove, restore};
use super::{
    AUTOPROBE_LOCK, AutoprobeLock, CycleFailure, Error, NoCycle, PowerRecord, Result, Timing,
    device, record_path,
};

/// Restores what killed power cycles left, at the agent's start: under the autoprobe lock and
/// each device's lock, neither waited for (a holder is a running qcom-reset: what it holds is
/// left for it, or for the next start). One line per record, to log.
pub fn recover_pending(sysfs: &PciSysfs, run_dir: &Path) -> Vec<String> {
    let pending = pending(run_dir);
    if pending.is_empty() {
        return Vec::new();
    }
    let autoprobe = match AutoprobeLock::acquire(run_dir, Duration::ZERO) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return vec![format!(
                "a power cycle holds {}: the power-cycle records of {pending:?} are left to it",
                run_dir.join(AUTOPROBE_LOCK).display()
            )];
        }
        Err(e) => return vec![e.to_string()],
    };
    pending
        .into_iter()
        .map(
            |bdf| match recover(sysfs, run_dir, &autoprobe, bdf, false) {
                Ok(said) => said,
                Err(e @ Error::Busy { .. }) => {
                    format!("{bdf}: its power-cycle record is left for the next start: {e}")
                }
                Err(e) => format!("{bdf}: {e}"),
            },
        )
        .collect()
}

/// Restores every record killed cycles left before a cycle records autoprobe (one may have left
/// it 0, which must never be taken for the original). One that cannot be restored refuses the
/// cycle, naming its file. `target`'s own lock the caller holds already.
pub(super) fn recover_all(
    sysfs: &PciSysfs,
    run_dir: &Path,
    autoprobe: &AutoprobeLock,
    target: Bdf,
) -> Result<Vec<String>> {
    pending(run_dir)
        .into_iter()
        .map(|bdf| {
            recover(sysfs, run_dir, autoprobe, bdf, bdf == target).map_err(|e| {
                Error::NoPowerCycle {
                    bdf: target,
                    why: NoCycle::Leftover {
                        path: record_path(run_dir, bdf),
                        err: Box::new(e),
                    },
                }
            })
        })
        .collect()
}

/// Restores the record a killed cycle of `bdf` left: brings the function back if it is gone,
/// then puts back what the record holds, and removes it. Under `bdf`'s lock, not waited for
/// (`held`: the caller holds it).
pub(super) fn recover(
    sysfs: &PciSysfs,
    run_dir: &Path,
    _autoprobe: &AutoprobeLock,
    bdf: Bdf,
    held: bool,
) -> Result<String> {
    let _lock = if held {
        None
    } else {
        Some(DeviceLock::acquire(run_dir, bdf, Duration::ZERO)?)
    };
    let path = record_path(run_dir, bdf);
    let Some(rec) = record::fetch::<PowerRecord>(&path)? else {
        return Ok(format!("{bdf}: {} was restored meanwhile", path.display()));
    };
    let timing = Timing::default();
    let brought_back =
        (!device(sysfs, bdf).dir.exists()).then(|| bring_back(sysfs, &rec, bdf, &timing));
    let said = brought_back.as_ref().map_or(String::new(), |b| {
        format!("; brought back: {}", b.join("; "))
    });
    restore(sysfs, bdf, &rec, &timing).map_err(|failures| Error::PowerCycle {
        bdf,
        why: Box::new(CycleFailure {
            restoring: Some(path.clone()),
            failures,
            brought_back,
        }),
    })?;
    remove(run_dir, bdf);
    Ok(format!(
        "{bdf}: restored what a killed power cycle left in {}: {rec:?}{said}",
        path.display()
    ))
}

/// Devices with a power-cycle record in `run_dir`.
pub(super) fn pending(run_dir: &Path) -> Vec<Bdf> {
    record::Kind::PowerCycle.pending(run_dir)
}
