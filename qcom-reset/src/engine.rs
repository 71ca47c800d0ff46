//! pre / reset / post for one device, vendor-reset style: each step is logged with the BDF and
//! the sequence version, and post (unmap, restore PCI_COMMAND and power control, unlock) always
//! runs, on errors and panics too.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::access::Backend;
use crate::bdf::Bdf;
use crate::device::regio::{DryRun, Op, Recorder};
use crate::device::regs::*;
use crate::device::sequence::{self, Outcome};
use crate::device::verdict::{self, Verdict};
use crate::device::{self, DeviceProfile, Family, OptIn};
use crate::host::holders::{self, Holder};
use crate::host::lock::DeviceLock;
use crate::host::own::Ownership;
use crate::host::sysfs::{PciSysfs, SysfsDevice};
pub use crate::session::Restored;
use crate::session::port::{self, PortRecord, PortState};
use crate::session::{Guarded, Session, Writes};
use crate::{Error, Result};

/// Where the engine finds the host's state; tests point every path at a tree of their own.
#[derive(Clone, Debug)]
pub struct Host {
    pub sysfs: PciSysfs,
    /// Where the VFIO group nodes are (`/dev/vfio`).
    pub dev_vfio: PathBuf,
    pub proc_root: PathBuf,
    pub run_dir: PathBuf,
    pub lock_wait: Duration,
    /// Opens VFIO group nodes (the real open outside tests).
    pub open_group: crate::host::own::GroupOpener,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            sysfs: PciSysfs::default(),
            dev_vfio: PathBuf::from("/dev/vfio"),
            proc_root: PathBuf::from("/proc"),
            run_dir: PathBuf::from(crate::host::lock::DEFAULT_RUN_DIR),
            lock_wait: Duration::from_secs(30),
            open_group: Default::default(),
        }
    }
}

/// Opens config space and the BAR of a device the session owns (sysfs or VFIO through the held
/// group in production, the simulator in tests).
pub type Opener<'a> = dyn FnMut(&SysfsDevice, &Ownership) -> Result<Box<dyn Backend>> + 'a;

#[derive(Clone, Debug)]
pub struct Request {
    pub bdf: Bdf,
    pub profile: Option<String>,
    pub bar: Option<u8>,
    /// Reset even when bound to a driver other than vfio-pci (never when held).
    pub force: bool,
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

/// Which reset the kernel itself will do to a target, from its `reset_method` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// `device_specific` listed (the 2026 quirk, ~7.4+): the kernel resets the card.
    KernelDeviceSpecific,
    /// `bus` listed (<=7.1, card alone below a port): the kernel SBRs it, which does not reset it.
    KernelBusReset,
    /// Other methods only (e.g. a platform `acpi` _RST): not known to reset the SoC.
    KernelOther,
    /// No method (7.2/7.3 NO_BUS_RESET, or a card on the root bus): no kernel reset at all.
    NoKernelReset,
}

impl Regime {
    pub fn of(methods: Option<&[String]>) -> Regime {
        let methods = methods.unwrap_or_default();
        let has = |m: &str| methods.iter().any(|x| x == m);
        if has("device_specific") {
            Regime::KernelDeviceSpecific
        } else if has("bus") {
            Regime::KernelBusReset
        } else if methods.is_empty() {
            Regime::NoKernelReset
        } else {
            Regime::KernelOther
        }
    }

    /// What the regime means for this host, in one sentence.
    pub fn meaning(self) -> &'static str {
        match self {
            Regime::KernelDeviceSpecific => {
                "the kernel resets the card itself (device_specific); qcom-reset only verifies"
            }
            Regime::KernelBusReset => {
                "the kernel will bus-reset (SBR) the card at every VFIO open and release, which \
                 does not reset it and cannot be stopped from userspace; qcom-reset resets it \
                 after each release while the link survives (link down: needs a power cycle)"
            }
            Regime::KernelOther => {
                "the kernel's methods are not known to reset these cards; qcom-reset resets \
                 after each release"
            }
            Regime::NoKernelReset => {
                "no kernel reset at all (7.2/7.3, or a card on the root bus): qcom-reset is the reset"
            }
        }
    }
}

impl std::fmt::Display for Regime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Regime::KernelDeviceSpecific => "kernel-device-specific",
            Regime::KernelBusReset => "kernel-bus-reset",
            Regime::KernelOther => "kernel-other",
            Regime::NoKernelReset => "no-kernel-reset",
        })
    }
}

/// What the host shows about a target device, without touching it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub bdf: Bdf,
    #[serde(skip)]
    pub dev: SysfsDevice,
    pub vendor: u16,
    pub device: u16,
    pub profile: DeviceProfile,
    pub driver: Option<String>,
    pub iommu_group: Option<String>,
    pub holders: Vec<Holder>,
    pub reset_methods: Option<Vec<String>>,
    pub power_state: Option<String>,
    pub power_control: Option<String>,
}

impl Target {
    /// What a verdict on this device is judged against.
    pub fn expect(&self, after_our_reset: bool) -> verdict::Expect {
        verdict::Expect {
            family: self.profile.family,
            vendor: self.vendor,
            device: self.device,
            after_our_reset,
        }
    }

    /// The kernel already has the Qualcomm device-specific reset (the 2026 quirk).
    pub fn kernel_has_device_specific(&self) -> bool {
        self.regime() == Regime::KernelDeviceSpecific
    }

    pub fn regime(&self) -> Regime {
        Regime::of(self.reset_methods.as_deref())
    }

    /// Why we must not write to the device now, if anything.
    pub fn refusal(&self, force: bool) -> Option<Error> {
        if let Some(h) = self.holders.first() {
            return Some(Error::Held {
                bdf: self.bdf,
                holder: h.to_string(),
            });
        }
        match self.driver.as_deref() {
            None | Some("vfio-pci") => None,
            Some(_) if force => None,
            Some(d) => Some(Error::WrongDriver {
                bdf: self.bdf,
                driver: d.to_string(),
            }),
        }
    }
}

pub fn inspect(host: &Host, bdf: Bdf, profile: Option<&str>, bar: Option<u8>) -> Result<Target> {
    let dev = host.sysfs.device(bdf)?;
    let (vendor, device) = dev.ids()?;
    let profile = device::resolve(vendor, device, profile, bar)?;
    let paths = holders::device_paths(&dev)?;
    Ok(Target {
        bdf,
        vendor,
        device,
        profile,
        driver: dev.driver()?,
        iommu_group: dev.iommu_group()?,
        holders: holders::find(&host.proc_root, &paths, Some(std::process::id())),
        reset_methods: dev.reset_methods()?,
        power_state: dev.power_state()?,
        power_control: dev.power_control()?,
        dev,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Our replay of the reviewed register sequence through the BAR.
    RegisterSequence,
    /// The kernel's own `device_specific` reset through sysfs `reset`.
    KernelDeviceSpecific,
    /// Nothing touched; `plan` lists what would be done.
    DryRun,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub bdf: Bdf,
    pub profile: &'static str,
    pub family: Family,
    pub sequence_version: &'static str,
    pub method: Method,
    pub access: &'static str,
    pub outcome: Option<Outcome>,
    pub verdict: Option<Verdict>,
    /// Register operations of the sequence, in order (for dry runs: those it would do).
    pub ops: Vec<Op>,
    /// Dry run: every step, register operations included.
    pub plan: Vec<String>,
    pub restored: Restored,
    /// What a killed qcom-reset had left on this device and this run put back first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Restored>,
    /// The upstream port as the reset found it (what was masked is in `restored.port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<PortState>,
    pub duration_ms: u64,
    /// Where `duration_ms` went.
    pub phases: Phases,
}

/// Where a reset's time went, in µs: what the card needed (the sequence and its verification)
/// against what qcom-reset added around it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Phases {
    /// Owning the card: the VFIO group, the driver hold, the crash record, the saved config space.
    pub own_us: u64,
    /// The upstream port: its lock and state, masking its link-drop reports.
    pub guard_us: u64,
    /// The register sequence (or the kernel's reset), its delays included.
    pub sequence_us: u64,
    /// Verification, until the verdict.
    pub verify_us: u64,
    /// Putting back what the session changed.
    pub restore_us: u64,
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

/// Values a healthy device would return, so a dry run follows the success path.
fn healthy_read(offset: u32) -> u32 {
    match offset {
        MHISTATUS => READY_STATUS,
        _ => 0,
    }
}

/// MHISTATUS of a device in MHI READY with the READY bit set.
const READY_STATUS: u32 = (MHI_STATE_READY as u32) << 8 | MHISTATUS_READY;

fn dry_run(t: &Target, access: &str) -> Report {
    let p = &t.profile;
    let mut plan = vec![format!("lock {}", t.bdf)];
    if t.kernel_has_device_specific() {
        plan.push(
            "kernel has device_specific: sysfs reset_method <- device_specific (if not first)"
                .into(),
        );
        plan.push("sysfs reset <- 1".into());
    } else {
        if t.power_control.as_deref().is_some_and(|c| c != "on") {
            plan.push("sysfs power/control <- on".into());
        }
        plan.push(format!(
            "config ({access}) read vendor; stop with link-down if 0xffff"
        ));
        plan.push(format!("config ({access}) PCI_COMMAND <- saved | MEMORY"));
        plan.push(format!("map BAR{} via {access}", p.bar));
    }
    let mut io = Recorder::new(DryRun {
        assumed: healthy_read,
    });
    let outcome = sequence::run(p.family, &mut io, &mut |_| {});
    let ops = io.ops;
    if !t.kernel_has_device_specific() {
        plan.extend(ops.iter().map(|o| o.to_string()));
        plan.push(format!(
            "verify: poll MHISTATUS/MHICTRL/EE every {} ms for up to {} ms",
            verdict::SETTLE_POLL.as_millis(),
            verdict::settle_window(p.family).as_millis()
        ));
        plan.push(format!("unmap BAR{}", p.bar));
        plan.push(format!("config ({access}) PCI_COMMAND <- saved"));
        if let Some(c) = t.power_control.as_deref().filter(|c| *c != "on") {
            plan.push(format!("sysfs power/control <- {c}"));
        }
    }
    let port = match upstream_port(t) {
        Ok(p) => Some(p),
        Err(e) => {
            plan.insert(
                0,
                format!("upstream port unreadable ({e}): what it would mask is unknown"),
            );
            None
        }
    };
    if let Some(rec) = port.as_ref().and_then(PortRecord::plan) {
        plan.insert(
            0,
            format!(
                "upstream port {}: mask hotplug events {} / AER Surprise Down {} (restored at post)",
                rec.port,
                rec.slot_control.is_some(),
                rec.aer_mask.is_some()
            ),
        );
    }
    plan.push(format!("unlock {}", t.bdf));
    Report {
        bdf: t.bdf,
        profile: p.name,
        family: p.family,
        sequence_version: p.family.sequence_version(),
        method: Method::DryRun,
        access: "none",
        outcome: Some(outcome),
        verdict: None,
        ops,
        plan,
        restored: Restored::default(),
        recovered: None,
        port,
        duration_ms: 0,
        phases: Phases::default(),
    }
}

/// Resets one device: refuses unsafe cases, then pre / reset / verify / post.
pub fn reset(
    host: &Host,
    req: &Request,
    open: &mut Opener<'_>,
    access_name: &str,
) -> Result<Report> {
    let t = inspect(host, req.bdf, req.profile.as_deref(), req.bar)?;
    if req.profile.is_none() && !req.experimental.allows(&t.profile) {
        return Err(Error::Experimental {
            bdf: t.bdf,
            vendor: t.vendor,
            device: t.device,
            profile: t.profile.name,
        });
    }
    if let Some(e) = t.refusal(req.force) {
        return Err(e);
    }
    if req.dry_run {
        return Ok(dry_run(&t, access_name));
    }
    let _lock = DeviceLock::acquire(&host.run_dir, t.bdf, host.lock_wait)?;
    // A VM may have opened the device while we waited for the lock.
    let t = inspect(host, req.bdf, req.profile.as_deref(), req.bar)?;
    if let Some(e) = t.refusal(req.force) {
        return Err(e);
    }
    let started = Instant::now();
    let mut lap = Lap(started);
    let mut phases = Phases::default();
    let p = t.profile;
    let version = p.family.sequence_version();
    step(
        t.bdf,
        version,
        &format!("pre: {} ({}), BAR{}", p.name, p.model, p.bar),
    );

    let (mut session, recovered) = begin_session(host, &t.dev, open, Writes::Allowed)?;
    phases.own_us = lap.take();
    let port = guard_link_drop(host, &mut session, &t, req)?;
    phases.guard_us = lap.take();
    let mut kernel = t.kernel_has_device_specific() && !req.ignore_kernel_reset;
    if kernel {
        step(
            t.bdf,
            version,
            "reset: the kernel provides device_specific; using its reset instead of ours",
        );
        session.still_owned()?;
        session.saw_link_drop();
        // A kernel reset that failed (its WLAN link poll timing out, say) left the card as the
        // kernel restored it: ours is the reset that is left.
        match kernel_reset(&mut session, &t) {
            Ok(()) => {}
            Err(e @ Error::KernelReset { .. }) => {
                warn!(bdf = %t.bdf, "{e}: falling back to qcom-reset's register sequence");
                kernel = false;
            }
            Err(e) => return Err(e),
        }
    }
    let access = session.backend.name();
    let mut ops = Vec::new();
    let mut outcome = None;
    let verdict = 'seq: {
        let (vendor, device) = session.config_ids();
        if vendor == 0xffff {
            step(
                t.bdf,
                version,
                "pre: config space reads all-ones; link down, no BAR writes",
            );
            break 'seq verdict::judge(
                &t.expect(true),
                &verdict::Registers {
                    config_vendor: vendor,
                    config_device: device,
                    ..Default::default()
                },
            );
        }
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
        let watch = session.watch();
        let mut io = Recorder::new(Live {
            session: &mut session,
            bar: Guarded::new(bar, watch),
        });
        if !kernel {
            let o = sequence::run(p.family, &mut io, &mut |s| {
                step(t.bdf, version, &format!("reset: {s}"))
            });
            step(t.bdf, version, &format!("reset: {o:?}"));
            outcome = Some(o);
            ops = std::mem::take(&mut io.ops);
        }
        step(
            t.bdf,
            version,
            &format!(
                "verify: reading config space and MHI registers (every {} ms, up to {} ms)",
                verdict::SETTLE_POLL.as_millis(),
                verdict::settle_window(p.family).as_millis()
            ),
        );
        // A SoC reset takes the link down, so the sequence reads all-ones at least once; without
        // that evidence a modem found in AMSS never rebooted (e.g. our writes were lost).
        let rebooted = kernel
            || ops.iter().any(|o| {
                matches!(
                    o,
                    crate::device::regio::Op::Read {
                        value: ALL_ONES,
                        ..
                    }
                )
            });
        if rebooted {
            io.inner.session.saw_link_drop();
        }
        phases.sequence_us = lap.take();
        // The verification only reads: once the card is settled a VM may open it meanwhile (a
        // header repair takes the group back first). One that did keeps the card and gets no
        // verdict of ours.
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
        if let Some(l) = lost {
            return Err(session.lost(l));
        }
        if verifying {
            session.take_back()?;
        }
        v
    };
    step(
        t.bdf,
        version,
        &format!("verdict: {} ({})", verdict.health, verdict.detail),
    );
    // Config space reading all-ones ends the look before any sequence: that look is the
    // verification then.
    phases.verify_us = lap.take();
    let restored = session.restore();
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
        method: if kernel {
            Method::KernelDeviceSpecific
        } else {
            Method::RegisterSequence
        },
        access,
        outcome,
        verdict: Some(verdict),
        ops,
        plan: Vec::new(),
        restored,
        recovered,
        port: Some(port),
        duration_ms: started.elapsed().as_millis() as u64,
        phases,
    })
}

/// The card while the sequence and its verification run: the BAR, every write checked against
/// ownership ([`Guarded`]), and config space through the session. When MMIO reads all-ones
/// while config space answers, the link is back but its drop reset the function: the session
/// puts the header back and the read is made again (the reviewed sequence keeps its order).
struct Live<'s, I> {
    session: &'s mut Session,
    bar: Guarded<I>,
}

impl<I: crate::device::regio::RegisterIo> crate::device::regio::RegisterIo for Live<'_, I> {
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
        self.bar.write32(offset, value)
    }
    fn delay(&mut self, d: Duration) {
        self.bar.delay(d)
    }
}

impl<I: crate::device::regio::RegisterIo> verdict::Card for Live<'_, I> {
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
    port::SysfsConfig::open(&path, false)
        .and_then(|mut cfg| PortState::read(p.bdf, &mut cfg))
        .map_err(|err| Error::SysfsRead { path, err })
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
    if let (Some(port), true, false) = (state.port, state.dpc_enabled, req.allow_dpc) {
        return Err(Error::Dpc { bdf: t.bdf, port });
    }
    if state.slot_control.is_some()
        && port::pciehp_polls(&host.sysfs.sys_root())
        && !req.allow_unguarded_link_drop
    {
        return Err(Error::PciehpPolls { bdf: t.bdf });
    }
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

/// Runs the kernel's `device_specific` reset, making it the method used for this one reset
/// (the list it replaces is in the crash record meanwhile). The reset's own error comes first;
/// one putting the list back is logged and left to the restore.
fn kernel_reset(session: &mut Session, t: &Target) -> Result<()> {
    if let Some(methods) = method_swap(t.reset_methods.as_deref().unwrap_or_default()) {
        session.swap_reset_method(methods)?;
    }
    let r = t.dev.write("reset", "1").map_err(|e| match e {
        Error::SysfsWrite { err, .. } => Error::KernelReset { bdf: t.bdf, err },
        e => e,
    });
    match (r, session.unswap_reset_method()) {
        (Err(e), Err(back)) => {
            warn!(bdf = %t.bdf, "reset_method not put back yet: {back}");
            Err(e)
        }
        (r, back) => r.and(back),
    }
}

/// When `device_specific` is not the first method, the kernel would try the others first: the
/// list to put back after making it the only one for this reset.
fn method_swap(methods: &[String]) -> Option<String> {
    (methods.first().map(String::as_str) != Some("device_specific")).then(|| methods.join(" "))
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub target: Target,
    pub kernel_device_specific: bool,
    pub regime: Regime,
    pub verdict: Option<Verdict>,
    /// Why the registers were not read.
    pub skipped: Option<Unread>,
}

/// Why a device's registers were not read (serialized as the sentence alone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Unread {
    /// Something holds the device (a VM's QEMU, another session): its letting go ends this.
    Held(String),
    /// Reading is not for us now: a host driver has it, observe-only cannot wake it, access
    /// through VFIO would reset it.
    Refused(String),
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unread::Held(why) | Unread::Refused(why) => f.write_str(why),
        }
    }
}

impl Unread {
    /// A refusal as the reason: held when something holds the device.
    fn of(e: &Error) -> Unread {
        match e {
            Error::Held { .. } | Error::HeldBySession { .. } => Unread::Held(e.to_string()),
            _ => Unread::Refused(e.to_string()),
        }
    }
}

/// Whether reading a device's registers may change its state on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Wake it (power/control on) and enable memory decoding, restoring both afterwards.
    EnableAndRestore,
    /// Write nothing at all (observe-only): read only if it is already awake and decoding.
    NoWrites,
}

/// A device's state without its registers, and why they were not read.
pub fn unread_status(t: Target, why: Unread) -> Status {
    Status {
        regime: t.regime(),
        kernel_device_specific: t.kernel_has_device_specific(),
        target: t,
        verdict: None,
        skipped: Some(why),
    }
}

/// Reads a device's state; registers only when it is safe (not held, vfio-pci or no driver).
pub fn status(host: &Host, t: Target, open: &mut Opener<'_>, mode: ReadMode) -> Result<Status> {
    let skipped = unread_status;
    if let Some(e) = t.refusal(false) {
        return Ok(skipped(t, Unread::of(&e)));
    }
    if mode == ReadMode::NoWrites
        && let Some(p) = t.power_control.clone().filter(|p| p != "on")
    {
        return Ok(skipped(
            t,
            Unread::Refused(format!(
                "reading needs power/control=on (it is {p}) and observe-only writes nothing"
            )),
        ));
    }
    let _lock = DeviceLock::acquire(&host.run_dir, t.bdf, host.lock_wait)?;
    // The wait may have been long: a VM may have opened the card or a host driver taken it.
    let t = inspect(host, t.bdf, Some(t.profile.name), Some(t.profile.bar))?;
    if let Some(e) = t.refusal(false) {
        return Ok(skipped(t, Unread::of(&e)));
    }
    // Owned after the lock: a VM that opened the device meanwhile makes this fail with Held.
    let writes = match mode {
        ReadMode::EnableAndRestore => Writes::Allowed,
        ReadMode::NoWrites => Writes::None,
    };
    let mut session = match begin_session(host, &t.dev, open, writes) {
        Ok((s, _)) => s,
        Err(e @ (Error::Held { .. } | Error::HeldBySession { .. })) => {
            return Ok(skipped(t, Unread::of(&e)));
        }
        Err(e) => return Err(e),
    };
    let (vendor, device) = session.config_ids();
    let mut regs = verdict::Registers {
        config_vendor: vendor,
        config_device: device,
        ..Default::default()
    };
    if (vendor, device) == (t.vendor, t.device) {
        if mode == ReadMode::NoWrites {
            let cmd = session.backend.config_read16(PCI_COMMAND).unwrap_or(0);
            if cmd & PCI_COMMAND_MEMORY == 0 {
                drop(session);
                return Ok(skipped(
                    t,
                    Unread::Refused(format!(
                        "reading needs memory decoding (PCI_COMMAND={cmd:#06x}) and observe-only writes nothing"
                    )),
                ));
            }
        } else {
            session.enable_memory()?;
        }
        let (mut bar, len) = session.backend.map_bar(t.profile.bar)?;
        regs = verdict::read_registers(&t.expect(false), vendor, device, bar.as_mut(), len);
    }
    session.restore();
    drop(session);
    let verdict = verdict::judge(&t.expect(false), &regs);
    Ok(Status {
        regime: t.regime(),
        kernel_device_specific: t.kernel_has_device_specific(),
        target: t,
        verdict: Some(verdict),
        skipped: None,
    })
}

/// Puts back what killed qcom-reset sessions left on devices (their records in the run
/// directory): each under its lock and ownership, like any session. Returns what was restored.
pub fn recover_pending(host: &Host, open: &mut Opener<'_>) -> Vec<(Bdf, Result<Restored>)> {
    crate::session::record::pending(&host.run_dir)
        .into_iter()
        .map(|bdf| (bdf, recover_one(host, bdf, open)))
        .collect()
}

fn recover_one(host: &Host, bdf: Bdf, open: &mut Opener<'_>) -> Result<Restored> {
    let _lock = DeviceLock::acquire(&host.run_dir, bdf, host.lock_wait)?;
    let dev = match host.sysfs.device(bdf) {
        Ok(d) => d,
        Err(Error::NoSuchDevice(..)) => {
            return crate::session::recover_absent(&host.run_dir, &host.sysfs, bdf);
        }
        Err(e) => return Err(e),
    };
    let (mut session, recovered) = begin_session(host, &dev, open, Writes::Allowed)?;
    session.restore();
    Ok(recovered.unwrap_or_default())
}

/// Own the device, open it through what the session holds, and begin the session (recovering
/// a killed one's record first). The caller holds the device's lock.
fn begin_session(
    host: &Host,
    dev: &SysfsDevice,
    open: &mut Opener<'_>,
    writes: Writes,
) -> Result<(Session, Option<Restored>)> {
    let own = Ownership::take(&host.dev_vfio, &host.proc_root, dev, &host.open_group)?;
    let backend = open(dev, &own)?;
    Session::begin(
        dev,
        host.run_dir.clone(),
        host.lock_wait,
        own,
        backend,
        writes,
    )
}

/// Targets present on this host: devices in the table, plus explicit `(bdf, profile, bar)`
/// overrides. One that cannot be inspected (removed while listed, unreadable sysfs) is logged
/// and skipped: the others are still served.
pub fn targets(host: &Host, overrides: &[(Bdf, String, Option<u8>)]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for dev in host.sysfs.list()? {
        let ov = overrides.iter().find(|(b, _, _)| *b == dev.bdf);
        let Ok((vendor, device)) = dev.ids() else {
            continue;
        };
        if ov.is_none() && device::by_id(vendor, device).is_none() {
            continue;
        }
        match inspect(
            host,
            dev.bdf,
            ov.map(|o| o.1.as_str()),
            ov.and_then(|o| o.2),
        ) {
            Ok(t) => out.push(t),
            Err(e) => warn!(bdf = %dev.bdf, "skipped: {e}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specific_is_made_first_only_when_it_is_not() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            method_swap(&m(&["bus", "device_specific"])),
            Some("bus device_specific".into())
        );
        assert_eq!(method_swap(&m(&["device_specific", "bus"])), None);
    }
}
