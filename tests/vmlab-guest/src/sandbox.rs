//! `unit-sandbox FILE PROG ARGS...`: runs PROG as systemd would under the shipped unit's
//! `SystemCallFilter=` and `CapabilityBoundingSet=`, which the lab's guest (no systemd) cannot
//! apply itself. FILE, written by `cargo xtask` from dist/qcom-reset.service and the host's
//! `systemd-analyze syscall-filter`, lists `syscall NAME` and `cap CAP_NAME` lines.
//!
//! Stricter than the unit on purpose: a syscall outside the list kills the process
//! (SECCOMP_RET_KILL_PROCESS, logged by the kernel) instead of failing with EPERM, so a scenario
//! cannot pass while the agent quietly depends on a syscall the unit denies.
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::str::FromStr as _;

use anyhow::{Context as _, bail};
use rustix::thread::CapabilitySet;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

struct Sandbox {
    syscalls: Vec<i64>,
    keep: CapabilitySet,
}

fn parse(text: &str) -> anyhow::Result<Sandbox> {
    let mut syscalls = Vec::new();
    let mut keep = CapabilitySet::empty();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_once(' ') {
            // Names of other architectures' syscalls (the groups are arch-independent).
            Some(("syscall", name)) => {
                if let Ok(n) = syscalls::Sysno::from_str(name) {
                    syscalls.push(i64::from(n.id()));
                }
            }
            Some(("cap", name)) => {
                let bare = name.strip_prefix("CAP_").unwrap_or(name);
                keep |= CapabilitySet::from_name(bare)
                    .with_context(|| format!("unknown capability {name}"))?;
            }
            _ => bail!("unit-sandbox: cannot read {line:?}"),
        }
    }
    if syscalls.is_empty() || keep.is_empty() {
        bail!("unit-sandbox: the file lists no syscalls or no capabilities");
    }
    Ok(Sandbox { syscalls, keep })
}

pub fn run(file: &str, prog: &str, args: &[String]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let sandbox = parse(&text)?;
    for cap in CapabilitySet::all().iter() {
        if !sandbox.keep.contains(cap) {
            // Capabilities this kernel does not know are not in its bounding set anyway.
            match rustix::thread::remove_capability_from_bounding_set(cap) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => return Err(e).context("dropping a capability from the bounding set"),
            }
        }
    }
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        sandbox.syscalls.iter().map(|&n| (n, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    let program: BpfProgram = filter.try_into()?;
    // Sets no_new_privs first, as the unit's NoNewPrivileges=yes does.
    seccompiler::apply_filter(&program)?;
    let err = std::process::Command::new(prog)
        .arg0("qcom-reset")
        .args(args)
        .exec();
    Err(err).with_context(|| format!("running {prog}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_become_numbers_and_unknown_lines_are_refused() {
        let s = super::parse("syscall bpf\nsyscall arm_fadvise64_64\ncap CAP_BPF\n").unwrap();
        assert_eq!(s.syscalls, vec![321]);
        assert_eq!(s.keep, rustix::thread::CapabilitySet::BPF);
        assert!(super::parse("syscall bpf\n").is_err());
        assert!(super::parse("syscall bpf\ncap CAP_NOPE\n").is_err());
        assert!(super::parse("allow bpf\ncap CAP_BPF\n").is_err());
    }
}
