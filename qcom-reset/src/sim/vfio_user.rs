//! Serves a [`Model`] as a vfio-user PCI function (rust-vmm's `vfio_user` server), the device
//! QEMU's `vfio-user-pci` client puts on a guest's bus. Unlike the ivshmem stand-in, every access
//! reaches the model: config space is the simulator's (its IDs, read-only bits and reset values;
//! all-ones while the link is down), BAR0 is the card's register BAR at its real size, and a
//! reset QEMU passes on (the guest's bus reset of the port above it, a system reset) arrives as
//! `VFIO_USER_DEVICE_RESET`: config space resets, the firmware does not, as on the real parts.
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, vfio_region_info,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

use super::model::Model;
use crate::device::regs::MHISTATUS;

/// PCI Express config space: the extended space reads as zero (no extended capabilities).
const CONFIG_SIZE: u64 = 4096;

/// A reset that reached the card from outside the register BAR.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReset {
    /// When, in µs of simulated time.
    pub at_us: u64,
    /// What carried it: `device-reset` (VFIO_USER_DEVICE_RESET: a bus reset above the card,
    /// or a system reset).
    pub via: &'static str,
}

/// The model and its clock, shared by the server thread and the reporter.
pub struct Card {
    model: Mutex<Model>,
    /// Bumped by every access: the reporter rebuilds its report only when this moved (a
    /// report per 5 ms of nine cards' growing write logs took host CPU from the guest's vCPUs).
    accesses: std::sync::atomic::AtomicU64,
    start: Instant,
    bar_len: u64,
    resets: Mutex<Vec<KernelReset>>,
}

/// The shared-memory server's report, with what only a whole PCI function can see.
#[derive(Serialize)]
pub struct Report<'a> {
    /// What the card saw.
    #[serde(flatten)]
    pub card: super::shm::Report<'a>,
    /// Config-space writes received (the guest's restores, QEMU's BAR programming).
    pub config_writes: usize,
    /// Resets the kernel or QEMU delivered: config space went back to reset values, the
    /// firmware state did not.
    pub kernel_resets: Vec<KernelReset>,
    /// The card's power-state changes (runtime PM's D3hot while idle, the wake-ups).
    pub power: &'a [super::model::PowerChange],
    /// Device Control as the card holds it now: what the last restore left.
    pub devctl: u16,
}

impl Card {
    /// A card playing `model`.
    pub fn new(mut model: Model) -> Arc<Card> {
        // QEMU keeps the BAR registers itself and maps BAR0 where the guest put it.
        model.cfg.bars_emulated();
        Arc::new(Card {
            bar_len: super::bar_len(model.family),
            model: Mutex::new(model),
            accesses: std::sync::atomic::AtomicU64::new(0),
            start: Instant::now(),
            resets: Mutex::new(Vec::new()),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The model, for an access (counted).
    fn model(&self) -> MutexGuard<'_, Model> {
        self.accesses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.quiet_model()
    }

    fn quiet_model(&self) -> MutexGuard<'_, Model> {
        self.model
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The report as of now.
    pub fn report(&self) -> serde_json::Value {
        let now = self.now();
        let mut m = self.quiet_model();
        let mhistatus = m.read32(now, MHISTATUS);
        let r = Report {
            card: super::shm::Report {
                family: m.family.name(),
                resets: m.resets,
                missed: m.missed,
                writes: &m.writes,
                conformance: m.conformance(),
                mhistatus,
                link_up: m.link_up(now),
                beyond_model: &m.beyond,
                reset_floor_us: m.reset_floor().as_micros() as u64,
            },
            config_writes: m.config_writes,
            kernel_resets: self.resets.lock().map(|r| r.clone()).unwrap_or_default(),
            power: &m.power,
            devctl: m.cfg.read16(super::config::DEVCTL),
        };
        serde_json::to_value(r).expect("the report serializes")
    }

    /// Config bytes at `offset`, as 16-bit reads of the model (all-ones while the link is down).
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let now = self.now();
        let mut m = self.model();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let word = m.config_read16(now, config_offset(at & !1));
            *b = word.to_le_bytes()[(at & 1) as usize];
        }
    }

    /// Config writes as 16-bit writes: a byte write keeps the other byte of its word.
    fn config_write(&self, offset: u64, data: &[u8]) {
        let now = self.now();
        let mut m = self.model();
        let mut at = offset;
        let mut rest = data;
        while let Some((&first, tail)) = rest.split_first() {
            let word_at = at & !1;
            let mut bytes = m.cfg.read16(word_at as u16).to_le_bytes();
            bytes[(at & 1) as usize] = first;
            rest = tail;
            if at & 1 == 0
                && let Some((&second, tail)) = rest.split_first()
            {
                bytes[1] = second;
                rest = tail;
                at += 1;
            }
            m.config_write16(now, config_offset(word_at), u16::from_le_bytes(bytes));
            at += 1;
        }
    }

    /// BAR0 reads as the model's 32-bit registers; narrower or wider accesses take their part.
    fn bar_read(&self, offset: u64, data: &mut [u8]) {
        let now = self.now();
        let mut m = self.model();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let reg = m.read32(now, (at & !3) as u32);
            *b = reg.to_le_bytes()[(at & 3) as usize];
        }
    }

    /// BAR0 writes: the drivers and qcom-reset write whole 32-bit registers; anything else is
    /// merged into the register it lands in.
    fn bar_write(&self, offset: u64, data: &[u8]) {
        let now = self.now();
        let mut m = self.model();
        if data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes(data.try_into().expect("four bytes"));
            m.write32(now, offset as u32, v);
            return;
        }
        let reg_at = (offset & !3) as u32;
        let mut bytes = m.read32(now, reg_at).to_le_bytes();
        for (i, b) in data.iter().enumerate().take(4 - (offset & 3) as usize) {
            bytes[(offset & 3) as usize + i] = *b;
        }
        m.write32(now, reg_at, u32::from_le_bytes(bytes));
    }
}

/// The server's side of the protocol: what the `vfio_user` crate calls per message.
struct Backend(Arc<Card>);

fn out_of_range() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX if end <= CONFIG_SIZE => self.0.config_read(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX if end <= self.0.bar_len => self.0.bar_read(offset, data),
            _ => return Err(out_of_range()),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX if end <= CONFIG_SIZE => self.0.config_write(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX if end <= self.0.bar_len => self.0.bar_write(offset, data),
            _ => return Err(out_of_range()),
        }
        Ok(())
    }

    /// The card does no DMA in the model: mappings are accepted and unused.
    fn dma_map(
        &mut self,
        _: DmaMapFlags,
        _: u64,
        _: u64,
        _: u64,
        _: Option<File>,
    ) -> std::io::Result<()> {
        Ok(())
    }

    fn dma_unmap(&mut self, _: DmaUnmapFlags, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        let now = self.0.now();
        self.0.model().kernel_reset(now);
        if let Ok(mut r) = self.0.resets.lock() {
            r.push(KernelReset {
                at_us: now,
                via: "device-reset",
            });
        }
        Ok(())
    }

    /// Interrupts are never raised by the model; QEMU's eventfds are accepted.
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: Vec<File>) -> std::io::Result<()> {
        Ok(())
    }
}

/// The nine PCI regions: config space and BAR0 are the card's, the rest are absent.
fn regions(bar_len: u64) -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE,
                VFIO_PCI_BAR0_REGION_INDEX => bar_len,
                _ => 0,
            };
            let flags = if size == 0 {
                0
            } else {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// INTx and one MSI vector, as the card's config space advertises.
fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: u32::from(index == VFIO_PCI_INTX_IRQ_INDEX || index == VFIO_PCI_MSI_IRQ_INDEX),
        })
        .collect()
}

/// Serves `card` on the socket `path` to one client (QEMU), rewriting the JSON `report` when
/// something changes, until the client goes or `stop` returns true.
pub fn serve(
    path: &Path,
    card: Arc<Card>,
    report: &Path,
    stop: &'static (dyn Fn() -> bool + Sync),
) -> anyhow::Result<()> {
    let server = Server::new(path, true, irqs(), regions(card.bar_len))
        .map_err(|e| anyhow::anyhow!("vfio-user socket {}: {e}", path.display()))?;
    let reporter = {
        let (card, report) = (card.clone(), report.to_path_buf());
        std::thread::spawn(move || write_reports(&card, &report, stop))
    };
    let served = server.run(&mut Backend(card.clone()));
    write_report(&card, report)?;
    drop(reporter); // detached: it stops with the process
    served.map_err(|e| anyhow::anyhow!("vfio-user: {e}"))
}

fn write_reports(card: &Card, report: &Path, stop: &dyn Fn() -> bool) {
    let mut seen = None;
    loop {
        // The last report is written at the stop whatever changed: the model's state moves
        // with time too (a link coming back), and the stop is when the report is read.
        let stopping = stop();
        let n = card.accesses.load(std::sync::atomic::Ordering::Relaxed);
        if seen != Some(n) || stopping {
            if let Err(e) = store(report, &card.report()) {
                eprintln!("qcom-reset-sim: report {}: {e}", report.display());
            }
            seen = Some(n);
        }
        if stopping {
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn write_report(card: &Card, report: &Path) -> anyhow::Result<()> {
    store(report, &card.report())
}

fn store(report: &Path, r: &serde_json::Value) -> anyhow::Result<()> {
    // The reporter and the server's last word may store at once: one temporary file, one at a
    // time (a rename of the other's already renamed file fails with ENOENT).
    static STORING: Mutex<()> = Mutex::new(());
    let _one = STORING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let tmp = report.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)?;
    std::fs::rename(&tmp, report)?;
    Ok(())
}

/// A client's config offset as the model's: past the 4 KiB of config space (or past 64 KiB)
/// reads the model's out-of-range answer.
fn config_offset(at: u64) -> u16 {
    u16::try_from(at).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Family;
    use crate::sim::SimState;
    use crate::sim::model::Faults;

    fn card(family: Family, device: u16) -> Arc<Card> {
        Card::new(Model::new(
            family,
            0x17cb,
            device,
            SimState::Mission,
            Faults::default(),
        ))
    }

    #[test]
    fn config_space_is_the_cards_in_every_access_width() {
        let c = card(Family::Wlan, 0x1103);
        let mut b = Backend(c.clone());
        let mut id = [0u8; 4];
        b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
            .unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x1103_17cb);
        let mut one = [0u8; 1];
        b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 1, &mut one)
            .unwrap();
        assert_eq!(one, [0x17]);
        // A byte write to the interrupt line keeps the read-only pin beside it.
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x3c, &[0x0a])
            .unwrap();
        assert_eq!(c.model().cfg.read16(0x3c), 0x010a);
        // A 32-bit write covers two words.
        b.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            0x10,
            &0xfe40_0004u32.to_le_bytes(),
        )
        .unwrap();
        assert_eq!(c.model().cfg.read16(0x12), 0xfe40);
        assert!(
            b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 4095, &mut id)
                .is_err()
        );
    }

    #[test]
    fn bar0_reaches_the_model_only_while_it_decodes() {
        let c = card(Family::Modem, 0x0308);
        let mut b = Backend(c.clone());
        let mut v = [0u8; 4];
        // Enumeration left BAR0 assigned; vfio-pci's release left decoding off.
        b.region_read(VFIO_PCI_BAR0_REGION_INDEX, 0, &mut v)
            .unwrap();
        assert_eq!(v, [0xff; 4], "no memory decoding: all-ones");
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &[0x02, 0x04])
            .unwrap();
        b.region_read(VFIO_PCI_BAR0_REGION_INDEX, 0, &mut v)
            .unwrap();
        assert_eq!(u32::from_le_bytes(v), 0x1000, "MHIREGLEN");
        let mut half = [0u8; 2];
        b.region_read(VFIO_PCI_BAR0_REGION_INDEX, 2, &mut half)
            .unwrap();
        assert_eq!(half, [0, 0], "the upper half of MHIREGLEN");
        assert!(
            b.region_read(VFIO_PCI_BAR0_REGION_INDEX, 4096, &mut v)
                .is_err()
        );
    }

    #[test]
    fn a_device_reset_resets_config_space_but_not_the_firmware() {
        let c = card(Family::Wlan, 0x1103);
        let mut b = Backend(c.clone());
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &[0x06, 0x04])
            .unwrap();
        let before = c.report()["mhistatus"].clone();
        b.reset().unwrap();
        let m = c.model();
        assert_eq!((m.cfg.command(), m.cfg.read16(0x12)), (0, 0));
        drop(m);
        let r = c.report();
        assert_eq!(r["kernel_resets"][0]["via"], "device-reset");
        assert_eq!(r["resets"], 0, "no SoC reboot");
        // Decoding is off after the reset, so MHISTATUS reads all-ones; turn it back on to see
        // the firmware's state unchanged.
        b.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            0x10,
            &0xfe00_0004u32.to_le_bytes(),
        )
        .unwrap();
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &[0x02, 0x04])
            .unwrap();
        assert_eq!(c.report()["mhistatus"], before);
    }

    #[test]
    fn runtime_pm_d3hot_and_the_wake_up_are_reported_and_d3hot_answers_config_only() {
        let c = card(Family::Modem, 0x0308);
        let mut b = Backend(c.clone());
        let pmcsr = u64::from(crate::sim::config::PM_CAP + 4);
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &[0x02, 0x04])
            .unwrap();
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, pmcsr, &[0x03, 0x00])
            .unwrap();
        assert_eq!(c.report()["mhistatus"], 0xffff_ffffu32, "D3hot: no MMIO");
        let mut id = [0u8; 2];
        b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
            .unwrap();
        assert_eq!(u16::from_le_bytes(id), 0x17cb, "config still answers");
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, pmcsr, &[0x00])
            .unwrap();
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, pmcsr, &[0x00])
            .unwrap();
        let r = c.report();
        let states: Vec<(u64, u64)> = r["power"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["from"].as_u64().unwrap(), p["to"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            states,
            [(0, 3), (3, 0)],
            "a write that changes nothing is no change"
        );
        assert_ne!(
            r["mhistatus"], 0xffff_ffffu32,
            "back in D0 with its state (NoSoftRst+)"
        );
    }
}
