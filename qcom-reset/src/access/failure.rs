//! Why a BAR, or a device through VFIO, could not be mapped: the step and its OS error.
use std::path::PathBuf;

/// Why a BAR (or, for VFIO, the device itself) could not be mapped. The OS error is kept.
#[derive(Debug)]
pub enum MapFailure {
    /// VFIO access needs the device bound to vfio-pci.
    NotVfioPci,
    /// The device has no IOMMU group.
    NoIommuGroup,
    /// The kernel's resource table has no address for the BAR.
    Unassigned,
    /// The VFIO region is empty or cannot be mmapped.
    NotMappable,
    /// The SIGBUS guard's table of mapped BARs is full.
    TooManyMaps,
    /// `/dev/vfio/vfio` speaks another VFIO API version.
    UnknownApi,
    /// The kernel has no type1 IOMMU backend.
    NoType1,
    /// Some device of the IOMMU group is bound to a host driver.
    NotViable,
    /// A step that failed with an OS error.
    Os {
        /// The step.
        step: MapStep,
        /// Its OS error.
        err: std::io::Error,
    },
}

/// The step of a mapping that an OS error came from.
#[derive(Debug)]
pub enum MapStep {
    /// A second descriptor of the group the session holds.
    DupGroup,
    /// `/dev/vfio/N`.
    OpenGroup(PathBuf),
    /// `/dev/vfio/vfio`.
    OpenContainer,
    /// A sysfs `resourceN` file.
    OpenResource(PathBuf),
    /// The mmap of a sysfs `resourceN` file of `len` bytes.
    MmapResource {
        /// The `resourceN` file.
        path: PathBuf,
        /// The bytes asked for.
        len: u64,
    },
    /// The mmap of a VFIO region.
    MmapRegion,
    /// A VFIO ioctl, by its uAPI name.
    Ioctl(&'static str),
}

impl std::fmt::Display for MapFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use MapFailure::*;
        f.write_str(match self {
            NotVfioPci => "the device must be bound to vfio-pci for VFIO access",
            NoIommuGroup => "the device has no IOMMU group; VFIO needs an IOMMU",
            Unassigned => "the BAR is not assigned (resource table)",
            NotMappable => "the region is empty or not mappable",
            TooManyMaps => "too many BARs mapped at once to guard this one",
            UnknownApi => "unknown VFIO API version",
            NoType1 => "no type1 IOMMU backend; modprobe vfio_iommu_type1",
            NotViable => "its IOMMU group is not viable: bind every device in it to vfio-pci",
            Os { step, err } => return os_failure(f, step, err),
        })
    }
}

/// An OS error during a mapping, with the one fix that fits its step.
fn os_failure(
    f: &mut std::fmt::Formatter<'_>,
    step: &MapStep,
    err: &std::io::Error,
) -> std::fmt::Result {
    match (step, err.raw_os_error()) {
        (MapStep::MmapResource { .. }, Some(libc::EPERM)) => {
            f.write_str("refused by kernel lockdown (LOCKDOWN_PCI_ACCESS); use --access vfio")
        }
        (MapStep::MmapResource { len, .. }, Some(libc::EINVAL)) => write!(
            f,
            "mmap of {len} bytes refused (EINVAL): a driver claimed the region exclusively (iomem=strict) or the size does not fit the BAR; bind the device to vfio-pci with no VM holding it, or use --access vfio"
        ),
        (MapStep::DupGroup, _) => write!(f, "duplicating the held group: {err}"),
        (MapStep::OpenGroup(p), _) => write!(
            f,
            "open {}: {err} (EBUSY: someone else holds the group)",
            p.display()
        ),
        (MapStep::OpenContainer, _) => {
            write!(f, "open /dev/vfio/vfio: {err} (is the vfio module loaded?)")
        }
        (MapStep::OpenResource(p), _) => write!(f, "open {}: {err}", p.display()),
        (MapStep::MmapResource { path, .. }, _) => write!(f, "mmap {}: {err}", path.display()),
        (MapStep::MmapRegion, _) => write!(f, "mmap: {err}"),
        (MapStep::Ioctl(name), _) => write!(f, "{name}: {err}"),
    }
}
