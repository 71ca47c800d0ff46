//! ABI shared by the eBPF programs and the userspace agent.
//!
//! Every type here crosses the kernel/user boundary through the ring buffer or a map, so each is
//! `#[repr(C)]` with explicit padding and only plain integers: the userspace decoder reads the
//! exact bytes the probe wrote. Bump [`EVENT_ABI_VERSION`] on any layout change.
#![no_std]

/// Version of the [`Event`] layout; written into every event so a mismatched agent refuses it.
pub const EVENT_ABI_VERSION: u8 = 3;
/// Longest device name kept from `pdev->dev.kobj.name` ("0000:03:00.0" is 12 bytes + NUL).
pub const BDF_LEN: usize = 16;
pub const COMM_LEN: usize = 16;
/// Reset attempts remembered inside one VFIO open/release bracket; more are counted, not kept.
pub const MAX_ATTEMPTS: usize = 8;

/// Key of the target filter map: (vendor << 16) | device.
pub const fn target_key(vendor: u16, device: u16) -> u32 {
    ((vendor as u32) << 16) | device as u32
}

/// The probed kernel functions, in the order userspace attaches them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    PciResetFunction = 1,
    PciTryResetFunction = 2,
    PciResetFunctionLocked = 3,
    PciResetFunctionLockedInner = 4,
    PciResetBus = 5,
    PciDevSpecificReset = 6,
    VfioPciCoreEnable = 7,
    VfioPciCoreDisable = 8,
    /// The `bus` reset method (an SBR of the parent bridge, or a hotplug slot reset).
    PciResetBusFunction = 9,
}

impl Func {
    pub const ALL: [Func; 9] = [
        Func::PciResetFunction,
        Func::PciTryResetFunction,
        Func::PciResetFunctionLocked,
        Func::PciResetFunctionLockedInner,
        Func::PciResetBus,
        Func::PciDevSpecificReset,
        Func::VfioPciCoreEnable,
        Func::VfioPciCoreDisable,
        Func::PciResetBusFunction,
    ];

    pub const fn from_u8(v: u8) -> Option<Func> {
        match v {
            1 => Some(Func::PciResetFunction),
            2 => Some(Func::PciTryResetFunction),
            3 => Some(Func::PciResetFunctionLocked),
            4 => Some(Func::PciResetFunctionLockedInner),
            5 => Some(Func::PciResetBus),
            6 => Some(Func::PciDevSpecificReset),
            7 => Some(Func::VfioPciCoreEnable),
            8 => Some(Func::VfioPciCoreDisable),
            9 => Some(Func::PciResetBusFunction),
            _ => None,
        }
    }

    /// The kernel symbol.
    pub const fn symbol(self) -> &'static str {
        match self {
            Func::PciResetFunction => "pci_reset_function",
            Func::PciTryResetFunction => "pci_try_reset_function",
            Func::PciResetFunctionLocked => "pci_reset_function_locked",
            Func::PciResetFunctionLockedInner => "__pci_reset_function_locked",
            Func::PciResetBus => "pci_reset_bus",
            Func::PciDevSpecificReset => "pci_dev_specific_reset",
            Func::VfioPciCoreEnable => "vfio_pci_core_enable",
            Func::VfioPciCoreDisable => "vfio_pci_core_disable",
            Func::PciResetBusFunction => "pci_reset_bus_function",
        }
    }

    /// The part of the program names after the flavour prefix (`kp_`, `krp_`, `fe_`, `fx_`).
    pub const fn program_stem(self) -> &'static str {
        match self {
            Func::PciResetFunctionLockedInner => "inner_pci_reset_function_locked",
            f => f.symbol(),
        }
    }

    /// Whether the function lives in the vfio_pci_core module rather than vmlinux.
    pub const fn in_vfio_module(self) -> bool {
        matches!(self, Func::VfioPciCoreEnable | Func::VfioPciCoreDisable)
    }
}

/// What an [`Event`] reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// One call of a reset function returned.
    Attempt = 1,
    /// `vfio_pci_core_disable` returned: the last user of the device let go.
    Release = 2,
    /// `vfio_pci_core_enable` returned: a user opened the device.
    Open = 3,
}

/// How the program that produced an event was attached.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Kprobe = 1,
    Fentry = 2,
}

/// `needs_reset` as read from `struct vfio_pci_core_device` at release.
pub const NEEDS_RESET_UNKNOWN: u8 = 0xff;

/// One reset call seen inside an open/release bracket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempt {
    pub func: u8,
    pub _pad: [u8; 3],
    pub ret: i32,
    pub duration_ns: u64,
}

/// The single record type on the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub abi: u8,
    pub kind: u8,
    pub flavour: u8,
    /// The probed function (for brackets: enable or disable).
    pub func: u8,
    /// `needs_reset` at release, or [`NEEDS_RESET_UNKNOWN`].
    pub needs_reset: u8,
    /// Attempts kept in `attempts`.
    pub n_attempts: u8,
    /// Attempts seen, including those that did not fit.
    pub n_seen: u8,
    /// An attempt made inside a VFIO open or release of the same device: that bracket's
    /// function ([`Func::VfioPciCoreEnable`] or [`Func::VfioPciCoreDisable`]), else 0. The
    /// bracket's own event carries the attempt too, and answers it.
    pub bracket: u8,
    /// Return code of the function (0 for `void vfio_pci_core_disable`).
    pub ret: i32,
    pub vendor: u16,
    pub device: u16,
    pub pid: u32,
    pub tgid: u32,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub comm: [u8; COMM_LEN],
    pub bdf: [u8; BDF_LEN],
    pub attempts: [Attempt; MAX_ATTEMPTS],
}

/// Kernel struct member offsets, resolved from BTF by userspace at load time.
/// `u32::MAX` marks a member this kernel does not have.
pub const OFFSET_MISSING: u32 = u32::MAX;

/// Layout of `struct vfio_pci_core_device`, stored in the `VFIO_LAYOUT` array map because the
/// module (and so its BTF) may appear only after the programs were loaded and their read-only
/// globals frozen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioLayout {
    /// 1 once userspace has filled the offsets in.
    pub valid: u32,
    pub pdev: u32,
    /// Byte offset of the byte holding `needs_reset`.
    pub needs_reset: u32,
    /// Bits of that byte that are `needs_reset`: 0xff for a plain `bool`, `1 << bit` for the
    /// 1-bit bitfield of kernels ≈6.5–7.1 without the 2026 stable fix.
    pub needs_reset_mask: u32,
}

/// Index of the drop counter in the per-CPU `DROPS` array.
pub const DROPS_RINGBUF: u32 = 0;
/// Index of the "in-flight table full" counter in `DROPS`: a VFIO bracket or a reset call that
/// found its hash map full (its event is lost).
pub const DROPS_BRACKETS: u32 = 1;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid.
    unsafe impl aya::Pod for super::VfioLayout {}
}
