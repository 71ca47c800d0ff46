//! Readiness: when the start-up checks are done (systemd's `READY=1` waits for them), and the
//! watchdog's beat.
use tokio::sync::broadcast;
use tracing::warn;

use super::STARTUP_BOUND;
use crate::bdf::Bdf;

/// Resolves when each device the start-up rescan dispatched has ended its episode (a failed
/// reset's retries included: each holds the card's group), or at `bound`.
pub(super) async fn startup_done(
    mut settled: broadcast::Receiver<Bdf>,
    checking: Vec<Bdf>,
    bound: tokio::time::Instant,
) {
    let mut left: std::collections::HashSet<Bdf> = checking.into_iter().collect();
    let all = async {
        while !left.is_empty() {
            match settled.recv().await {
                Ok(bdf) => {
                    left.remove(&bdf);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    };
    if tokio::time::timeout_at(bound, all).await.is_err() {
        warn!(
            "start-up checks still running {STARTUP_BOUND:?} after the start; ready anyway (a VM starting now may find a card held)"
        );
    }
}

/// Half of systemd's `WatchdogSec`, when the unit sets one (no timer at all otherwise: an idle
/// agent does not wake up).
pub(super) fn watchdog_interval() -> Option<tokio::time::Interval> {
    let timeout = sd_notify::watchdog_enabled().filter(|t| !t.is_zero())?;
    let mut i = tokio::time::interval(timeout / 2);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(i)
}
