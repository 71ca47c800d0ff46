//! The firmware simulator: [`model::Model`] driven by a virtual clock in-process (tests), or by
//! the wall clock behind a shared-memory BAR served by `qcom-reset-sim` (the VM lab's ivshmem),
//! or as a whole PCI function over vfio-user (feature `vfio-user`, QEMU >= 10.1).
pub mod config;
pub mod conformance;
pub mod model;
pub mod shm;
#[cfg(feature = "vfio-user")]
pub mod vfio_user;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::Error;
use crate::access::Backend;
use crate::device::regio::RegisterIo;
pub use model::{Faults, LinkDrop, Model, SimState};

/// BAR sizes the simulator presents (WCN6855's BAR0 is 2 MiB; SDX modems show 4 KiB).
pub const fn bar_len(family: crate::device::Family) -> u64 {
    family.spec().sim.bar_len
}

struct State {
    model: Model,
    now_us: u64,
    bar_len: u64,
}

/// An in-process simulated PCI function with a virtual clock: delays advance time instantly.
#[derive(Clone)]
pub struct SimDevice {
    state: Arc<Mutex<State>>,
}

impl SimDevice {
    /// A function playing `model`.
    pub fn new(model: Model) -> Self {
        SimDevice {
            state: Arc::new(Mutex::new(State {
                bar_len: bar_len(model.family),
                model,
                now_us: 0,
            })),
        }
    }

    /// The same device with a register BAR of `len` bytes (e.g. a wrong `--bar`).
    pub fn with_bar_len(self, len: u64) -> Self {
        self.lock().bar_len = len;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Inspect the model (for assertions).
    pub fn with_model<R>(&self, f: impl FnOnce(&Model) -> R) -> R {
        f(&self.lock().model)
    }

    /// Changes the card's faults from now on (a card that recovers, or starts failing).
    pub fn set_faults(&self, faults: Faults) {
        self.lock().model.faults = faults;
    }

    /// Whether the device answers on the bus at the current virtual time.
    pub fn link_up_now(&self) -> bool {
        let s = self.lock();
        s.model.link_up(s.now_us)
    }

    /// The virtual time elapsed.
    pub fn elapsed(&self) -> Duration {
        Duration::from_micros(self.lock().now_us)
    }
}

impl Backend for SimDevice {
    fn name(&self) -> &'static str {
        "simulator"
    }
    fn config_read16(&mut self, offset: u16) -> io::Result<u16> {
        let mut s = self.lock();
        let now = s.now_us;
        Ok(s.model.config_read16(now, offset))
    }
    fn config_write16(&mut self, offset: u16, value: u16) -> io::Result<()> {
        let mut s = self.lock();
        let now = s.now_us;
        s.model.config_write16(now, offset, value);
        Ok(())
    }
    fn map_bar(&mut self, _bar: u8) -> Result<(Box<dyn RegisterIo>, u64), Error> {
        let len = self.lock().bar_len;
        Ok((Box::new(self.clone()), len))
    }
}

impl RegisterIo for SimDevice {
    fn read32(&mut self, offset: u32) -> u32 {
        let mut s = self.lock();
        let now = s.now_us;
        s.model.read32(now, offset)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        let mut s = self.lock();
        let now = s.now_us;
        s.model.write32(now, offset, value);
    }
    fn delay(&mut self, d: Duration) {
        self.lock().now_us += d.as_micros() as u64;
    }
}
