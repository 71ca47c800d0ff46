//! A host of our own for tests: a sysfs tree, /proc and a run directory in a temp dir, and
//! simulated devices behind them. Nothing here ever looks at this machine's own PCI devices.
#![allow(dead_code)] // each test binary uses a different part

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qcom_reset::access::Backend;
use qcom_reset::bdf::Bdf;
use qcom_reset::device::Family;
use qcom_reset::device::regio::RegisterIo;
use qcom_reset::host::Host;
use qcom_reset::host::sysfs::PciSysfs;
use qcom_reset::session::{self, Report, Request};
use qcom_reset::sim::{Faults, Model, SimDevice, SimState};

pub struct FakeHost {
    pub dir: tempfile::TempDir,
    pub host: Host,
}

pub struct FakeDevice<'a> {
    pub bdf: &'a str,
    pub vendor: u16,
    pub device: u16,
    pub driver: Option<&'a str>,
    pub group: Option<&'a str>,
    pub reset_method: Option<&'a str>,
    pub power_state: &'a str,
    pub bar_len: u64,
}

impl Default for FakeDevice<'_> {
    fn default() -> Self {
        FakeDevice {
            bdf: "0000:03:00.0",
            vendor: 0x17cb,
            device: 0x1103,
            driver: Some("vfio-pci"),
            group: Some("12"),
            reset_method: None,
            power_state: "D0",
            bar_len: 2 << 20,
        }
    }
}

impl FakeDevice<'_> {
    /// An SDX65 modem in IOMMU group 13 with its 4 KiB BAR.
    pub fn modem(bdf: &str) -> FakeDevice<'_> {
        FakeDevice {
            bdf,
            device: 0x0308,
            group: Some("13"),
            bar_len: 4096,
            ..Default::default()
        }
    }

    /// An Intel NIC: present, but no target of ours.
    pub fn foreign(bdf: &str) -> FakeDevice<'_> {
        FakeDevice {
            bdf,
            vendor: 0x8086,
            device: 0x1533,
            ..Default::default()
        }
    }
}

impl FakeHost {
    pub fn new() -> FakeHost {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/kernel/iommu_groups",
            "proc",
            "run",
            "dev/vfio",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let host = Host {
            sysfs: PciSysfs {
                root: root.join("sys/bus/pci/devices"),
            },
            dev_vfio: root.join("dev/vfio"),
            proc_root: root.join("proc"),
            run_dir: root.join("run"),
            lock_wait: Duration::from_millis(200),
            open_group: Default::default(),
        };
        FakeHost { dir, host }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn add(&self, d: FakeDevice) -> PathBuf {
        let dev = self.host.sysfs.root.join(d.bdf);
        fs::create_dir_all(dev.join("power")).unwrap();
        fs::write(dev.join("vendor"), format!("0x{:04x}\n", d.vendor)).unwrap();
        fs::write(dev.join("device"), format!("0x{:04x}\n", d.device)).unwrap();
        fs::write(dev.join("power/control"), "auto\n").unwrap();
        fs::write(dev.join("power_state"), format!("{}\n", d.power_state)).unwrap();
        fs::write(dev.join("config"), [0u8; 256]).unwrap();
        fs::write(dev.join("driver_override"), "(null)\n").unwrap();
        let start = 0xfe00_0000u64;
        fs::write(
            dev.join("resource"),
            format!(
                "0x{start:016x} 0x{:016x} 0x0000000000140204\n",
                start + d.bar_len - 1
            ) + &"0x0000000000000000 0x0000000000000000 0x0000000000000000\n".repeat(5),
        )
        .unwrap();
        if let Some(m) = d.reset_method {
            fs::write(dev.join("reset_method"), format!("{m}\n")).unwrap();
            fs::write(dev.join("reset"), "").unwrap();
        }
        if let Some(drv) = d.driver {
            let p = self.root().join("sys/bus/pci/drivers").join(drv);
            fs::create_dir_all(&p).unwrap();
            symlink(&p, dev.join("driver")).unwrap();
        }
        if let Some(g) = d.group {
            let p = self.root().join("sys/kernel/iommu_groups").join(g);
            fs::create_dir_all(&p).unwrap();
            symlink(&p, dev.join("iommu_group")).unwrap();
            // The group node vfio-pci creates (a plain file here: opening it cannot be refused
            // with EBUSY, which the VM lab proves on real kernels).
            if d.driver == Some("vfio-pci") {
                fs::write(self.host.dev_vfio.join(g), "").unwrap();
            }
        }
        dev
    }

    /// A fake process holding `path` open (e.g. QEMU with /dev/vfio/12).
    pub fn hold(&self, pid: u32, comm: &str, path: &str) {
        let p = self.host.proc_root.join(pid.to_string());
        fs::create_dir_all(p.join("fd")).unwrap();
        fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        symlink(path, p.join("fd/7")).unwrap();
    }

    /// The fake process exits.
    pub fn unhold(&self, pid: u32) {
        fs::remove_dir_all(self.host.proc_root.join(pid.to_string())).unwrap();
    }

    pub fn read(&self, bdf: &str, attr: &str) -> String {
        fs::read_to_string(self.host.sysfs.root.join(bdf).join(attr))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// A card whose firmware crashed under the previous owner.
pub fn sim(family: Family, faults: Faults) -> SimDevice {
    sim_in(family, SimState::Crashed, faults)
}

pub fn sim_in(family: Family, state: SimState, faults: Faults) -> SimDevice {
    let device = match family {
        Family::Wlan => 0x1103,
        Family::Modem => 0x0308,
    };
    SimDevice::new(Model::new(family, 0x17cb, device, state, faults))
}

pub fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// Runs a reset against `sim` for the device at `req.bdf`.
pub fn reset_with(h: &FakeHost, req: &Request, sim: &SimDevice) -> qcom_reset::Result<Report> {
    let s = sim.clone();
    session::reset(
        &h.host,
        req,
        &mut move |_, _| Ok(Box::new(s.clone())),
        "simulator",
    )
}

/// What a qcom-reset killed mid-sequence leaves on the WLAN card at `bdf`: its crash record
/// (PCI_COMMAND 0x0400, power/control "auto", plus `config` words), and the device awake with
/// memory decoding on.
pub fn leave_killed_session(h: &FakeHost, bdf_s: &str, card: &SimDevice, config: Vec<(u16, u16)>) {
    let record = qcom_reset::session::record::Record {
        bdf: bdf(bdf_s),
        pid: 4711,
        command: Some(0x0400),
        power_control: Some("auto".into()),
        config,
        port: None,
        driver_override: None,
        // What FakeHost::add's resource table assigns: the record's BARs are still valid.
        bar_starts: vec![0xfe00_0000, 0, 0, 0, 0, 0],
        reset_method: None,
    };
    qcom_reset::session::record::save(&h.host.run_dir, &record).unwrap();
    fs::write(h.host.sysfs.root.join(bdf_s).join("power/control"), "on").unwrap();
    qcom_reset::access::Backend::config_write16(&mut card.clone(), 4, 0x0406).unwrap();
}

/// A simulated device whose config writes and BAR mapping first run a hook (to observe or to
/// change the host at exactly that moment).
pub struct Hooked {
    pub inner: SimDevice,
    pub on_config_write: Box<dyn FnMut() + Send>,
    pub on_map: Box<dyn FnMut() + Send>,
}

impl qcom_reset::access::Backend for Hooked {
    fn name(&self) -> &'static str {
        "hooked"
    }
    fn config_read16(&mut self, offset: u16) -> std::io::Result<u16> {
        self.inner.config_read16(offset)
    }
    fn config_write16(&mut self, offset: u16, value: u16) -> std::io::Result<()> {
        (self.on_config_write)();
        self.inner.config_write16(offset, value)
    }
    fn map_bar(
        &mut self,
        bar: u8,
    ) -> qcom_reset::Result<(Box<dyn qcom_reset::device::regio::RegisterIo>, u64)> {
        (self.on_map)();
        self.inner.map_bar(bar)
    }
}

impl FakeHost {
    /// `d` below the bridge `port`, nested as real sysfs nests them (the power-cycle plan
    /// reads the port from that nesting), with the bus-wide `drivers_autoprobe` on.
    pub fn add_below_port(&self, port: &str, d: FakeDevice) -> PathBuf {
        let real = self.root().join("sys/devices/pci0000:00").join(port);
        fs::create_dir_all(real.join(d.bdf).join("power")).unwrap();
        fs::create_dir_all(real.join("power")).unwrap();
        fs::write(real.join("power/control"), "on\n").unwrap();
        fs::write(real.join("power_state"), "D0\n").unwrap();
        symlink(&real, self.host.sysfs.root.join(port)).unwrap();
        symlink(real.join(d.bdf), self.host.sysfs.root.join(d.bdf)).unwrap();
        fs::write(self.root().join("sys/bus/pci/drivers_autoprobe"), "1\n").unwrap();
        self.add(d)
    }
}

/// The BAR of a card that a host driver takes after `after` register writes.
pub struct HandOver {
    inner: SimDevice,
    writes: usize,
    after: usize,
    take: Option<Box<dyn FnOnce() + Send>>,
}

impl RegisterIo for HandOver {
    fn read32(&mut self, offset: u32) -> u32 {
        self.inner.read32(offset)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        self.inner.write32(offset, value);
        self.writes += 1;
        if self.writes == self.after
            && let Some(t) = self.take.take()
        {
            t();
        }
    }
    fn delay(&mut self, d: Duration) {
        self.inner.delay(d);
    }
}

pub struct HandOverCard {
    pub inner: SimDevice,
    pub take: Option<Box<dyn FnOnce() + Send>>,
    pub taken: Arc<Mutex<bool>>,
    pub config_writes_after: Arc<Mutex<usize>>,
}

impl Backend for HandOverCard {
    fn name(&self) -> &'static str {
        "hand-over"
    }
    fn config_read16(&mut self, o: u16) -> std::io::Result<u16> {
        self.inner.config_read16(o)
    }
    fn config_write16(&mut self, o: u16, v: u16) -> std::io::Result<()> {
        if *self.taken.lock().unwrap() {
            *self.config_writes_after.lock().unwrap() += 1;
        }
        self.inner.config_write16(o, v)
    }
    fn map_bar(&mut self, _bar: u8) -> qcom_reset::Result<(Box<dyn RegisterIo>, u64)> {
        let len = self.inner.map_bar(0)?.1;
        let taken = self.taken.clone();
        let take = self.take.take().unwrap();
        Ok((
            Box::new(HandOver {
                inner: self.inner.clone(),
                writes: 0,
                after: 1,
                take: Some(Box::new(move || {
                    take();
                    *taken.lock().unwrap() = true;
                })),
            }),
            len,
        ))
    }
}

/// What a host driver's bind does to the fake sysfs: the device's `driver` link now names it.
pub fn bind_host_driver(root: &Path, bdf: &str, driver: &str) -> impl FnOnce() + Send + 'static {
    let (root, bdf, driver) = (root.to_path_buf(), bdf.to_string(), driver.to_string());
    move || {
        let link = root.join("sys/bus/pci/devices").join(&bdf).join("driver");
        let drv = root.join("sys/bus/pci/drivers").join(&driver);
        fs::create_dir_all(&drv).unwrap();
        fs::remove_file(&link).unwrap();
        symlink(&drv, &link).unwrap();
    }
}

thread_local!(static LOG: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });

/// tracing's output, kept per thread: tests running at once each read their own.
struct ThreadLog;

impl std::io::Write for ThreadLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.with(|l| l.borrow_mut().extend_from_slice(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends tracing's output (once per test binary) to a buffer per thread: [`this_threads_log`].
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_writer(|| ThreadLog)
        .with_ansi(false)
        .try_init();
}

/// What this thread logged since [`capture_logs`].
pub fn this_threads_log() -> String {
    LOG.with(|l| String::from_utf8_lossy(&l.borrow()).into_owned())
}
