//! One task per device: it serializes everything for the card, debounces weak triggers, waits
//! out a holder, and acts.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::info;

use super::action::{Action, ActionResult, Verified, action, attempt, check_then_reset, now_ms};
use super::policy::{self, Decision, Gate};
use super::shared::Shared;
use super::trigger::Trigger;
use crate::bdf::Bdf;
use crate::host::Host;
use crate::host::own::Ownership;

/// What a device's task hears.
pub(super) enum Msg {
    /// Something to act on, and when it arrived.
    Act(Trigger, Instant),
    /// A VM opened the device: the reset calls that came just before (VFIO's own reset at
    /// open, whichever method ran) were made by that open, and its release will follow.
    Opened,
}

/// Serializes everything for one device. A release acts at once; a bind waits its settle time
/// and weaker triggers the debounce window, in case the event that explains them follows: an
/// open explains the reset calls it made, a release supersedes everything.
pub(super) async fn device_task(sh: Arc<Shared>, bdf: Bdf, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut next = None;
    loop {
        let (mut trigger, mut at) = match next.take() {
            Some(m) => m,
            None => loop {
                match rx.recv().await {
                    Some(Msg::Act(t, a)) => break (t, a),
                    Some(Msg::Opened) => {}
                    None => return,
                }
            },
        };
        let window = if trigger == Trigger::Bind {
            sh.cfg().bind_settle()
        } else {
            sh.cfg().debounce()
        };
        let deadline = tokio::time::Instant::from_std(at) + window;
        let mut explained = false;
        while !trigger.immediate() && !explained {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => absorb(m, (&mut trigger, &mut at), &mut explained),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        while let Ok(m) = rx.try_recv() {
            absorb(m, (&mut trigger, &mut at), &mut explained);
        }
        if explained {
            info!(bdf = %bdf, "the reset call was the VFIO open's own: its release will be answered");
            let _ = sh.settled.send(bdf);
            continue;
        }
        sh.busy(bdf, true);
        let covered = handle(&sh, bdf, trigger, at).await;
        sh.busy(bdf, false);
        let _ = sh.settled.send(bdf);
        // Our own accesses never come back as events (the probes drop the agent's TGID).
        // Events from before the last check or reset began are answered by it (e.g. the release
        // a held device's wait was for); later ones are news: a VM that started or let go again.
        while let Ok(m) = rx.try_recv() {
            if let Msg::Act(t, a) = m
                && a > covered
            {
                next = Some((t, a));
                break;
            }
        }
    }
}

/// Takes a message that came while a trigger waited its window: a stronger trigger replaces
/// it (and no open before it explains it); an open explains the reset calls before it and the
/// kernel's reset at the release before it (a bus reset, or 7.4's device-specific one at open):
/// the VM owns the card now, and its release is what gets answered.
pub(super) fn absorb(m: Msg, (trigger, at): (&mut Trigger, &mut Instant), explained: &mut bool) {
    match m {
        Msg::Act(t, a) if t > *trigger => {
            (*trigger, *at) = (t, a);
            *explained = false;
        }
        Msg::Act(..) => {}
        Msg::Opened => {
            *explained = matches!(
                trigger,
                Trigger::ResetCall
                    | Trigger::KernelResetCall
                    | Trigger::KernelReset
                    | Trigger::FailedOpen
            );
        }
    }
}

/// Acts on one trigger until the episode ends; returns when its last check or reset began.
pub(super) async fn handle(sh: &Arc<Shared>, bdf: Bdf, trigger: Trigger, at: Instant) -> Instant {
    let dev_cfg = sh.device_cfg(bdf);
    let held_until = tokio::time::Instant::now() + sh.cfg().held_wait();
    let mut waiting = false;
    let mut first = true;
    let mut began = Instant::now();
    loop {
        if *sh.shutdown.borrow() {
            return began;
        }
        match gate(sh, bdf, trigger, &dev_cfg).await {
            Gated::Act => {}
            Gated::Again => continue,
            Gated::Stop => return began,
        }
        began = Instant::now();
        // `act_with_kernel_reset`: the kernel's reset at release is followed by ours.
        let verifies =
            trigger.verifies_first() && !(trigger.kernel_reset() && sh.cfg().act_with_kernel_reset);
        // From the event to the session that resets (a check that resets only when it must
        // included): counted for resets only.
        let latency = first.then(|| at.elapsed());
        let mut a = if first && verifies {
            match check_then_reset(sh, bdf, trigger, &dev_cfg).await {
                Verified::Attempted(a) => a,
                Verified::Done(a) => {
                    sh.act(a);
                    return began;
                }
                Verified::Held(a) => {
                    if wait_out_holder(sh, a, &mut waiting, held_until).await {
                        continue;
                    }
                    return began;
                }
            }
        } else {
            attempt(sh, bdf, trigger, &dev_cfg).await
        };
        first = false;
        if let Some(l) = latency {
            sh.metrics.latency(l);
        }
        a.latency_ms = latency.map(|l| l.as_secs_f64() * 1000.0);
        if a.result == ActionResult::Held {
            if wait_out_holder(sh, a, &mut waiting, held_until).await {
                continue;
            }
            return began;
        }
        let done = a.result.ends_episode();
        sh.act(a);
        if done {
            return began;
        }
    }
}

/// What the policy lets an attempt do.
enum Gated {
    Act,
    /// A back-off ended: ask again.
    Again,
    /// Skipped (journaled), or shutdown during a back-off.
    Stop,
}

/// The kill switch, the device's `enabled`, and the policy's back-off and give-up, before an
/// attempt.
async fn gate(
    sh: &Arc<Shared>,
    bdf: Bdf,
    trigger: Trigger,
    dev_cfg: &crate::config::DeviceConfig,
) -> Gated {
    let gate = Gate {
        kill_switch_on: sh.cfg().kill_switch.exists(),
        enabled: dev_cfg.enabled != Some(false),
    };
    match policy::decide(&sh.cfg(), &gate, &sh.history(bdf), now_ms()) {
        Decision::Skip(why) => {
            sh.metrics.skipped(match why {
                policy::Skip::KillSwitch(_) => "kill-switch",
                policy::Skip::Disabled | policy::Skip::GaveUp { .. } => "policy",
            });
            if sh.history(bdf).failures >= sh.cfg().max_attempts {
                sh.gave_up(bdf);
            }
            sh.act(action(bdf, trigger, ActionResult::Skipped, why.to_string()));
            Gated::Stop
        }
        Decision::Wait(d) => {
            info!(bdf = %bdf, "backing off {} ms before the next attempt", d.as_millis());
            let mut sd = sh.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(d) => Gated::Again,
                _ = sd.changed() => Gated::Stop,
            }
        }
        Decision::Act => Gated::Act,
    }
}

/// Answers a refusal as held (`a`, result "held"); true when the holder let go and the
/// trigger should be acted on again. A release waits for its holder: QEMU keeps the group
/// open while it shuts down, after the device's release (and the kernel's reset in it).
/// Anything else seen while a VM holds the device, such as the reset at its open or a bind
/// right before a VM starts, is answered by the release that ends its use.
pub(super) async fn wait_out_holder(
    sh: &Arc<Shared>,
    mut a: Action,
    waiting: &mut bool,
    until: tokio::time::Instant,
) -> bool {
    let (bdf, trigger) = (a.bdf, a.trigger);
    let waits = trigger.waits_for_holder();
    if !*waiting {
        a.result = ActionResult::Skipped;
        a.detail = if waits {
            format!(
                "{}; waiting up to {} s for it to let go",
                a.detail,
                sh.cfg().held_wait_s
            )
        } else {
            format!("{}; its release will trigger the reset", a.detail)
        };
        sh.act(a);
        if !waits {
            return false;
        }
        *waiting = true;
    }
    // Journaled once: later refusals (held again after the holder seemed to go) wait quietly.
    let wait = if tokio::time::Instant::now() < until {
        holder_gone(sh, bdf, until).await
    } else {
        HolderWait::Deadline
    };
    if wait == HolderWait::Gone {
        return true;
    }
    sh.act(still_held(sh, bdf, trigger, wait));
    false
}

pub(super) fn still_held(sh: &Shared, bdf: Bdf, trigger: Trigger, wait: HolderWait) -> Action {
    let detail = match wait {
        HolderWait::Shutdown => "shutting down while it was held: not reset".to_string(),
        _ => format!("still held after {} s: not reset", sh.cfg().held_wait_s),
    };
    action(bdf, trigger, ActionResult::Skipped, detail)
}

/// How a wait for a device's holder ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HolderWait {
    Gone,
    Deadline,
    Shutdown,
}

/// How often a release waiting for its holder re-checks (only while one waits).
pub(super) const HOLDER_POLL: Duration = Duration::from_millis(250);

/// Waits until nothing holds the device, or the deadline, or shutdown.
pub(super) async fn holder_gone(
    sh: &Arc<Shared>,
    bdf: Bdf,
    until: tokio::time::Instant,
) -> HolderWait {
    let mut sd = sh.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HOLDER_POLL) => {}
            _ = sd.changed() => return HolderWait::Shutdown,
        }
        let host = sh.host.clone();
        if let Ok(true) = tokio::task::spawn_blocking(move || group_free(&host, bdf)).await {
            info!(bdf = %bdf, "the holder let go; resetting");
            return HolderWait::Gone;
        }
        if tokio::time::Instant::now() >= until {
            return HolderWait::Deadline;
        }
    }
}

/// The kernel's word on whether the group is free, not the /proc scan: a holder in another PID
/// namespace is invisible there but still makes the group open fail. The probe open is made
/// under the device's lock, taken without waiting: a CLI session holding it is never told
/// "held" by us, and its lock wait is the session's to do (so that counts as free).
pub(super) fn group_free(host: &Host, bdf: Bdf) -> bool {
    let Ok(_lock) = crate::host::lock::DeviceLock::acquire(&host.run_dir, bdf, Duration::ZERO)
    else {
        return true;
    };
    let Ok(dev) = host.sysfs.device(bdf) else {
        return true;
    };
    let own = Ownership::take(&host.dev_vfio, &host.proc_root, &dev, &host.open_group);
    !matches!(
        own,
        Err(crate::Error::Held { .. } | crate::Error::HeldBySession { .. })
    )
}
