//! SIGINT, SIGTERM and SIGHUP held back while a CLI session writes to a device, so Ctrl-C lets
//! the session restore what it changed (like the agent on SIGTERM) instead of leaving the port
//! masked and the card held off its drivers until the next run. A session is bounded (lock
//! wait, sequence, verify), and SIGKILL still works: the crash record covers that.
use std::sync::atomic::{AtomicI32, Ordering};

/// The first signal deferred, 0 for none.
static DEFERRED: AtomicI32 = AtomicI32::new(0);

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn note(sig: libc::c_int) {
    if DEFERRED
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        let msg =
            b"qcom-reset: interrupted; finishing the session and restoring the device first\n";
        // SAFETY: write(2) is async-signal-safe; the buffer is a static byte string.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
}

/// While alive, the three signals only record themselves; dropping it puts the previous
/// handlers back.
pub struct Deferred {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl Deferred {
    /// Defers the signals until the value is dropped.
    pub fn install() -> Deferred {
        let previous = SIGNALS
            .iter()
            .filter_map(|&sig| {
                // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; `note` only
                // touches an atomic and calls write(2).
                unsafe {
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction = note as extern "C" fn(libc::c_int) as libc::sighandler_t;
                    libc::sigemptyset(&mut new.sa_mask);
                    let mut old: libc::sigaction = std::mem::zeroed();
                    (libc::sigaction(sig, &new, &mut old) == 0).then_some((sig, old))
                }
            })
            .collect();
        Deferred { previous }
    }

    /// The signal that arrived meanwhile, if any.
    pub fn taken(&self) -> Option<libc::c_int> {
        Some(DEFERRED.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: `old` is the action sigaction(2) returned for this signal.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

/// Whether a deferred signal arrived: long waits (a device's lock) end early on it.
pub fn pending() -> bool {
    DEFERRED.load(Ordering::SeqCst) != 0
}

/// Runs `f` with the signals deferred; a signal that arrived meanwhile is returned with the
/// result, for the caller to exit with it once everything is restored.
pub fn deferring<T>(f: impl FnOnce() -> T) -> (T, Option<libc::c_int>) {
    let guard = Deferred::install();
    let out = f();
    let sig = guard.taken();
    drop(guard);
    DEFERRED.store(0, Ordering::SeqCst);
    (out, sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17 item 3: Ctrl-C during a session does not kill the process before its restore;
    /// afterwards the signal is reported and the old handler is back.
    #[test]
    fn a_signal_during_the_session_waits_for_its_end() {
        // SAFETY: reading the current action only.
        let action = || unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut cur);
            cur.sa_sigaction
        };
        // Whatever the test runs under (SIG_DFL, or SIG_IGN below nohup) comes back.
        let before = action();
        let (out, sig) = deferring(|| {
            // SAFETY: raise(3) on this thread; the handler installed above catches it.
            unsafe { libc::raise(libc::SIGHUP) };
            "restored"
        });
        assert_eq!((out, sig), ("restored", Some(libc::SIGHUP)));
        let handler = note as extern "C" fn(libc::c_int) as libc::sighandler_t;
        assert_ne!(before, handler);
        assert_eq!(action(), before, "the old action is back");
    }
}
