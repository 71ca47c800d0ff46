//! A reset, vendor-reset style: pre / reset / verify / post for one device, each step logged
//! with the BDF and the sequence version; post (unmap, restore PCI_COMMAND and power control,
//! unlock) always runs, on errors and panics too.
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::bdf::Bdf;
use crate::device::OptIn;
use crate::device::regio::{Op, Recorder, RegisterIo};
use crate::device::regs::*;
use crate::device::sequence::{self, Outcome};
use crate::device::verdict::{self, Verdict};
use crate::host::Host;
use crate::host::lock::DeviceLock;
use crate::{Error, Result};

use super::guard::{Restored, Session, Writes};
use super::owner::Guarded;
use super::port::{self, PortRecord, PortState};
use super::report::{Phases, Ran, Report, Reset};
use super::step::Step;
use super::{Opener, Target, begin_session, inspect, kernel::kernel_reset, plan::dry_run};

/// What to reset, and how far to go.
#[derive(Clone, Debug)]
pub struct Request {
    /// The card.
    pub bdf: Bdf,
    /// Treat it as this profile.
    pub profile: Option<String>,
    /// Use this BAR.
    pub bar: Option<u8>,
    /// Reset even when bound to a driver other than vfio-pci (never when held).
    pub force: bool,
    /// Write nothing: list what would be done.
    pub dry_run: bool,
    /// Use our register sequence even where the kernel has `device_specific`.
    pub ignore_kernel_reset: bool,
    /// Experimental profiles the caller opted into (an explicit `profile` is an opt-in too).
    pub experimental: OptIn,
    /// Reset even when DPC on the upstream port would contain the link drop.
    pub allow_dpc: bool,
    /// Reset even when the upstream port's link-drop reports cannot be masked (lockdown).
    pub allow_unguarded_link_drop: bool,
}

impl Request {
    /// A request for `bdf` with every default.
    pub fn new(bdf: Bdf) -> Self {
        Request {
            bdf,
            profile: None,
            bar: None,
            force: false,
            dry_run: false,
            ignore_kernel_reset: false,
            experimental: OptIn::default(),
            allow_dpc: false,
            allow_unguarded_link_drop: false,
        }
    }
}

/// Times consecutive phases.
struct Lap(Instant);

impl Lap {
    /// µs since the last lap.
    fn take(&mut self) -> u64 {
        let now = Instant::now();
        let us = now.duration_since(self.0).as_micros() as u64;
        self.0 = now;
        us
    }
}

fn step(bdf: Bdf, version: &str, what: &str) {
    info!(bdf = %bdf, seq = version, "{what}");
}

/// Resets one device: refuses unsafe cases, then pre / reset / verify / post.
pub fn reset(
    host: &Host,
    req: &Request,
    open: &mut Opener<'_>,
    access_name: &'static str,
) -> Result<Report> {
    let t = inspect(host, req.bdf, req.profile.as_deref(), req.bar)?;
    opted_in(req, &t)?;
    if let Some(e) = t.refusal(req.force) {
        return Err(e);
    }
    if req.dry_run {
        return dry_run(host, req, &t, access_name);
    }
    let _lock = DeviceLock::acquire(&host.run_dir, t.bdf, host.lock_wait)?;
    // A VM may have opened the device while we waited for the lock.
    let t = inspect(host, req.bdf, req.profile.as_deref(), req.bar)?;
    if let Some(e) = t.refusal(req.force) {
        return Err(e);
    }
    run(host, req, &t, open)
}

/// An experimental profile is reset only when the request opts in (naming the profile is an
/// opt-in too).
pub(super) fn opted_in(req: &Request, t: &Target) -> Result<()> {
    if req.profile.is_none() && !req.experimental.allows(&t.profile) {
        return Err(Error::Experimental {
            bdf: t.bdf,
            vendor: t.vendor,
            device: t.device,
            profile: t.profile.name,
        });
    }
    Ok(())
}

/// What the sequence and its verification found.
struct Done {
    outcome: Option<Outcome>,
    verdict: Verdict,
    ops: Vec<Op>,
}

/// The session of a reset, its lock held and the card re-inspected: own, guard the port,
/// reset (the kernel's or ours), verify, restore; each phase timed.
fn run(host: &Host, req: &Request, t: &Target, open: &mut Opener<'_>) -> Result<Report> {
    let started = Instant::now();
    pre(t);
    let (session, recovered) = begin_session(host, &t.dev, open, Writes::Allowed)?;
    run_owned(host, req, t, session, recovered, started)
}

pub(super) fn pre(t: &Target) {
    let p = t.profile;
    step(
        t.bdf,
        p.family.sequence_version(),
        &format!("pre: {} ({}), BAR{}", p.name, p.model, p.bar),
    );
}

/// The reset in a session begun at `started` (owning the card counts from there).
pub(super) fn run_owned(
    host: &Host,
    req: &Request,
    t: &Target,
    mut session: Session,
    recovered: Option<Restored>,
    started: Instant,
) -> Result<Report> {
    let mut lap = Lap(started);
    let mut phases = Phases::default();
    let p = t.profile;
    let version = p.family.sequence_version();
    phases.own_us = lap.take();
    let port = guard_link_drop(host, &mut session, t, req)?;
    phases.guard_us = lap.take();
    let kernel = uses_kernel_reset(t, req) && try_kernel(&mut session, t)?;
    let access = session.backend.name();
    let done = reset_and_verify(&mut session, t, kernel, &mut lap, &mut phases)?;
    step(
        t.bdf,
        version,
        &format!("verdict: {} ({})", done.verdict.health, done.verdict.detail),
    );
    // Config space reading all-ones ends the look before any sequence: that look is the
    // verification then.
    phases.verify_us = lap.take();
    let restored = session.restore();
    let steps = std::mem::take(&mut session.steps);
    phases.restore_us = lap.take();
    step(
        t.bdf,
        version,
        "post: BAR unmapped, PCI_COMMAND and power control restored",
    );
    Ok(Report {
        bdf: t.bdf,
        profile: p.name,
        family: p.family,
        sequence_version: version,
        access,
        ops: done.ops,
        port: Some(port),
        ran: Ran::Reset(Box::new(Reset {
            kernel,
            outcome: done.outcome,
            verdict: done.verdict,
            restored,
            recovered,
            duration_ms: started.elapsed().as_millis() as u64,
            phases,
            steps,
        })),
    })
}

/// Whether the kernel's `device_specific` reset is tried before ours.
pub(super) fn uses_kernel_reset(t: &Target, req: &Request) -> bool {
    t.kernel_has_device_specific() && !req.ignore_kernel_reset
}

/// The kernel's `device_specific` reset; true when it ran. One that failed (its WLAN link poll
/// timing out, say) left the card as the kernel restored it: ours is the reset that is left.
fn try_kernel(session: &mut Session, t: &Target) -> Result<bool> {
    step(
        t.bdf,
        t.profile.family.sequence_version(),
        "reset: the kernel provides device_specific; using its reset instead of ours",
    );
    session.still_owned()?;
    session.saw_link_drop();
    match kernel_reset(session, t) {
        Ok(()) => Ok(true),
        Err(e @ Error::KernelReset { .. }) => {
            warn!(bdf = %t.bdf, "{e}: falling back to qcom-reset's register sequence");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Our sequence (unless the kernel reset the card) and the verification, through the BAR.
/// A card whose config space reads all-ones is judged link-down without a BAR access.
fn reset_and_verify(
    session: &mut Session,
    t: &Target,
    kernel: bool,
    lap: &mut Lap,
    phases: &mut Phases,
) -> Result<Done> {
    let (vendor, device) = session.config_ids();
    session.took(Step::ReadIds(session.backend.name()));
    if vendor == 0xffff {
        step(
            t.bdf,
            t.profile.family.sequence_version(),
            "pre: config space reads all-ones; link down, no BAR writes",
        );
        let regs = verdict::Registers {
            config_vendor: vendor,
            config_device: device,
            ..Default::default()
        };
        let verdict = verdict::judge(&t.expect(true), &regs);
        return Ok(Done {
            outcome: None,
            verdict,
            ops: Vec::new(),
        });
    }
    let (bar, len) = map_bar(session, t)?;
    let watch = session.watch();
    let mut io = Recorder::new(Live {
        session,
        bar: Guarded::new(bar, watch),
    });
    let (outcome, ops) = if kernel {
        (None, Vec::new())
    } else {
        let (o, ops) = run_sequence(&mut io, t);
        (Some(o), ops)
    };
    // A SoC reset takes the link down, so the sequence reads all-ones at least once; without
    // that evidence a modem found in AMSS never rebooted (e.g. our writes were lost).
    let rebooted = kernel
        || ops.iter().any(|o| {
            matches!(
                o,
                Op::Read {
                    value: ALL_ONES,
                    ..
                }
            )
        });
    if rebooted {
        io.inner.session.saw_link_drop();
    }
    phases.sequence_us = lap.take();
    let verdict = verify(io, t, rebooted, len)?;
    Ok(Done {
        outcome,
        verdict,
        ops,
    })
}

/// Memory decoding on, the BAR mapped and checked to hold the sequence's registers.
fn map_bar(session: &mut Session, t: &Target) -> Result<(Box<dyn RegisterIo>, u64)> {
    let p = t.profile;
    session.enable_memory()?;
    let need = sequence::bar_needed(p.family);
    let (bar, len) = session.backend.map_bar(p.bar)?;
    if len < need {
        return Err(Error::BarTooSmall {
            bdf: t.bdf,
            bar: p.bar,
            len,
            need,
            family: p.family.name(),
        });
    }
    session.still_owned()?;
    let via = session.backend.name();
    session.took(Step::MapBar { bar: p.bar, via });
    Ok((bar, len))
}

/// The reviewed register sequence; its outcome and register operations.
fn run_sequence<I: RegisterIo>(io: &mut Recorder<I>, t: &Target) -> (Outcome, Vec<Op>) {
    let version = t.profile.family.sequence_version();
    let o = sequence::run(t.profile.family, io, &mut |s| {
        step(t.bdf, version, &format!("reset: {s}"));
    });
    step(t.bdf, version, &format!("reset: {o:?}"));
    (o, std::mem::take(&mut io.ops))
}

/// Reads the card until it settles or its window ends. The verification only reads: once the
/// card is settled a VM may open it meanwhile (a header repair takes the group back first). One
/// that did keeps the card and gets no verdict of ours.
fn verify(
    mut io: Recorder<Live<'_, Box<dyn RegisterIo>>>,
    t: &Target,
    rebooted: bool,
    len: u64,
) -> Result<Verdict> {
    step(
        t.bdf,
        t.profile.family.sequence_version(),
        &format!(
            "verify: reading config space and MHI registers ({})",
            verdict::verify_schedule(t.profile.family)
        ),
    );
    io.inner.session.took(Step::Verify(t.profile.family));
    let verifying = io.inner.session.begin_verification();
    let v = verdict::verify(&t.expect(rebooted), &mut io, len);
    // Reads do not check the owner on their own: a card taken during the modem's wait or
    // the verification gets no verdict from registers that are the new driver's.
    let lost = io
        .inner
        .bar
        .lost
        .take()
        .or_else(|| io.inner.session.watch().lost());
    let Live { session, bar } = io.inner;
    drop(bar);
    session.took(Step::Unmap(t.profile.bar));
    if let Some(l) = lost {
        return Err(session.lost(l));
    }
    if verifying {
        session.take_back()?;
    }
    Ok(v)
}

/// The card while the sequence and its verification run: the BAR, every write checked against
/// ownership ([`Guarded`]), and config space through the session. When MMIO reads all-ones
/// while config space answers, the link is back but its drop reset the function: the session
/// puts the header back and the read is made again (the reviewed sequence keeps its order).
struct Live<'s, I> {
    session: &'s mut Session,
    bar: Guarded<I>,
}

impl<I: RegisterIo> RegisterIo for Live<'_, I> {
    fn read32(&mut self, offset: u32) -> u32 {
        if self.bar.lost.is_none() {
            self.bar.lost = self.session.taken();
        }
        let v = self.bar.read32(offset);
        // Another owner claimed the BAR: the kernel took the mapping (all-ones from now on).
        if self.bar.revoked() && self.bar.lost.is_none() {
            self.bar.lost = Some(self.session.claimed());
        }
        if self.bar.lost.is_some() {
            return ALL_ONES;
        }
        if v == ALL_ONES && self.session.repair_header() {
            return self.bar.read32(offset);
        }
        if v != ALL_ONES {
            self.session.let_go_when_settled();
        }
        v
    }
    fn write32(&mut self, offset: u32, value: u32) {
        self.bar.write32(offset, value);
    }
    fn delay(&mut self, d: Duration) {
        self.bar.delay(d);
    }
}

impl<I: RegisterIo> verdict::Card for Live<'_, I> {
    fn config_ids(&mut self) -> (u16, u16) {
        self.session.config_ids()
    }
}

/// What the card's upstream port would do with the reset's link drop.
pub fn upstream_port(t: &Target) -> Result<PortState> {
    let Some(p) = port::upstream(&t.dev) else {
        return Ok(PortState::default());
    };
    let path = p.path("config");
    crate::pci::SysfsConfig::open(&path, false)
        .and_then(|mut cfg| PortState::read(p.bdf, &mut cfg))
        .map_err(|err| Error::SysfsRead { path, err })
}

/// A port whose reaction to the link drop the request does not allow: DPC would contain it, or
/// pciehp polls the slot (its hotplug events cannot be masked).
pub(super) fn port_refusal(
    host: &Host,
    req: &Request,
    t: &Target,
    state: &PortState,
) -> Result<()> {
    if let (Some(port), true, false) = (state.port, state.dpc_enabled, req.allow_dpc) {
        return Err(Error::Dpc { bdf: t.bdf, port });
    }
    if state.slot_control.is_some()
        && port::pciehp_polls(&host.sysfs.sys_root())
        && !req.allow_unguarded_link_drop
    {
        return Err(Error::PciehpPolls { bdf: t.bdf });
    }
    Ok(())
}

/// pre: refuses a DPC port unless allowed, masks the port's hotplug and Surprise Down reports
/// for the link drop (restored at post), or refuses where they cannot be masked (lockdown, or
/// pciehp polling the slot) unless allowed. The port's lock comes first: a second target below
/// the same port waits instead of reading, and recording, the first one's masked state.
fn guard_link_drop(
    host: &Host,
    session: &mut Session,
    t: &Target,
    req: &Request,
) -> Result<PortState> {
    if let Some(p) = port::upstream(&t.dev) {
        session.lock_port(p.bdf)?;
    }
    let state = upstream_port(t)?;
    let version = t.profile.family.sequence_version();
    step(t.bdf, version, &format!("pre: {}", state.summary()));
    port_refusal(host, req, t, &state)?;
    let Some(rec) = PortRecord::plan(&state) else {
        return Ok(state);
    };
    match session.guard_port(rec) {
        Ok(()) => {
            step(
                t.bdf,
                version,
                "pre: upstream port's link-drop reports masked",
            );
            Ok(state)
        }
        Err(e) if req.allow_unguarded_link_drop => {
            warn!(bdf = %t.bdf, "{e}; going on unguarded (allow_unguarded_link_drop)");
            Ok(state)
        }
        Err(e) => Err(e),
    }
}
