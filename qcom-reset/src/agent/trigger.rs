//! Which kernel events call for the agent, and how strongly: the decision made from one event.

use serde::Serialize;

use crate::host::holders::OWN_COMM;
use crate::probes::events::{Kind, TraceEvent};

/// Why a device task runs, weakest first: a stronger trigger replaces a weaker one while debouncing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Start-up or lost-event sweep: verify, reset as `rescan_resets` says.
    Rescan,
    /// A reset call other than a successful `pci_dev_specific_reset` (sysfs `reset`,
    /// VFIO_DEVICE_RESET, a bus reset), whatever it returned: debounced, then reset.
    ResetCall,
    /// A reset call in which the kernel's `pci_dev_specific_reset` returned 0 (sysfs `reset`,
    /// a VM's VFIO_DEVICE_RESET): verify, reset only if not clean; while a VM holds the
    /// device, its release answers it.
    KernelResetCall,
    /// vfio_pci_core_disable returned after the kernel's `pci_dev_specific_reset` returned 0:
    /// verify once the holder lets go (QEMU keeps the group open while it shuts down), reset
    /// only if not clean.
    KernelReset,
    /// A VFIO open failed after its own reset calls: no release will follow. Verify once the
    /// opener has let go of the group, reset unless clean.
    FailedOpen,
    /// The device became bound to vfio-pci: after `bind_settle_ms`, reset it unless a VM
    /// holds it by then (libvirt's managed hostdevs bind and start QEMU at once).
    Bind,
    /// vfio_pci_core_disable returned without the kernel's device-specific reset.
    Release,
}

impl Trigger {
    /// Acts at once; the others wait their window (debounce, or the bind settle time) for the
    /// event that explains or supersedes them.
    pub(super) fn immediate(self) -> bool {
        self == Trigger::Release
    }

    /// Checks the device first and resets only if the verdict calls for it.
    pub(super) fn verifies_first(self) -> bool {
        matches!(
            self,
            Trigger::Rescan | Trigger::KernelResetCall | Trigger::KernelReset | Trigger::FailedOpen
        )
    }

    /// Ends a use of the device by someone who may still hold its group for a while (QEMU
    /// shutting down, or failing to start): a refusal as held waits for them to let go.
    pub(super) fn waits_for_holder(self) -> bool {
        matches!(
            self,
            Trigger::Release | Trigger::KernelReset | Trigger::FailedOpen
        )
    }

    /// The kernel's own device-specific reset took (at a release or a reset call).
    pub(super) fn kernel_reset(self) -> bool {
        matches!(self, Trigger::KernelResetCall | Trigger::KernelReset)
    }

    /// The trigger for a probe event on a target, or None when it needs nothing.
    pub fn of_event(e: &TraceEvent) -> Option<Trigger> {
        // A qcom-reset session's own VFIO open and close (a hook's or the CLI's `reset` with
        // VFIO access) is no VM letting go: answering it would hold the group exactly when the
        // VM the hook prepares starts. The agent itself is dropped in the kernel by TGID.
        if e.comm == OWN_COMM {
            return None;
        }
        let device_specific_ok =
            e.function == qcom_reset_ebpf::Func::PciDevSpecificReset && e.ret == 0;
        match e.kind {
            Kind::Release if e.left_unreset == Some(false) => Some(Trigger::KernelReset),
            Kind::Release => Some(Trigger::Release),
            // Made inside a VFIO open or release of the device: that event carries it, and the
            // release is what gets answered (however long the open takes after its reset).
            Kind::Attempt if e.inside.is_some() => None,
            Kind::Attempt if device_specific_ok => Some(Trigger::KernelResetCall),
            Kind::Attempt => Some(Trigger::ResetCall),
            // An open that failed after its reset calls: no release will follow to answer them.
            Kind::Open if e.ret != 0 && e.attempts_seen.unwrap_or(0) > 0 => {
                Some(Trigger::FailedOpen)
            }
            // The device is now held; its release will follow.
            Kind::Open => None,
        }
    }
}
