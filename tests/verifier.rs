//! Every kprobe-flavour program through the running kernel's verifier (root only). This
//! machine's kernel loads kprobe programs even where it cannot attach them; attaching and firing
//! are proved in the VM lab.
use qcom_reset::probes::{Options, Probes};
use qcom_reset_ebpf::Flavour;

#[test]
fn every_kprobe_program_passes_the_verifier() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: loading eBPF programs needs root");
        return;
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("skipped: the running kernel has no BTF");
        return;
    }
    let mut p = Probes::open(&Options {
        trace_all: true,
        ..Default::default()
    })
    .expect("object loads");
    let results = p.verify(Flavour::Kprobe);
    assert_eq!(results.len(), 18, "9 functions x entry/return");
    for (name, r) in &results {
        assert!(r.is_ok(), "{name} rejected: {r:?}");
    }
}

#[test]
fn fentry_programs_load_or_fail_for_a_named_reason() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: loading eBPF programs needs root");
        return;
    }
    let mut p = Probes::open(&Options::default()).expect("object loads");
    let results = p.verify(Flavour::Fentry);
    assert_eq!(results.len(), 14, "7 reset functions x fentry/fexit");
    for (name, r) in results {
        if let Err(e) = r {
            // This machine's kernel refuses tracing programs with EPERM; anything else is a bug.
            assert!(qcom_reset::probes::loader::is_eperm(&e), "{name}: {e}");
            eprintln!("{name}: refused by this kernel ({e})");
        }
    }
}
