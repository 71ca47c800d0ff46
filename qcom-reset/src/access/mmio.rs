//! A BAR mapped into this process: the one place the tool touches device memory directly.
use std::time::Duration;

use super::revoke;
use crate::device::regio::RegisterIo;

/// A memory-mapped BAR (sysfs `resourceN` or a VFIO region).
pub struct MmioBar {
    // Dropped before the mapping: a fault is ours only while the mapping exists.
    registration: revoke::Registration,
    map: memmap2::MmapRaw,
}

impl MmioBar {
    /// None when the mapping cannot be protected against revocation (every slot in use).
    pub fn new(map: memmap2::MmapRaw) -> Option<Self> {
        let registration = revoke::register(map.as_mut_ptr(), map.len())?;
        Some(MmioBar { registration, map })
    }

    fn ptr(&self, offset: u32) -> Option<*mut u32> {
        let off = offset as usize;
        (off.is_multiple_of(4) && off + 4 <= self.map.len())
            // SAFETY: `off + 4` is within the mapping (checked above), so the pointer stays in
            // the one allocation `map` owns.
            .then(|| unsafe { self.map.as_mut_ptr().add(off).cast::<u32>() })
    }
}

impl RegisterIo for MmioBar {
    fn read32(&mut self, offset: u32) -> u32 {
        // Out-of-range reads look like a dead link, the one answer the sequences already handle;
        // the session checks the BAR size against the sequence before mapping, so this is a guard.
        match self.ptr(offset) {
            // SAFETY: `p` is 4-aligned and inside the live mapping (`ptr`); the mapping is MMIO,
            // read once, volatile; a revoked page reads all-ones instead of faulting (`revoke`).
            Some(p) => u32::from_le(unsafe { std::ptr::read_volatile(p) }),
            None => crate::device::regs::ALL_ONES,
        }
    }
    fn write32(&mut self, offset: u32, value: u32) {
        if let Some(p) = self.ptr(offset) {
            // SAFETY: as for `read32`; the session checked ownership before this write.
            unsafe { std::ptr::write_volatile(p, value.to_le()) }
        }
    }
    fn delay(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
    fn revoked(&self) -> bool {
        self.registration.revoked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::regio::Recorder;

    /// A BAR mapping the kernel takes away (here: its file truncated, the same SIGBUS) reads
    /// all-ones and says it was revoked, through every wrapper a session puts around it.
    #[test]
    fn a_revoked_mmio_bar_reads_all_ones_and_says_so_through_its_wrappers() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let map = memmap2::MmapOptions::new()
            .len(8192)
            .map_raw(&file)
            .unwrap();
        let bar: Box<dyn RegisterIo> = Box::new(MmioBar::new(map).unwrap());
        let mut io = Recorder::new(bar);
        io.write32(4096, 0x1234_5678);
        assert_eq!(io.read32(4096), 0x1234_5678);
        assert!(!io.revoked() && !io.inner.revoked());
        file.set_len(0).unwrap();
        assert_eq!(io.read32(4096), crate::device::regs::ALL_ONES);
        assert!(io.revoked() && io.inner.revoked());
    }
}
