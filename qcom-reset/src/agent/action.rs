//! What the agent did about a trigger: one run of a session (a reset, or a verification that
//! resets only if needed), as the action journaled and broadcast.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::shared::Shared;
use super::trigger::Trigger;
use crate::bdf::Bdf;
use crate::device::verdict::Health;
use crate::session::Unread;
use crate::session::{self, Request};

/// One thing the agent did or declined to do; journaled and broadcast.
#[derive(Clone, Debug, Serialize)]
pub struct Action {
    /// Unix time, ms.
    pub ts_ms: u64,
    /// The card.
    pub bdf: Bdf,
    /// What called for it.
    pub trigger: Trigger,
    /// What it came to.
    pub result: ActionResult,
    /// The sentence the journal shows.
    pub detail: String,
    /// The reset's report, when one ran (or, observe-only, would have).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<session::Report>,
    /// Time from the event's arrival to the start of the session that resets (for a trigger
    /// that verifies first, the check that then resets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// What an action came to; journaled as its name ("clean", "held", …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionResult {
    /// A reset's verdict ("clean", "stale", "crashed", "not-ready", "link-down",
    /// "wrong-identity").
    Verdict(Health),
    /// A check found nothing to reset.
    NothingToDo,
    /// Observe-only: the reset that would have run.
    DryRun,
    /// Refused or not checked, nothing written.
    Skipped,
    /// Refused because something holds the device or its lock.
    Held,
    /// A host driver or a VM took the card mid-session.
    Taken,
    /// The session failed (the error is in `detail`).
    Error,
}

impl ActionResult {
    /// The result's name, as the journal and metrics write it.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionResult::Verdict(h) => h.name(),
            ActionResult::NothingToDo => "nothing-to-do",
            ActionResult::DryRun => "dry-run",
            ActionResult::Skipped => "skipped",
            ActionResult::Held => "held",
            ActionResult::Taken => "taken",
            ActionResult::Error => "error",
        }
    }

    /// Whether the episode ends with it: the card is clean, or there is nothing more this
    /// trigger may do.
    pub fn ends_episode(self) -> bool {
        matches!(
            self,
            ActionResult::Verdict(Health::Clean)
                | ActionResult::Skipped
                | ActionResult::DryRun
                | ActionResult::Taken
        )
    }
}

impl std::fmt::Display for ActionResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ActionResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for ActionResult {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn action(
    bdf: Bdf,
    trigger: Trigger,
    result: ActionResult,
    detail: impl Into<String>,
) -> Action {
    Action {
        ts_ms: now_ms(),
        bdf,
        trigger,
        result,
        detail: detail.into(),
        report: None,
        latency_ms: None,
    }
}

/// One reset session, as an action: a verdict, "error", "taken", "dry-run", "skipped" (refused,
/// nothing written) or "held" (refused because something holds the device or its lock).
pub(super) async fn attempt(
    sh: &Arc<Shared>,
    bdf: Bdf,
    trigger: Trigger,
    dev_cfg: &crate::config::DeviceConfig,
) -> Action {
    let req = request(sh, bdf, dev_cfg);
    let access = crate::access::backend_name(sh.cfg().access);
    let (host, open) = (sh.host.clone(), sh.open.clone());
    let result = tokio::task::spawn_blocking(move || {
        session::reset(&host, &req, &mut |d, o| open(d, o), access)
    })
    .await;
    classify(sh, bdf, trigger, result)
}

/// The reset the agent's configuration asks for.
fn request(sh: &Shared, bdf: Bdf, dev_cfg: &crate::config::DeviceConfig) -> Request {
    let cfg = sh.cfg();
    Request {
        bdf,
        profile: dev_cfg.profile.clone(),
        bar: dev_cfg.bar,
        force: false,
        dry_run: cfg.observe_only,
        ignore_kernel_reset: cfg.act_with_kernel_reset,
        experimental: cfg.experimental.clone(),
        allow_dpc: cfg.allow_dpc,
        allow_unguarded_link_drop: cfg.allow_unguarded_link_drop,
    }
}

/// A reset's outcome as the action journaled, counted and recorded.
fn classify(
    sh: &Shared,
    bdf: Bdf,
    trigger: Trigger,
    result: Result<crate::Result<session::Report>, tokio::task::JoinError>,
) -> Action {
    let mut a = action(bdf, trigger, ActionResult::Error, "");
    match result {
        Err(join) => {
            a.detail = format!("reset task failed: {join}");
            sh.metrics.reset(&bdf.to_string(), "error");
            sh.record(bdf, false, "error");
        }
        Ok(Err(e)) if is_refusal(&e) => {
            sh.metrics.skipped("refused");
            let held = matches!(
                e,
                crate::Error::Held { .. }
                    | crate::Error::HeldBySession { .. }
                    | crate::Error::Busy { .. }
            );
            a.result = if held {
                ActionResult::Held
            } else {
                ActionResult::Skipped
            };
            a.detail = format!("not written: {e}");
        }
        // A host driver took the card mid-session (libvirt's managed reattach), or a VM opened
        // it while the verification had let its group go: not the card failing, and no longer
        // ours to retry (the VM's release is an episode of its own). A card that left the bus
        // or came back as a new device is still a failed attempt (a reset that drops it off
        // the bus every time must back off and give up).
        Ok(Err(
            e @ crate::Error::Taken {
                by: crate::session::Lost::Driver(_) | crate::session::Lost::Opened(_),
                ..
            },
        )) => {
            sh.metrics.reset(&bdf.to_string(), "taken");
            a.result = ActionResult::Taken;
            a.detail = e.to_string();
        }
        Ok(Err(e)) => {
            a.detail = e.to_string();
            sh.metrics.reset(&bdf.to_string(), "error");
            sh.record(bdf, false, "error");
        }
        Ok(Ok(r)) => reported(sh, &mut a, r),
    }
    a
}

/// A reset that ran (or, observe-only, would have): its verdict.
fn reported(sh: &Shared, a: &mut Action, r: session::Report) {
    let bdf = a.bdf;
    let Some(done) = r.reset() else {
        sh.metrics.reset(&bdf.to_string(), "dry-run");
        a.result = ActionResult::DryRun;
        a.detail = format!(
            "observe-only: would run {} ({} register operations)",
            r.sequence_version,
            r.ops.len()
        );
        a.report = Some(r);
        return;
    };
    let v = &done.verdict;
    sh.metrics.reset(&bdf.to_string(), &v.health.to_string());
    sh.metrics.duration(Duration::from_millis(done.duration_ms));
    sh.verdict(bdf, v.health, &v.detail);
    sh.record(bdf, v.health == Health::Clean, &v.health.to_string());
    a.result = ActionResult::Verdict(v.health);
    a.detail = format!(
        "{} in {} ms: {}",
        r.sequence_version, done.duration_ms, v.detail
    );
    a.report = Some(r);
}

/// Refusals are not failed attempts: nothing was written.
pub(super) fn is_refusal(e: &crate::Error) -> bool {
    use crate::Error::*;
    matches!(
        e,
        Held { .. }
            | HeldBySession { .. }
            | RecordWaits { .. }
            | PciehpPolls { .. }
            | WrongDriver { .. }
            | NotTarget { .. }
            | NoSuchDevice(..)
            | Busy { .. }
            | UnknownProfile(_)
            | Experimental { .. }
            | Dpc { .. }
            | PortGuard { .. }
    )
}

/// What a weak trigger's check-then-reset came to.
pub(super) enum Verified {
    /// The action that ends the episode: clean, a verdict the rescan policy leaves alone, not
    /// checkable, stopped by shutdown.
    Done(Action),
    /// Not checked because something holds the device (result "held").
    Held(Action),
    /// The verdict called for a reset and the same session ran it: its action, as an attempt's.
    Attempted(Action),
}

/// Checks the card and resets it in the same session when its verdict calls for it (for a
/// rescan, `rescan_resets` decides; otherwise anything but clean).
pub(super) async fn check_then_reset(
    sh: &Arc<Shared>,
    bdf: Bdf,
    trigger: Trigger,
    dev_cfg: &crate::config::DeviceConfig,
) -> Verified {
    if sh.cfg().observe_only && crate::access::opens_device(sh.cfg().access) {
        return Verified::Done(action(
            bdf,
            trigger,
            ActionResult::Skipped,
            format!(
                "not checked: {}; observe-only does not",
                crate::access::VFIO_OPEN_RESETS
            ),
        ));
    }
    let req = request(sh, bdf, dev_cfg);
    let cfg = sh.cfg();
    let access = crate::access::backend_name(cfg.access);
    let (host, open) = (sh.host.clone(), sh.open.clone());
    let shutdown = sh.shutdown.clone();
    // Set once the verdict called for a reset and it may begin: a panic after that is the
    // reset's (a failed attempt), before it the check's.
    let began = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reset_began = began.clone();
    let result = tokio::task::spawn_blocking(move || {
        let resets = |h: Health| match trigger {
            Trigger::Rescan => cfg.rescan_resets.resets(h),
            _ => h != Health::Clean,
        };
        // The check may have taken its whole lock wait: no reset begins after SIGTERM.
        let stop = || {
            let stop = *shutdown.borrow();
            reset_began.store(!stop, std::sync::atomic::Ordering::SeqCst);
            stop
        };
        session::check_then_reset(&host, &req, &mut |d, o| open(d, o), access, &resets, &stop)
    })
    .await;
    if began.load(std::sync::atomic::Ordering::SeqCst)
        && let Err(join) = result
    {
        return Verified::Attempted(classify(sh, bdf, trigger, Err(join)));
    }
    match result {
        Ok(Ok(session::Checked::Left(s))) => left(sh, bdf, trigger, s),
        Ok(Ok(session::Checked::Stopped(s))) => Verified::Done(action(
            bdf,
            trigger,
            ActionResult::Skipped,
            match s.reading {
                session::Reading::Judged(v) => {
                    format!("shutting down: not reset ({}: {})", v.health, v.detail)
                }
                session::Reading::Unread(_) => "shutting down: not reset".into(),
            },
        )),
        Ok(Ok(session::Checked::NotChecked(e))) => Verified::Done(action(
            bdf,
            trigger,
            ActionResult::Skipped,
            format!("not checked: {e}"),
        )),
        Ok(Ok(session::Checked::Reset(r))) => {
            Verified::Attempted(classify(sh, bdf, trigger, Ok(Ok(r))))
        }
        Ok(Err(e)) => Verified::Attempted(classify(sh, bdf, trigger, Ok(Err(e)))),
        Err(e) => Verified::Done(action(
            bdf,
            trigger,
            ActionResult::Error,
            format!("status task failed: {e}"),
        )),
    }
}

/// A check that did not reset: the verdict it left alone, or why it could not read.
fn left(sh: &Shared, bdf: Bdf, trigger: Trigger, s: session::Status) -> Verified {
    match s.reading {
        session::Reading::Judged(v) if v.health == Health::Clean => Verified::Done({
            sh.verdict(bdf, v.health, &v.detail);
            action(
                bdf,
                trigger,
                ActionResult::NothingToDo,
                format!("clean: {}", v.detail),
            )
        }),
        session::Reading::Judged(v) => Verified::Done({
            sh.verdict(bdf, v.health, &v.detail);
            action(
                bdf,
                trigger,
                ActionResult::NothingToDo,
                format!(
                    "{} left alone (rescan_resets = {:?}): {}",
                    v.health,
                    sh.cfg().rescan_resets,
                    v.detail
                ),
            )
        }),
        session::Reading::Unread(Unread::Held(why)) => Verified::Held(action(
            bdf,
            trigger,
            ActionResult::Held,
            format!("not checked: {why}"),
        )),
        session::Reading::Unread(why) => Verified::Done(action(
            bdf,
            trigger,
            ActionResult::Skipped,
            format!("not checked: {why}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result is journaled under its name and compares equal to that name only; the clean
    /// verdict and the results that leave nothing more to do end an episode.
    #[test]
    fn a_result_is_its_name_and_says_whether_the_episode_ends() {
        assert_eq!(
            ActionResult::Verdict(Health::NotReady).as_str(),
            "not-ready"
        );
        assert!(ActionResult::Skipped == "skipped");
        assert!(!(ActionResult::Skipped == "held"));
        assert_eq!(
            serde_json::to_string(&ActionResult::NothingToDo).unwrap(),
            "\"nothing-to-do\""
        );
        for (r, ends) in [
            (ActionResult::Verdict(Health::Clean), true),
            (ActionResult::Verdict(Health::Stale), false),
            (ActionResult::Skipped, true),
            (ActionResult::DryRun, true),
            (ActionResult::Taken, true),
            (ActionResult::Held, false),
            (ActionResult::Error, false),
            (ActionResult::NothingToDo, false),
        ] {
            assert_eq!(r.ends_episode(), ends, "{r}");
        }
    }
}
