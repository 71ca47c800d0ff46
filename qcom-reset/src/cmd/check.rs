//! `qcom-reset check`: one line per preflight check, each failure with its fix (retis/bpftrace
//! style). Tracing needs root, BTF, an attachable probe flavour and a lockdown mode below
//! confidentiality; everything else is reported but does not block it.
use std::path::Path;

use btf_rs::Btf;
use qcom_reset_ebpf::{Flavour, VfioLayout};
use serde::Serialize;

use qcom_reset::access::{LOCKDOWN_PATH, lockdown_mode};
use qcom_reset::device;
use qcom_reset::host::Host;
use qcom_reset::probes::layout::NeedsReset;
use qcom_reset::probes::{self, layout, loader::KPROBE_PMU};
use qcom_reset::session::port::PortState;
use qcom_reset::session::{self, power};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
    Info,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Whether a failure here stops tracing.
    pub blocks_tracing: bool,
}

impl Check {
    fn new(
        name: &'static str,
        level: Level,
        detail: impl Into<String>,
        fix: Option<&str>,
        blocks: bool,
    ) -> Check {
        Check {
            name,
            level,
            detail: detail.into(),
            fix: fix.map(str::to_string),
            blocks_tracing: blocks,
        }
    }

    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Level::Pass, detail, None, false)
    }
    fn warn(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Level::Warn, detail, None, false)
    }
    fn fail(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Level::Fail, detail, None, false)
    }
    fn info(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Level::Info, detail, None, false)
    }
    /// What to do about it.
    fn fix(mut self, fix: &str) -> Check {
        self.fix = Some(fix.to_string());
        self
    }
    /// A failure here stops tracing.
    fn blocking(mut self) -> Check {
        self.blocks_tracing = true;
        self
    }

    pub fn line(&self) -> String {
        let tag = match self.level {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
            Level::Info => "INFO",
        };
        match &self.fix {
            Some(f) => format!("{tag} {:<16} {} (fix: {f})", self.name, self.detail),
            None => format!("{tag} {:<16} {}", self.name, self.detail),
        }
    }
}

/// Whether these checks leave tracing possible.
pub fn tracing_possible(checks: &[Check]) -> bool {
    !checks
        .iter()
        .any(|c| c.blocks_tracing && c.level == Level::Fail)
}

fn kallsyms() -> Option<String> {
    std::fs::read_to_string("/proc/kallsyms").ok()
}

fn has_symbol(kallsyms: &str, sym: &str) -> bool {
    kallsyms
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some(sym))
}

/// (major, minor) of a kernel release string such as "6.1.0-57-amd64".
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Where this kernel's vfio_pci_core is, with its layout when BTF gives one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vfio {
    /// `CONFIG_VFIO_PCI_CORE=y` (Ubuntu/Proxmox style): the struct is in vmlinux BTF.
    BuiltIn(VfioLayout),
    /// The module is loaded; its layout if its BTF parsed.
    Module(Option<VfioLayout>),
    NotLoaded,
}

impl Vfio {
    fn probe(vmlinux: Option<&Btf>) -> Vfio {
        if let Some(l) = vmlinux.and_then(|b| layout::vfio(b).ok()) {
            return Vfio::BuiltIn(l);
        }
        if !Path::new("/sys/module").join(layout::VFIO_MODULE).exists() {
            return Vfio::NotLoaded;
        }
        let module = Path::new("/sys/kernel/btf").join(layout::VFIO_MODULE);
        Vfio::Module(
            vmlinux
                .and_then(|b| layout::load_module(&module, b).ok())
                .and_then(|m| layout::vfio(&m).ok()),
        )
    }

    fn present(self) -> bool {
        self != Vfio::NotLoaded
    }
}

/// The oldest kernel with `vfio_pci_core`, whose open/release the probes bracket.
const OLDEST_SUPPORTED: (u32, u32) = (5, 15);

/// On a kernel before 5.15, the `vfio` failure; `run` and `trace` refuse with it rather than
/// attach nothing.
pub fn kernel_too_old(release: &str) -> Option<Check> {
    kernel_version(release)
        .is_some_and(|v| v < OLDEST_SUPPORTED)
        .then(|| {
            Check::fail("vfio", format!(
                    "kernel {release} has no vfio_pci_core (it arrived in 5.15): releases cannot be seen"
                )).fix("run a 5.15 or newer kernel (e.g. Debian 12's 6.1)").blocking()
        })
}

/// vfio_pci_core: a module (loaded or not), built in, or absent because the kernel predates it.
fn vfio_check(release: &str, vfio: Vfio) -> Check {
    if let Some(old) = kernel_too_old(release) {
        return old;
    }
    match vfio {
        Vfio::Module(_) => Check::pass("vfio", "vfio_pci_core loaded (module)"),
        Vfio::BuiltIn(_) => Check::pass(
            "vfio",
            "vfio_pci_core built into the kernel: its layout comes from vmlinux BTF",
        ),
        Vfio::NotLoaded => Check::warn(
            "vfio",
            "vfio_pci_core not loaded: the release probes attach when it loads",
        )
        .fix("modprobe vfio-pci"),
    }
}

/// Which `needs_reset` the release summary reports (informational: the decision never uses it).
fn needs_reset_check(vfio: Vfio) -> Option<Check> {
    let l = match vfio {
        Vfio::BuiltIn(l) | Vfio::Module(Some(l)) => l,
        Vfio::Module(None) | Vfio::NotLoaded => return None,
    };
    let source = NeedsReset::of(&l);
    let era = match source {
        NeedsReset::Bit { .. } => " (kernels ≈6.5–7.1 without the June 2026 stable fix)",
        _ => "",
    };
    Some(Check::info(
        "needs_reset",
        format!(
            "release summaries read vfio_pci_core_device.needs_reset as {source}{era}; reported only, the decision rests on pci_dev_specific_reset"
        ),
    ))
}

/// Every preflight check, in the order `check` prints them.
pub fn run(host: &Host) -> Vec<Check> {
    let root = rustix::process::geteuid().is_root();
    let btf = Path::new(layout::VMLINUX_BTF);
    let vmlinux = layout::load_vmlinux(btf);
    let btf_check = btf_check(btf, vmlinux.as_ref());
    let btf_ok = btf_check.level == Level::Pass;
    let lockdown = lockdown_mode(Path::new(LOCKDOWN_PATH));
    let kprobes = Path::new(KPROBE_PMU).exists();
    let fentry = fentry_check(root && btf_ok);
    let attach = attach_check(kprobes, fentry.level == Level::Pass);
    let vfio = Vfio::probe(vmlinux.as_ref().ok());
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut out = vec![
        root_check(root),
        btf_check,
        lockdown_check(lockdown.as_deref()),
        kprobes_check(kprobes),
        fentry,
        attach,
        vfio_check(&release, vfio),
    ];
    out.extend(needs_reset_check(vfio));
    out.push(symbols_check(kallsyms().as_deref(), vfio));
    out.extend(device_checks(host, lockdown.as_deref()));
    out
}

fn root_check(root: bool) -> Check {
    if root {
        return Check::pass("root", "running as root").blocking();
    }
    Check::fail(
        "root",
        "not root: loading eBPF and BAR access need CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN",
    )
    .fix("run with sudo")
    .blocking()
}

fn btf_check(btf: &Path, vmlinux: Result<&Btf, &layout::LayoutError>) -> Check {
    let offsets = vmlinux.map(|b| layout::pci_dev(b).map_err(|e| e.to_string()));
    match offsets
        .map_err(std::string::ToString::to_string)
        .and_then(|o| o)
    {
        Ok(l) => Check::pass(
            "btf",
            format!(
                "{} (pci_dev.vendor@{}, dev.kobj.name@{})",
                btf.display(),
                l.vendor,
                l.name
            ),
        )
        .blocking(),
        Err(e) => Check::fail("btf", e.to_string())
            .fix("boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")
            .blocking(),
    }
}

fn lockdown_check(mode: Option<&str>) -> Check {
    match mode {
        Some("confidentiality") => Check::fail(
            "lockdown",
            "lockdown=confidentiality blocks kprobes and bpf_probe_read_kernel",
        )
        .fix("boot with lockdown=integrity or without Secure Boot lockdown")
        .blocking(),
        Some("integrity") => Check::warn(
            "lockdown",
            "lockdown=integrity: tracing works; sysfs BAR mmap and config writes are refused, resets use the VFIO region (--access auto)",
        ),
        Some(m) => Check::pass("lockdown", format!("lockdown={m}")),
        None => Check::warn(
            "lockdown",
            "unknown: securityfs is not mounted, so the lockdown mode cannot be read; resets default to sysfs access",
        )
        .fix("mount -t securityfs securityfs /sys/kernel/security"),
    }
}

/// Kprobes need the kprobe PMU (or tracefs kprobe_events).
fn kprobes_check(kprobes: bool) -> Check {
    if kprobes {
        return Check::pass("kprobes", format!("{KPROBE_PMU} present"));
    }
    Check::fail(
        "kprobes",
        format!(
            "no {KPROBE_PMU}: this kernel was built without CONFIG_KPROBES, kprobes cannot attach"
        ),
    )
    .fix("use a distro kernel (CONFIG_KPROBES=y), or rely on fentry")
}

/// fentry is tried for real through the verifier, since only the kernel knows whether it
/// allows it.
fn fentry_check(can_try: bool) -> Check {
    if !can_try {
        return Check::info("fentry", "not tried (needs root and BTF)");
    }
    let mut p = match probes::Probes::open(&probes::Options::default()) {
        Ok(p) => p,
        Err(e) => return Check::fail("fentry", format!("cannot load the eBPF object: {e:#}")),
    };
    let r = p.verify(Flavour::Fentry);
    match r.iter().find_map(|(name, r)| r.as_ref().err().map(|e| (name, e))) {
        None => Check::pass("fentry", format!("{} fentry/fexit programs load", r.len())),
        Some((name, e)) if probes::loader::is_eperm(e) => Check::fail(
            "fentry",
            format!(
                "the kernel refuses fentry/fexit programs (EPERM loading {name}); kprobes are the only way"
            ),
        )
        .fix("use a kernel that allows BPF tracing programs (no BPF LSM or lockdown denying them)"),
        Some((name, e)) => Check::fail("fentry", format!("{name}: {e}")),
    }
}

fn attach_check(kprobes: bool, fentry: bool) -> Check {
    if kprobes {
        Check::pass("attach", "probes can attach (kprobe flavour available)").blocking()
    } else if fentry {
        Check::pass(
            "attach",
            "probes can attach (fentry only; the VFIO brackets need kprobes)",
        )
        .blocking()
    } else {
        Check::fail(
            "attach",
            "no probe flavour can attach here: no kprobes and fentry refused",
        )
        .fix("run on a kernel with CONFIG_KPROBES=y; `cargo xtask vm-test` proves the probes on Debian kernels")
        .blocking()
    }
}

/// Every probed function in /proc/kallsyms (those of vfio_pci_core only while it is there).
fn symbols_check(kallsyms: Option<&str>, vfio: Vfio) -> Check {
    let Some(k) = kallsyms.filter(|k| {
        k.lines()
            .next()
            .is_some_and(|l| !l.starts_with("0000000000000000"))
    }) else {
        return Check::info(
            "symbols",
            "/proc/kallsyms unreadable or hidden; symbols checked at attach time",
        );
    };
    let missing: Vec<&str> = qcom_reset_ebpf::Func::ALL
        .iter()
        .filter(|f| !f.in_vfio_module() || vfio.present())
        .map(|f| f.symbol())
        .filter(|s| !has_symbol(k, s))
        .collect();
    if missing.is_empty() {
        return Check::pass("symbols", "every probed function is in /proc/kallsyms");
    }
    Check::warn(
        "symbols",
        format!(
            "not in /proc/kallsyms (inlined or absent, those probes are skipped): {}",
            missing.join(" ")
        ),
    )
}

/// One block per target present: what it is, the kernel's regime, its port, its power cycle.
fn device_checks(host: &Host, lockdown: Option<&str>) -> Vec<Check> {
    match session::targets(host, &[]) {
        Ok(ts) if ts.is_empty() => vec![Check::info(
            "devices",
            format!("no target device present ({})", device::profile_names()),
        )],
        Ok(ts) => ts
            .iter()
            .flat_map(|t| {
                let r = t.regime();
                [
                    Check::info("device", device_line(t)),
                    Check::info("regime", format!("{}: {r}: {}", t.bdf, r.meaning())),
                    port_check(t, lockdown),
                    power_cycle_check(host, t),
                ]
            })
            .collect(),
        Err(e) => vec![Check::warn("devices", e.to_string())],
    }
}

fn device_line(t: &session::Target) -> String {
    let methods = match t.reset_methods.as_deref() {
        Some(m) if !m.is_empty() => m.join(" "),
        _ => "none".into(),
    };
    format!(
        "{} {} ({:04x}:{:04x}) driver={} iommu_group={} reset_method={}",
        t.bdf,
        t.profile.name,
        t.vendor,
        t.device,
        t.driver.as_deref().unwrap_or("none"),
        t.iommu_group.as_deref().unwrap_or("none"),
        methods
    )
}

fn power_cycle_check(host: &Host, t: &session::Target) -> Check {
    match power::plan(&host.sysfs, &t.dev, power::Choice::Auto) {
        Ok(p) => Check::info(
            "power-cycle",
            format!(
                "{}: a card off the link can be power-cycled ({:?}, `qcom-reset power-cycle`)",
                t.bdf, p.method
            ),
        ),
        Err(why) => Check::info("power-cycle", format!("{}: {why}", t.bdf)),
    }
}

/// The target's upstream port: what its link drop would trigger, and whether a reset can make
/// that benign here (lockdown refuses the config writes that mask it).
fn port_check(t: &session::Target, lockdown: Option<&str>) -> Check {
    let state = match session::upstream_port(t) {
        Ok(s) => s,
        Err(e) => return Check::warn("port", format!("{}: {e}", t.bdf)),
    };
    port_verdict(t.bdf, &state, lockdown)
}

fn port_verdict(bdf: qcom_reset::bdf::Bdf, state: &PortState, lockdown: Option<&str>) -> Check {
    let line = format!("{bdf}: {}", state.summary());
    let locked = matches!(lockdown, Some("integrity" | "confidentiality"));
    if state.dpc_enabled {
        Check::warn("port", line)
            .fix("set allow_dpc = true to reset anyway (DPC then contains the link drop)")
    } else if state.needs_guard() && locked {
        Check::warn(
            "port",
            format!(
                "{line}; lockdown refuses the config writes that mask them, so resets are refused"
            ),
        )
        .fix("boot without lockdown, or set allow_unguarded_link_drop = true")
    } else {
        Check::info("port", line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_check_names_old_kernels_and_built_in_vfio() {
        let l = VfioLayout {
            valid: 1,
            pdev: 8,
            needs_reset: 100,
            needs_reset_mask: 0x10,
        };
        let old = vfio_check("5.10.0-33-amd64", Vfio::Module(None));
        assert_eq!(old.level, Level::Fail);
        assert!(
            old.detail.contains("5.15") && old.blocks_tracing,
            "{}",
            old.detail
        );
        assert_eq!(kernel_version("6.8.12-4-pve"), Some((6, 8)));
        assert!(kernel_too_old("5.14.21").is_some());
        assert!(kernel_too_old("5.15.0-91-generic").is_none());
        let builtin = vfio_check("6.8.12-4-pve", Vfio::BuiltIn(l));
        assert!(
            builtin.detail.contains("built into the kernel") && builtin.level == Level::Pass,
            "{}",
            builtin.detail
        );
        assert_eq!(
            vfio_check("6.1.0-57-amd64", Vfio::Module(Some(l))).level,
            Level::Pass
        );
        assert_eq!(
            vfio_check("7.2.13+deb14-amd64", Vfio::NotLoaded).level,
            Level::Warn
        );
        assert!(!Vfio::NotLoaded.present() && Vfio::Module(None).present());
    }

    #[test]
    fn check_says_which_needs_reset_the_summary_reads() {
        let l = |needs_reset, needs_reset_mask| VfioLayout {
            valid: 1,
            pdev: 8,
            needs_reset,
            needs_reset_mask,
        };
        let bit = needs_reset_check(Vfio::BuiltIn(l(1100, 0x10))).unwrap();
        assert!(
            bit.detail.contains("bit 4 of byte 1100") && bit.detail.contains("6.5"),
            "{}",
            bit.detail
        );
        let plain = needs_reset_check(Vfio::Module(Some(l(1100, 0xff)))).unwrap();
        assert!(
            plain.detail.contains("a bool at byte 1100"),
            "{}",
            plain.detail
        );
        let gone = needs_reset_check(Vfio::Module(Some(l(qcom_reset_ebpf::OFFSET_MISSING, 0))));
        assert!(gone.unwrap().detail.contains("unknown"));
        assert!(needs_reset_check(Vfio::NotLoaded).is_none());
        assert!(needs_reset_check(Vfio::Module(None)).is_none());
    }

    #[test]
    fn port_check_warns_where_a_reset_would_be_refused() {
        let bdf: qcom_reset::bdf::Bdf = "0000:03:00.0".parse().unwrap();
        let port = Some("0000:00:1c.0".parse().unwrap());
        let guarded = PortState {
            port,
            slot_control: Some(0x1038),
            hotplug_events: true,
            ..Default::default()
        };
        assert_eq!(port_verdict(bdf, &guarded, Some("none")).level, Level::Info);
        let c = port_verdict(bdf, &guarded, Some("integrity"));
        assert!(
            c.level == Level::Warn && c.fix.as_deref().unwrap().contains("allow_unguarded"),
            "{}",
            c.line()
        );
        let dpc = PortState {
            port,
            dpc_enabled: true,
            ..Default::default()
        };
        assert!(port_verdict(bdf, &dpc, None).line().contains("allow_dpc"));
        let root = port_verdict(bdf, &PortState::default(), Some("integrity"));
        assert!(root.level == Level::Info && root.detail.contains("root bus"));
    }

    #[test]
    fn kallsyms_lookup_matches_whole_names() {
        let k = "ffffffff81000000 T pci_reset_function\nffffffff81000010 T __pci_reset_function_locked\n";
        assert!(has_symbol(k, "pci_reset_function"));
        assert!(has_symbol(k, "__pci_reset_function_locked"));
        assert!(!has_symbol(k, "pci_reset_function_locked"));
    }

    #[test]
    fn only_blocking_failures_stop_tracing() {
        let c = |level, blocks| Check::new("x", level, "", None, blocks);
        assert!(tracing_possible(&[
            c(Level::Fail, false),
            c(Level::Pass, true)
        ]));
        assert!(!tracing_possible(&[c(Level::Fail, true)]));
    }
}
