//! The kernel's uevents, the agent's only source of news besides the ring buffer, so an idle
//! agent never polls: a device bound to vfio-pci (reset before the first VM opens it; the modems
//! fail their first VM boot otherwise) and the vfio_pci_core module appearing or going away (the
//! VFIO probes are attached, and re-attached after an unload and reload).
use std::os::fd::OwnedFd;

use rustix::net::{
    AddressFamily, RecvFlags, SocketFlags, SocketType, bind, netlink, recv, socket_with,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::bdf::Bdf;

/// The kernel's uevent multicast group (udev listens on the same one).
const KERNEL_GROUP: u32 = 1;

/// What a kernel uevent means to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uevent {
    /// A PCI device was bound to vfio-pci.
    VfioBind(Bdf),
    /// A module was loaded (its sysfs and BTF exist by now).
    ModuleAdded(String),
    /// A module was unloaded.
    ModuleRemoved(String),
    /// The socket overflowed (ENOBUFS): some uevents were lost; state must be re-checked.
    Lost,
}

/// What a kernel uevent message means to us, if anything.
pub fn parse(msg: &[u8]) -> Option<Uevent> {
    let header = std::str::from_utf8(msg.split(|b| *b == 0).next()?).ok()?;
    let module = |prefix: &str| header.strip_prefix(prefix).map(str::to_string);
    if let Some(m) = module("add@/module/") {
        return Some(Uevent::ModuleAdded(m));
    }
    if let Some(m) = module("remove@/module/") {
        return Some(Uevent::ModuleRemoved(m));
    }
    vfio_bind(msg).map(Uevent::VfioBind)
}

/// The device a kernel uevent announces as bound to vfio-pci, if that is what it says.
fn vfio_bind(msg: &[u8]) -> Option<Bdf> {
    let mut fields = msg
        .split(|b| *b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok());
    // The header ("bind@/devices/...") is followed by KEY=VALUE fields.
    let header = fields.next()?;
    if !header.starts_with("bind@") {
        return None;
    }
    let (mut pci, mut vfio, mut slot) = (false, false, None);
    for f in fields {
        match f.split_once('=') {
            Some(("SUBSYSTEM", v)) => pci = v == "pci",
            Some(("DRIVER", v)) => vfio = v == "vfio-pci",
            Some(("PCI_SLOT_NAME", v)) => slot = v.parse().ok(),
            _ => {}
        }
    }
    slot.filter(|_| pci && vfio)
}

/// The kernel uevent socket.
pub struct Uevents {
    fd: AsyncFd<OwnedFd>,
}

impl Uevents {
    /// Joins the kernel's uevent group. The kernel delivers uevents only to network namespaces
    /// owned by the initial user namespace (not to a rootless container).
    pub fn open() -> std::io::Result<Uevents> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        bind(&fd, &netlink::SocketAddrNetlink::new(0, KERNEL_GROUP))?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged until
        // the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Uevents { fd })
    }

    /// The next uevent that means something to us.
    pub async fn next(&mut self) -> std::io::Result<Uevent> {
        let mut buf = vec![0u8; 8192];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| Ok(recv(fd.get_ref(), &mut buf[..], RecvFlags::empty())?)) {
                Ok(Ok((_, n))) => {
                    if let Some(u) = parse(&buf[..n.min(buf.len())]) {
                        return Ok(u);
                    }
                }
                // A uevent storm overflowed the socket: some are lost (a bound device is then
                // reset at its first release; a module change is caught by the re-check that
                // follows); the watch goes on.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(Uevent::Lost);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(fields: &[&str]) -> Vec<u8> {
        fields.join("\0").into_bytes()
    }

    #[test]
    fn only_a_pci_bind_to_vfio_pci_is_reported() {
        let bind = msg(&[
            "bind@/devices/pci0000:00/0000:00:1c.0/0000:03:00.0",
            "ACTION=bind",
            "DEVPATH=/devices/pci0000:00/0000:00:1c.0/0000:03:00.0",
            "SUBSYSTEM=pci",
            "DRIVER=vfio-pci",
            "PCI_SLOT_NAME=0000:03:00.0",
            "SEQNUM=4242",
        ]);
        assert_eq!(
            parse(&bind),
            Some(Uevent::VfioBind("0000:03:00.0".parse().unwrap()))
        );
        let other_driver = msg(&[
            "bind@/devices/x",
            "SUBSYSTEM=pci",
            "DRIVER=ath11k_pci",
            "PCI_SLOT_NAME=0000:03:00.0",
        ]);
        assert_eq!(vfio_bind(&other_driver), None);
        let unbind = msg(&[
            "unbind@/devices/x",
            "SUBSYSTEM=pci",
            "DRIVER=vfio-pci",
            "PCI_SLOT_NAME=0000:03:00.0",
        ]);
        assert_eq!(vfio_bind(&unbind), None);
        let not_pci = msg(&["bind@/devices/x", "SUBSYSTEM=usb", "DRIVER=vfio-pci"]);
        assert_eq!(vfio_bind(&not_pci), None);
        // udev's re-broadcasts start with "libudev" and are never on the kernel group.
        assert_eq!(vfio_bind(b"libudev\0\xfe\xed"), None);
    }

    #[test]
    fn module_loads_and_unloads_are_reported() {
        let add = msg(&[
            "add@/module/vfio_pci_core",
            "ACTION=add",
            "SUBSYSTEM=module",
        ]);
        assert_eq!(
            parse(&add),
            Some(Uevent::ModuleAdded("vfio_pci_core".into()))
        );
        let rm = msg(&["remove@/module/vfio_pci_core", "ACTION=remove"]);
        assert_eq!(
            parse(&rm),
            Some(Uevent::ModuleRemoved("vfio_pci_core".into()))
        );
        let other = msg(&["add@/devices/virtual/net/tap0", "SUBSYSTEM=net"]);
        assert_eq!(parse(&other), None);
    }
}
