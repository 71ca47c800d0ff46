//! The paths between an event and a written register: decoding a ring-buffer record, judging
//! registers, running a whole sequence against the simulator (delays are virtual, so this is the
//! engine's own cost), a whole session on a fake host (`session`: inspect, lock, own, record,
//! save, sequence, verify, restore; every wait virtual, so what is left is qcom-reset's own
//! share of a reset), and the holder scan of /proc that precedes every write; and the start-up
//! path (`startup`): parsing this host's vmlinux BTF and resolving the struct layouts.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use qcom_reset::device::Family;
use qcom_reset::device::regio::Recorder;
use qcom_reset::device::sequence;
use qcom_reset::device::verdict::{self, Expect, Registers};
use qcom_reset::probes::events;
use qcom_reset::sim::{Faults, Model, SimDevice, SimState};
use qcom_reset_ebpf::{EVENT_ABI_VERSION, Event, EventKind, Flavour, Func};

fn record() -> Vec<u8> {
    let mut b = vec![0u8; size_of::<Event>()];
    b[..4].copy_from_slice(&[
        EVENT_ABI_VERSION,
        EventKind::Release as u8,
        Flavour::Kprobe as u8,
        Func::VfioPciCoreDisable as u8,
    ]);
    b[4] = 1; // needs_reset
    let at = std::mem::offset_of!(Event, bdf);
    b[at..at + 12].copy_from_slice(b"0000:03:00.0");
    b
}

fn benches(c: &mut Criterion) {
    let rec = record();
    c.bench_function("decode a release record", |b| {
        b.iter(|| events::decode(black_box(&rec)).unwrap());
    });

    let regs = Registers {
        config_vendor: 0x17cb,
        config_device: 0x1103,
        mhictrl: Some(0),
        mhistatus: Some(0x0101),
        bhioff: Some(0x100),
        execenv: Some(0),
    };
    let expect = |family| Expect {
        family,
        vendor: 0x17cb,
        device: 0x1103,
        after_our_reset: true,
    };
    c.bench_function("judge registers", |b| {
        b.iter(|| verdict::judge(&expect(Family::Wlan), black_box(&regs)));
    });

    for family in [Family::Wlan, Family::Modem] {
        c.bench_function(
            &format!("{} sequence + verify on the simulator", family.name()),
            |b| {
                b.iter(|| {
                    // Config space kept across the link drop: the sequence and verification
                    // themselves are measured, not the engine's header repair.
                    let mut model =
                        Model::new(family, 0x17cb, 0x1103, SimState::Crashed, Faults::default());
                    model.link_drop = qcom_reset::sim::LinkDrop::KeepsConfig;
                    let mut dev = SimDevice::new(model);
                    qcom_reset::access::Backend::config_write16(&mut dev, 4, 2).unwrap();
                    let mut io = Recorder::new(verdict::FixedIds(dev.clone(), (0x17cb, 0x1103)));
                    sequence::run(family, &mut io, &mut |_| {});
                    verdict::verify(&expect(family), &mut io, 1 << 20)
                });
            },
        );
    }

    // The fake host's sysfs and run directory live in a temporary directory (tmpfs or disk,
    // as the machine has it), the card is the in-process simulator.
    let h = common::FakeHost::new();
    h.add(common::FakeDevice::default());
    let wlan = common::bdf("0000:03:00.0");
    c.bench_function("session: a whole WLAN reset on a fake host", |b| {
        b.iter(|| {
            let card = common::sim(Family::Wlan, Faults::default());
            let r = common::reset_with(&h, &qcom_reset::session::Request::new(wlan), &card);
            assert!(r.is_ok());
        });
    });

    let paths = vec![PathBuf::from("/dev/vfio/999")];
    c.bench_function("holder scan of this host's /proc", |b| {
        b.iter(|| qcom_reset::host::holders::find(Path::new("/proc"), black_box(&paths), None));
    });
}

/// Start-up: what load + attach spends before the first program reaches the verifier.
fn startup(c: &mut Criterion) {
    let vmlinux = Path::new(qcom_reset::probes::layout::VMLINUX_BTF);
    if !vmlinux.exists() {
        eprintln!("startup benches skipped: no {}", vmlinux.display());
        return;
    }
    let mut g = c.benchmark_group("startup");
    g.sample_size(10);
    g.bench_function("parse vmlinux BTF (btf-rs)", |b| {
        b.iter(|| qcom_reset::probes::layout::load_vmlinux(black_box(vmlinux)).unwrap());
    });
    g.bench_function("parse vmlinux BTF (btf-rs, mmap backend)", |b| {
        b.iter(|| {
            let btf =
                btf_rs::Btf::from_file_with_backend(black_box(vmlinux), btf_rs::Backend::Mmap)
                    .unwrap();
            qcom_reset::probes::layout::pci_dev(&btf).unwrap()
        });
    });
    g.bench_function("parse vmlinux BTF (aya)", |b| {
        b.iter(|| aya::Btf::from_sys_fs().unwrap());
    });
    let btf = qcom_reset::probes::layout::load_vmlinux(vmlinux).unwrap();
    g.bench_function("resolve struct pci_dev offsets", |b| {
        b.iter(|| qcom_reset::probes::layout::pci_dev(black_box(&btf)).unwrap());
    });
    g.finish();
}

criterion_group!(hot_paths, benches, startup);
criterion_main!(hot_paths);
