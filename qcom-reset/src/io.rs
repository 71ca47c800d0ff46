//! Register access behind one trait, so the reset sequences run unchanged against a mapped BAR,
//! the VFIO region, the firmware simulator, or nothing at all (dry run).
use std::time::Duration;

use serde::Serialize;

pub mod revoke;

/// One register operation, as recorded by [`Recorder`] and printed by `--dry-run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Read { offset: u32, value: u32 },
    Write { offset: u32, value: u32 },
    Delay { ms: u64 },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Read { offset, value } => write!(f, "read  {offset:#06x} -> {value:#010x}"),
            Op::Write { offset, value } => write!(f, "write {offset:#06x} <- {value:#010x}"),
            Op::Delay { ms } => write!(f, "delay {ms} ms"),
        }
    }
}

/// 32-bit register access plus the delays between accesses (virtual in the simulator).
pub trait RegisterIo: Send {
    fn read32(&mut self, offset: u32) -> u32;
    fn write32(&mut self, offset: u32, value: u32);
    fn delay(&mut self, d: Duration);
    /// Whether the kernel took the mapping away (another owner claimed the BAR): every read
    /// since gave all-ones, and no write reached the card ([`revoke`]).
    fn revoked(&self) -> bool {
        false
    }
}

impl RegisterIo for Box<dyn RegisterIo> {
    fn read32(&mut self, offset: u32) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        (**self).write32(offset, value)
    }
    fn delay(&mut self, d: Duration) {
        (**self).delay(d)
    }
    fn revoked(&self) -> bool {
        (**self).revoked()
    }
}

/// Wraps any [`RegisterIo`] and keeps the ordered list of operations.
pub struct Recorder<I> {
    pub inner: I,
    pub ops: Vec<Op>,
}

impl<I: RegisterIo> Recorder<I> {
    pub fn new(inner: I) -> Self {
        Recorder {
            inner,
            ops: Vec::new(),
        }
    }
}

impl<I: RegisterIo> RegisterIo for Recorder<I> {
    fn read32(&mut self, offset: u32) -> u32 {
        let value = self.inner.read32(offset);
        self.ops.push(Op::Read { offset, value });
        value
    }
    fn write32(&mut self, offset: u32, value: u32) {
        self.inner.write32(offset, value);
        self.ops.push(Op::Write { offset, value });
    }
    fn delay(&mut self, d: Duration) {
        self.inner.delay(d);
        self.ops.push(Op::Delay {
            ms: d.as_millis() as u64,
        });
    }
    fn revoked(&self) -> bool {
        self.inner.revoked()
    }
}

/// Touches nothing and does not sleep. Reads return `assumed`, the value a healthy device would
/// give, so the dry run walks the success path and prints every operation it would do.
pub struct DryRun {
    pub assumed: fn(u32) -> u32,
}

impl RegisterIo for DryRun {
    fn read32(&mut self, offset: u32) -> u32 {
        (self.assumed)(offset)
    }
    fn write32(&mut self, _offset: u32, _value: u32) {}
    fn delay(&mut self, _d: Duration) {}
}

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
        // the engine checks the BAR size against the sequence before mapping, so this is a guard.
        match self.ptr(offset) {
            // SAFETY: `p` is 4-aligned and inside the live mapping (`ptr`); the mapping is MMIO,
            // read once, volatile; a revoked page reads all-ones instead of faulting (`revoke`).
            Some(p) => u32::from_le(unsafe { std::ptr::read_volatile(p) }),
            None => crate::regs::ALL_ONES,
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

    /// A BAR mapping the kernel takes away (here: its file truncated, the same SIGBUS) reads
    /// all-ones and says it was revoked, through every wrapper the engine puts around it.
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
        assert_eq!(io.read32(4096), crate::regs::ALL_ONES);
        assert!(io.revoked() && io.inner.revoked());
    }
}
