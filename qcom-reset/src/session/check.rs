//! A check that resets only when it must, in one session: the card is inspected after one lock
//! wait, owned once, its crash record written once; the registers are read and judged, and the
//! reset (when the caller's rule asks for one) runs in that same ownership, so nothing else can
//! take the card between the verdict and the reset.
use tracing::info;

use super::reset::{opted_in, pre, run_owned};
use super::status::{Own, Owned, judged, own, read_owned};
use super::{Opener, ReadMode, Report, Request, Status, inspect, plan::dry_run, unread_status};
use crate::Result;
use crate::device::verdict::{self, Health, Registers};
use crate::host::Host;

/// What a check-then-reset did.
#[derive(Debug)]
pub enum Checked {
    /// Not reset: the card's status (its verdict the rule leaves alone, or why it was not read).
    Left(Status),
    /// The verdict called for a reset and `stop` said not to begin one.
    Stopped(Status),
    /// Reset in the same session (observe-only: the dry run of that reset).
    Reset(Report),
    /// The check itself failed (nothing was reset): inspecting, the lock wait, owning, reading.
    NotChecked(crate::Error),
}

/// Reads a card and resets it in the same session when `resets` says its health needs it.
/// `req.dry_run` reads without writing (observe-only) and plans the reset instead. An error is
/// the reset's; the check's own is [`Checked::NotChecked`]. `stop` is asked once, right before
/// the reset (or its plan) begins.
pub fn check_then_reset(
    host: &Host,
    req: &Request,
    open: &mut Opener<'_>,
    access_name: &'static str,
    resets: &dyn Fn(Health) -> bool,
    stop: &dyn Fn() -> bool,
) -> Result<Checked> {
    let mode = if req.dry_run {
        ReadMode::NoWrites
    } else {
        ReadMode::EnableAndRestore
    };
    let (own, regs) = match read_first(host, req, open, mode) {
        Ok(Ok(read)) => read,
        Ok(Err(left)) => return Ok(left),
        Err(e) => return Ok(Checked::NotChecked(e)),
    };
    let Own {
        since,
        target: t,
        lock: _lock,
        mut session,
        recovered,
    } = own;
    let v = verdict::judge(&t.expect(false), &regs);
    let status = judged(t.clone(), v.clone());
    if !resets(v.health) {
        session.restore();
        return Ok(Checked::Left(status));
    }
    info!(bdf = %t.bdf, "{} ({}); resetting", v.health, v.detail);
    opted_in(req, &t)?;
    if stop() {
        session.restore();
        return Ok(Checked::Stopped(status));
    }
    if req.dry_run {
        return dry_run(host, req, &t, access_name).map(Checked::Reset);
    }
    pre(&t);
    run_owned(host, req, &t, session, recovered, since).map(Checked::Reset)
}

/// The card owned and its registers read, or what ended the check before a verdict.
fn read_first(
    host: &Host,
    req: &Request,
    open: &mut Opener<'_>,
    mode: ReadMode,
) -> Result<std::result::Result<(Own, Registers), Checked>> {
    let t = inspect(host, req.bdf, req.profile.as_deref(), req.bar)?;
    let again = (req.profile.as_deref(), req.bar);
    let mut own = match own(host, t, open, mode, again)? {
        Owned::Yes(o) => *o,
        Owned::No(status) => return Ok(Err(Checked::Left(*status))),
    };
    match read_owned(&mut own.session, &own.target, mode)? {
        Ok(regs) => Ok(Ok((own, regs))),
        Err(why) => Ok(Err(Checked::Left(unread_status(own.target, why)))),
    }
}
