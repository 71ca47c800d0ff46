//! Probes on the PCI reset paths and the VFIO open/release brackets.
//!
//! Rust eBPF emits no CO-RE relocations, so every kernel struct member is read at an offset that
//! userspace resolved from BTF and injected (globals for `struct pci_dev`, the `VFIO_LAYOUT` map
//! for the module's `struct vfio_pci_core_device`). Each probed function gets an entry and an exit
//! program in two flavours (kprobe/kretprobe and fentry/fexit); userspace attaches one flavour per
//! function, so the shared logic below must not care which one fired.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_pidns_info},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, generated::bpf_get_ns_current_pid_tgid,
    },
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use aya_log_ebpf::warn;
use qcom_reset_ebpf::{
    Attempt, DROPS_BRACKETS, DROPS_RINGBUF, EVENT_ABI_VERSION, Event, EventKind, Flavour, Func,
    MAX_ATTEMPTS, NEEDS_RESET_UNKNOWN, OFFSET_MISSING, VfioLayout, target_key,
};

#[unsafe(no_mangle)]
static PCI_DEV_VENDOR_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static PCI_DEV_DEVICE_OFF: Global<u32> = Global::new(0);
/// Offset of `dev.kobj.name` (a `const char *`) inside `struct pci_dev`.
#[unsafe(no_mangle)]
static PCI_DEV_NAME_OFF: Global<u32> = Global::new(0);
/// 1: report every PCI device, not only those in `TARGETS`.
#[unsafe(no_mangle)]
static TRACE_ALL: Global<u32> = Global::new(0);
/// The agent's own TGID as seen in its PID namespace (0: report everyone): its VFIO opens and
/// resets must not trigger it again. A containerised agent's getpid() is not the kernel's
/// TGID, so the comparison happens in that namespace, named by the nsfs inode of
/// /proc/self/ns/pid and its device.
#[unsafe(no_mangle)]
static AGENT_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static AGENT_PIDNS_DEV: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static AGENT_PIDNS_INO: Global<u64> = Global::new(0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
#[map]
static VFIO_LAYOUT: Array<VfioLayout> = Array::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct CallKey {
    tid: u32,
    func: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Call {
    start_ns: u64,
    pdev: u64,
    probe: u64,
}

/// An open or release in progress on one thread, collecting the resets made inside it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Bracket {
    func: u64,
    vdev: u64,
    pdev: u64,
    start_ns: u64,
    n_attempts: u32,
    n_seen: u32,
    attempts: [Attempt; MAX_ATTEMPTS],
}

#[map]
static CALLS: HashMap<CallKey, Call> = HashMap::with_max_entries(1024, 0);
#[map]
static BRACKETS: HashMap<u32, Bracket> = HashMap::with_max_entries(256, 0);

#[inline(always)]
fn count_drop(index: u32) {
    if let Some(c) = DROPS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot the map lookup just returned; no other program on this
        // CPU runs meanwhile.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn tid_tgid() -> (u32, u32) {
    let v = bpf_get_current_pid_tgid();
    (v as u32, (v >> 32) as u32)
}

/// # Safety
/// `base` must be a kernel address of a structure with a `T` at `off` (the offsets come from
/// the running kernel's BTF); a bad address makes the helper fail, not fault.
#[inline(always)]
unsafe fn read_at<T>(base: u64, off: u32) -> Option<T> {
    if off == OFFSET_MISSING {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-safe path.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T).ok() }
}

/// Whether the current task belongs to the agent, compared in the agent's PID namespace. The
/// helper fails (-EINVAL) for tasks outside that namespace: those are never the agent.
#[inline(always)]
fn is_agent() -> bool {
    let tgid = AGENT_TGID.load();
    if tgid == 0 {
        return false;
    }
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `ns` is a live, writable bpf_pidns_info on this stack and its exact size is passed.
    let r = unsafe {
        bpf_get_ns_current_pid_tgid(
            AGENT_PIDNS_DEV.load(),
            AGENT_PIDNS_INO.load(),
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    r == 0 && ns.tgid == tgid
}

/// Whether `pdev` is a device we report on, for a caller other than the agent itself.
// Inlined: a BPF-to-BPF call returning an aggregate leaves registers the verifier rejects.
#[inline(always)]
fn wanted(pdev: u64) -> bool {
    if pdev == 0 {
        return false;
    }
    if is_agent() {
        return false;
    }
    // SAFETY: `pdev` is the probed function's `struct pci_dev *`; the offsets are its BTF's.
    let (Some(vendor), Some(device)) = (
        unsafe { read_at::<u16>(pdev, PCI_DEV_VENDOR_OFF.load()) },
        unsafe { read_at::<u16>(pdev, PCI_DEV_DEVICE_OFF.load()) },
    ) else {
        return false;
    };
    // SAFETY: a hash map lookup; the value is only tested for presence.
    TRACE_ALL.load() != 0 || unsafe { TARGETS.get(&target_key(vendor, device)) }.is_some()
}

#[inline(always)]
fn call_enter(func: Func, pdev: u64, probe: u64) {
    if !wanted(pdev) {
        return;
    }
    let (tid, _) = tid_tgid();
    let key = CallKey {
        tid,
        func: func as u32,
    };
    let call = Call {
        // SAFETY: a helper call without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        pdev,
        probe,
    };
    // A full table loses this call's return event: counted, so the agent rescans.
    if CALLS.insert(&key, &call, 0).is_err() {
        count_drop(DROPS_BRACKETS);
    }
}

/// Fills the fields every event carries and submits it. An attempt inside a VFIO open or
/// release (`bracket` set by `fill`) does not wake the agent: its bracket's own event follows
/// within the same call and carries it, and waking the agent for the attempt would only have it
/// busy when the release that needs a reset arrives. Every other event wakes it even when it was
/// not woken for the records before (the kernel's default wakes only a consumer that has read
/// everything before).
#[inline(always)]
fn emit(
    kind: EventKind,
    flavour: Flavour,
    func: u8,
    pdev: u64,
    ret: i32,
    start_ns: u64,
    fill: impl FnOnce(&mut Event),
) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_drop(DROPS_RINGBUF);
        return;
    };
    let e = entry.as_mut_ptr();
    let (tid, tgid) = tid_tgid();
    let in_bracket;
    // SAFETY: `e` is the ring buffer entry reserved above, sized for one Event and ours until
    // submitted; it is zeroed before any field is read. `pdev` as in `wanted`.
    unsafe {
        core::ptr::write_bytes(e, 0, 1);
        let e = &mut *e;
        e.abi = EVENT_ABI_VERSION;
        e.kind = kind as u8;
        e.flavour = flavour as u8;
        e.func = func;
        e.needs_reset = NEEDS_RESET_UNKNOWN;
        e.ret = ret;
        e.pid = tid;
        e.tgid = tgid;
        e.start_ns = start_ns;
        e.duration_ns = bpf_ktime_get_ns().wrapping_sub(start_ns);
        e.comm = bpf_get_current_comm().unwrap_or_default();
        e.vendor = read_at(pdev, PCI_DEV_VENDOR_OFF.load()).unwrap_or(0);
        e.device = read_at(pdev, PCI_DEV_DEVICE_OFF.load()).unwrap_or(0);
        if let Some(name) = read_at::<u64>(pdev, PCI_DEV_NAME_OFF.load()) {
            let _ = bpf_probe_read_kernel_str_bytes(name as *const u8, &mut e.bdf);
        }
        fill(e);
        in_bracket = e.bracket != 0;
    }
    entry.submit(u64::from(if in_bracket {
        BPF_RB_NO_WAKEUP
    } else {
        BPF_RB_FORCE_WAKEUP
    }));
}

#[inline(always)]
fn call_exit(func: Func, flavour: Flavour, ret: i32) {
    let (tid, _) = tid_tgid();
    let key = CallKey {
        tid,
        func: func as u32,
    };
    // SAFETY: a hash map lookup, copied out at once.
    let Some(call) = (unsafe { CALLS.get(&key) }).copied() else {
        return;
    };
    let _ = CALLS.remove(&key);
    // Enumeration probes every device's methods; only a non-probe call is a reset attempt.
    if call.probe != 0 {
        return;
    }
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut bracket = 0;
    if let Some(b) = BRACKETS.get_ptr_mut(&tid) {
        // SAFETY: the entry of this thread's id: only this thread's programs touch it.
        let b = unsafe { &mut *b };
        if b.pdev == call.pdev {
            bracket = b.func as u8;
        }
        let i = b.n_attempts as usize;
        if i < MAX_ATTEMPTS {
            b.attempts[i] = Attempt {
                func: func as u8,
                _pad: [0; 3],
                ret,
                duration_ns: now.wrapping_sub(call.start_ns),
            };
            b.n_attempts += 1;
        }
        b.n_seen += 1;
    }
    emit(
        EventKind::Attempt,
        flavour,
        func as u8,
        call.pdev,
        ret,
        call.start_ns,
        |e| e.bracket = bracket,
    );
}

#[inline(always)]
fn bracket_enter<C: EbpfContext>(ctx: &C, func: Func, vdev: u64) {
    let Some(layout) = VFIO_LAYOUT.get(0).copied() else {
        return;
    };
    if layout.valid == 0 || vdev == 0 {
        return;
    }
    // SAFETY: `vdev` is the probed `struct vfio_pci_core_device *`; `layout` is its BTF's.
    let Some(pdev) = (unsafe { read_at::<u64>(vdev, layout.pdev) }) else {
        return;
    };
    if !wanted(pdev) {
        return;
    }
    let (tid, _) = tid_tgid();
    let b = Bracket {
        func: func as u64,
        vdev,
        pdev,
        // SAFETY: a helper call without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        n_attempts: 0,
        n_seen: 0,
        attempts: [Attempt::default(); MAX_ATTEMPTS],
    };
    if BRACKETS.insert(&tid, &b, 0).is_err() {
        count_drop(DROPS_BRACKETS);
        warn!(
            ctx,
            "qcom-reset: bracket table full, {} summary lost",
            func.symbol()
        );
    }
}

#[inline(always)]
fn bracket_exit(func: Func, ret: i32) {
    let (tid, _) = tid_tgid();
    // SAFETY: a hash map lookup, copied out at once.
    let Some(b) = (unsafe { BRACKETS.get(&tid) }).copied() else {
        return;
    };
    let _ = BRACKETS.remove(&tid);
    if b.func != func as u64 {
        return;
    }
    let kind = if func == Func::VfioPciCoreDisable {
        EventKind::Release
    } else {
        EventKind::Open
    };
    let needs_reset = match (func, VFIO_LAYOUT.get(0)) {
        // SAFETY: `b.vdev` is the bracketed device's `vfio_pci_core_device`, still open.
        (Func::VfioPciCoreDisable, Some(l)) => unsafe { read_at::<u8>(b.vdev, l.needs_reset) }
            .map(|byte| byte & l.needs_reset_mask as u8),
        _ => None,
    };
    emit(
        kind,
        Flavour::Kprobe,
        func as u8,
        b.pdev,
        ret,
        b.start_ns,
        |e| {
            e.needs_reset = needs_reset.map_or(NEEDS_RESET_UNKNOWN, |v| u8::from(v != 0));
            e.n_attempts = b.n_attempts as u8;
            e.n_seen = b.n_seen.min(255) as u8;
            e.attempts = b.attempts;
        },
    );
}

/// Entry/exit programs of one reset function in both flavours. `$probe_arg` is the index of
/// `pci_dev_specific_reset`'s `bool probe` argument, or `none`.
macro_rules! reset_probes {
    ($func:expr, $sym:literal, $kp:ident, $krp:ident, $fe:ident, $fx:ident, $nargs:literal, $probe_arg:tt) => {
        #[kprobe]
        pub fn $kp(ctx: ProbeContext) -> u32 {
            let pdev: u64 = ctx.arg(0).unwrap_or(0);
            call_enter($func, pdev, reset_probes!(@probe kp ctx $probe_arg));
            0
        }
        #[kretprobe]
        pub fn $krp(ctx: RetProbeContext) -> u32 {
            call_exit($func, Flavour::Kprobe, ctx.ret::<i32>());
            0
        }
        #[fentry(function = $sym)]
        pub fn $fe(ctx: FEntryContext) -> u32 {
            let pdev: u64 = ctx.arg(0);
            call_enter($func, pdev, reset_probes!(@probe fe ctx $probe_arg));
            0
        }
        #[fexit(function = $sym)]
        pub fn $fx(ctx: FExitContext) -> u32 {
            let ret: i64 = ctx.arg($nargs);
            call_exit($func, Flavour::Fentry, ret as i32);
            0
        }
    };
    (@probe kp $ctx:ident none) => { 0 };
    (@probe fe $ctx:ident none) => { 0 };
    (@probe kp $ctx:ident $i:literal) => { ($ctx.arg::<u64>($i).unwrap_or(0) & 0xff) };
    (@probe fe $ctx:ident $i:literal) => { ($ctx.arg::<u64>($i) & 0xff) };
}

reset_probes!(
    Func::PciResetFunction,
    "pci_reset_function",
    kp_pci_reset_function,
    krp_pci_reset_function,
    fe_pci_reset_function,
    fx_pci_reset_function,
    1,
    none
);
reset_probes!(
    Func::PciTryResetFunction,
    "pci_try_reset_function",
    kp_pci_try_reset_function,
    krp_pci_try_reset_function,
    fe_pci_try_reset_function,
    fx_pci_try_reset_function,
    1,
    none
);
reset_probes!(
    Func::PciResetFunctionLocked,
    "pci_reset_function_locked",
    kp_pci_reset_function_locked,
    krp_pci_reset_function_locked,
    fe_pci_reset_function_locked,
    fx_pci_reset_function_locked,
    1,
    none
);
reset_probes!(
    Func::PciResetFunctionLockedInner,
    "__pci_reset_function_locked",
    kp_inner_pci_reset_function_locked,
    krp_inner_pci_reset_function_locked,
    fe_inner_pci_reset_function_locked,
    fx_inner_pci_reset_function_locked,
    1,
    none
);
reset_probes!(
    Func::PciResetBus,
    "pci_reset_bus",
    kp_pci_reset_bus,
    krp_pci_reset_bus,
    fe_pci_reset_bus,
    fx_pci_reset_bus,
    1,
    none
);
reset_probes!(
    Func::PciDevSpecificReset,
    "pci_dev_specific_reset",
    kp_pci_dev_specific_reset,
    krp_pci_dev_specific_reset,
    fe_pci_dev_specific_reset,
    fx_pci_dev_specific_reset,
    2,
    1
);
reset_probes!(
    Func::PciResetBusFunction,
    "pci_reset_bus_function",
    kp_pci_reset_bus_function,
    krp_pci_reset_bus_function,
    fe_pci_reset_bus_function,
    fx_pci_reset_bus_function,
    2,
    1
);

// The VFIO brackets are kprobe-only: aya resolves fentry targets in vmlinux BTF alone, and these
// functions live in the vfio_pci_core module.
#[kprobe]
pub fn kp_vfio_pci_core_enable(ctx: ProbeContext) -> u32 {
    bracket_enter(&ctx, Func::VfioPciCoreEnable, ctx.arg(0).unwrap_or(0));
    0
}
#[kretprobe]
pub fn krp_vfio_pci_core_enable(ctx: RetProbeContext) -> u32 {
    bracket_exit(Func::VfioPciCoreEnable, ctx.ret::<i32>());
    0
}
#[kprobe]
pub fn kp_vfio_pci_core_disable(ctx: ProbeContext) -> u32 {
    bracket_enter(&ctx, Func::VfioPciCoreDisable, ctx.arg(0).unwrap_or(0));
    0
}
#[kretprobe]
pub fn krp_vfio_pci_core_disable(_ctx: RetProbeContext) -> u32 {
    bracket_exit(Func::VfioPciCoreDisable, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
