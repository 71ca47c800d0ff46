//! Serves a [`Model`] behind a shared-memory file, the backing store of a QEMU ivshmem-plain BAR.
//! The guest's reads see plain memory, so the server republishes every modelled register as the
//! model changes, and learns of guest writes by noticing a writable register that differs from
//! what it last published. Republishing is a compare-and-swap against what the server last saw,
//! so a guest write landing between the two steps of one iteration (a server descheduled for
//! milliseconds on a loaded host) is never overwritten: the next iteration picks it up.
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::conformance::Conformance;
use super::model::{BHI_BASE, Model, WriteRecord};
use crate::device::regs::*;
use crate::pci::*;

const WRITABLE: [u32; 5] = [
    PCIE_SOC_GLOBAL_RESET,
    PCIE_SOC_WAKE,
    MHICTRL,
    MHI_SOC_RESET_REQ,
    BHI_BASE + BHI_INTVEC,
];
const MODELLED: [u32; 10] = [
    MHIREGLEN,
    MHIVER,
    BHIOFF,
    MHICTRL,
    MHISTATUS,
    MHI_SOC_RESET_REQ,
    PCIE_SOC_WAKE,
    PCIE_SOC_GLOBAL_RESET,
    BHI_BASE + BHI_INTVEC,
    BHI_BASE + BHI_EXECENV,
];

/// What the simulated card saw, for the VM lab's checks.
#[derive(Serialize)]
pub struct Report<'a> {
    /// Its family.
    pub family: &'static str,
    /// Resets it acted on.
    pub resets: u32,
    /// Well-formed reset requests the SoC ignored (the `resets-missed` fault).
    pub missed: u32,
    /// Every BAR write.
    pub writes: &'a [WriteRecord],
    /// Whether the writes follow the reviewed sequence.
    pub conformance: Conformance,
    /// MHISTATUS now.
    pub mhistatus: u32,
    /// Whether the link is up now.
    pub link_up: bool,
    /// Offsets read that the model does not know (answered 0), in order.
    pub beyond_model: &'a std::collections::BTreeSet<u32>,
    /// The least a reset following the reviewed sequence can take on this card
    /// ([`Model::reset_floor`](super::model::Model::reset_floor)), for benchmarks.
    pub reset_floor_us: u64,
}

/// Runs until `stop` returns true, rewriting the JSON report at `report` whenever the writes
/// received or the device's state change.
pub fn serve(
    path: &Path,
    size: u64,
    mut model: Model,
    report: &Path,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let regs = Registers::map(path, size)?;
    // The ivshmem BAR is the device's register BAR; its config space is QEMU's, so memory
    // decode is modelled as on and a link drop keeps it.
    model.link_drop = super::model::LinkDrop::KeepsConfig;
    model.cfg.write16(PCI_COMMAND, PCI_COMMAND_MEMORY);
    let start = Instant::now();
    // What the memory holds now counts as published: nothing the guest wrote yet.
    let mut published = MODELLED.map(|off| regs.read(off));
    let mut last_state = None;
    while !stop() {
        let now = start.elapsed().as_micros() as u64;
        regs.take_writes(&mut model, &mut published, now);
        regs.publish(&mut model, &mut published, now);
        let state = (
            model.writes.len(),
            model.read32(now, MHISTATUS),
            model.link_up(now),
        );
        if last_state != Some(state) {
            last_state = Some(state);
            write_report(&model, state.1, state.2, report)?;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// The shared memory, holding the modelled registers at their BAR offsets.
struct Registers(memmap2::MmapRaw);

impl Registers {
    fn map(path: &Path, size: u64) -> anyhow::Result<Registers> {
        let needed = MODELLED.iter().max().expect("registers are modelled") + 4;
        anyhow::ensure!(
            size >= u64::from(needed),
            "the shared memory must be at least {needed:#x} bytes (the register map)"
        );
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        let map = memmap2::MmapOptions::new()
            .len(size as usize)
            .map_raw(&file)?;
        Ok(Registers(map))
    }

    /// A modelled register's cell. The guest side does plain aligned 32-bit accesses through
    /// QEMU.
    fn cell(&self, off: u32) -> &AtomicU32 {
        debug_assert!(MODELLED.contains(&off));
        // SAFETY: every offset passed is a modelled register: a multiple of 4 below `needed`
        // <= the mapping's size (checked in `map`), so the pointer is aligned and inside the
        // mapping, which lives as long as `self`.
        unsafe { AtomicU32::from_ptr(self.0.as_mut_ptr().add(off as usize).cast::<u32>()) }
    }

    fn read(&self, off: u32) -> u32 {
        self.cell(off).load(Ordering::SeqCst)
    }

    /// The guest's writes: a writable register that differs from what was last published.
    fn take_writes(&self, model: &mut Model, published: &mut [u32; 10], now: u64) {
        for off in WRITABLE {
            let cur = self.read(off);
            let i = MODELLED
                .iter()
                .position(|o| *o == off)
                .expect("writable registers are modelled");
            if cur != published[i] {
                model.write32(now, off, cur);
                published[i] = cur;
            }
        }
    }

    /// The model's registers, each only where the guest has not written since it was last
    /// published (that write is taken next time).
    fn publish(&self, model: &mut Model, published: &mut [u32; 10], now: u64) {
        for (i, off) in MODELLED.iter().enumerate() {
            let v = model.read32(now, *off);
            let swapped = self.cell(*off).compare_exchange(
                published[i],
                v,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if swapped.is_ok() {
                published[i] = v;
            }
        }
    }
}

fn write_report(model: &Model, mhistatus: u32, link_up: bool, report: &Path) -> anyhow::Result<()> {
    let r = Report {
        family: model.family.name(),
        resets: model.resets,
        missed: model.missed,
        writes: &model.writes,
        conformance: model.conformance(),
        mhistatus,
        link_up,
        beyond_model: &model.beyond,
        reset_floor_us: model.reset_floor().as_micros() as u64,
    };
    let tmp = report.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&r)?)?;
    std::fs::rename(&tmp, report)?;
    Ok(())
}
