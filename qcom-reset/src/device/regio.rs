//! Register access behind one trait, so the reset sequences run unchanged against a mapped BAR,
//! the VFIO region, the firmware simulator, or nothing at all (dry run).
use std::time::Duration;

use serde::Serialize;

/// One register operation, as recorded by [`Recorder`] and printed by `--dry-run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// A read and what it gave.
    Read {
        /// The register.
        offset: u32,
        /// The value read.
        value: u32,
    },
    /// A write.
    Write {
        /// The register.
        offset: u32,
        /// The value written.
        value: u32,
    },
    /// A delay.
    Delay {
        /// How long, in ms.
        ms: u64,
    },
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
    /// Reads a 32-bit register.
    fn read32(&mut self, offset: u32) -> u32;
    /// Writes a 32-bit register.
    fn write32(&mut self, offset: u32, value: u32);
    /// Waits `d` (the sequence's own delays).
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
        (**self).write32(offset, value);
    }
    fn delay(&mut self, d: Duration) {
        (**self).delay(d);
    }
    fn revoked(&self) -> bool {
        (**self).revoked()
    }
}

/// Wraps any [`RegisterIo`] and keeps the ordered list of operations.
pub struct Recorder<I> {
    /// The wrapped access.
    pub inner: I,
    /// Every operation, in order.
    pub ops: Vec<Op>,
}

impl<I: RegisterIo> Recorder<I> {
    /// Wraps `inner` with an empty list.
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
    /// What a read of each register returns.
    pub assumed: fn(u32) -> u32,
}

impl RegisterIo for DryRun {
    fn read32(&mut self, offset: u32) -> u32 {
        (self.assumed)(offset)
    }
    fn write32(&mut self, _offset: u32, _value: u32) {}
    fn delay(&mut self, _d: Duration) {}
}
