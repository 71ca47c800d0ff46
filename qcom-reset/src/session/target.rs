//! What a target is before a session touches it: the host's view of the card (driver, holders,
//! the kernel's reset methods) and the one refusal every session checks first and again after
//! its lock wait.
use serde::Serialize;
use tracing::warn;

use crate::bdf::Bdf;
use crate::device::{self, DeviceProfile, verdict};
use crate::host::Host;
use crate::host::holders::{self, Holder};
use crate::host::sysfs::SysfsDevice;
use crate::{Error, Result};

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
    /// The regime a device's `reset_method` list puts it in.
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
    /// The card's address.
    pub bdf: Bdf,
    /// Its sysfs directory.
    #[serde(skip)]
    pub dev: SysfsDevice,
    /// Its vendor ID (sysfs).
    pub vendor: u16,
    /// Its device ID (sysfs).
    pub device: u16,
    /// The profile it is treated as.
    pub profile: DeviceProfile,
    /// The driver bound to it.
    pub driver: Option<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<String>,
    /// Processes that hold its VFIO nodes open.
    pub holders: Vec<Holder>,
    /// The kernel's `reset_method` list (none on kernels without the file).
    pub reset_methods: Option<Vec<String>>,
    /// Its power state (sysfs `power_state`).
    pub power_state: Option<String>,
    /// Its runtime PM setting (sysfs `power/control`).
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

    /// The regime its `reset_method` puts it in.
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

/// What the host shows about `bdf` as `profile` (its own by its IDs when none) and `bar`.
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
