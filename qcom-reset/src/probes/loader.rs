//! Loads the eBPF object, injects the BTF-derived offsets and the target filter, and attaches
//! each probed function in the best flavour the kernel allows, falling back per function.
use std::collections::HashSet;
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::kprobe::KProbeLinkId;
use aya::programs::{FEntry, FExit, KProbe};
use aya::{Ebpf, EbpfLoader};
use qcom_reset_ebpf::{DROPS_BRACKETS, DROPS_RINGBUF, Flavour, Func, VfioLayout, target_key};
use serde::Serialize;

use super::layout;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qcom-reset"));

/// Where the kernel lists the kprobe PMU (kprobes are available).
pub const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";
const MODULE_DIR: &str = "/sys/module";
const MODULE_BTF_DIR: &str = "/sys/kernel/btf";

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
/// Which probe flavour to attach with.
#[serde(rename_all = "lowercase")]
pub enum FlavourChoice {
    /// kprobe/kretprobe where the kernel has kprobes, else fentry/fexit, per function.
    #[default]
    Auto,
    /// kprobe/kretprobe only.
    Kprobe,
    /// fentry/fexit only.
    Fentry,
}

/// Whether one kernel function is probed, and how.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    /// The function.
    #[serde(serialize_with = "super::events::symbol")]
    pub function: Func,
    /// How it is attached, or None when it is not (see `note`).
    #[serde(serialize_with = "flavour_or_null")]
    pub flavour: Option<Flavour>,
    /// Why it is attached the way it is, or not at all.
    pub note: Option<String>,
    /// The function's module is not loaded: nothing calls it, so nothing is missed.
    pub unloaded: bool,
}

/// What the probes report.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Every device, not only targets.
    pub trace_all: bool,
    /// (vendor, device) pairs to report; ignored with `trace_all`.
    pub targets: Vec<(u16, u16)>,
    /// Events caused by this process are not reported (the agent's own VFIO accesses).
    pub ignore: Option<NsTgid>,
    /// The probe flavour to attach with.
    pub flavour: FlavourChoice,
}

/// A process as `bpf_get_ns_current_pid_tgid` names it: its TGID inside a PID namespace. In a
/// container getpid() differs from the kernel's TGID; the pair (namespace, TGID) does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NsTgid {
    /// The TGID inside its PID namespace.
    pub tgid: u32,
    /// The namespace's device.
    pub pidns_dev: u64,
    /// The namespace's inode.
    pub pidns_ino: u64,
}

impl NsTgid {
    /// This process, in its own PID namespace (a container's, when it runs in one).
    pub fn current() -> anyhow::Result<NsTgid> {
        let ns = rustix::fs::stat("/proc/self/ns/pid")
            .context("cannot name our PID namespace (/proc/self/ns/pid); mount /proc")?;
        Ok(NsTgid {
            tgid: rustix::process::getpid().as_raw_nonzero().get() as u32,
            pidns_dev: ns.st_dev,
            pidns_ino: ns.st_ino,
        })
    }
}

/// `/sys/module/vfio_pci_core/initstate`: "coming", "live", "going", or None when not loaded.
fn vfio_module_state() -> Option<String> {
    std::fs::read_to_string(
        Path::new(MODULE_DIR)
            .join(layout::VFIO_MODULE)
            .join("initstate"),
    )
    .ok()
    .map(|s| s.trim().to_string())
}

/// The loaded eBPF programs and what is attached.
pub struct Probes {
    ebpf: Ebpf,
    /// The VFIO bracket links, while attached: (program name, link).
    vfio_links: Option<Vec<(String, KProbeLinkId)>>,
    /// vfio_pci_core is built into the kernel (CONFIG_VFIO_PCI_CORE=y, Ubuntu/Proxmox style):
    /// its struct is in vmlinux BTF and it never loads or unloads. The parsed BTF itself is
    /// not kept (tens of MB): a module load parses it again.
    vfio_builtin: Option<VfioLayout>,
    /// Every probed function and how.
    pub attachments: Vec<Attachment>,
}

fn program_name(prefix: &str, f: Func) -> String {
    format!("{prefix}_{}", f.program_stem())
}

/// Whether a load or attach error is the kernel's EPERM (aya reports errno only as text).
pub fn is_eperm(error: &str) -> bool {
    error.contains("Operation not permitted") || error.contains("(os error 1)")
}

/// Turns aya's attach errors into the reason an administrator can act on.
/// `"kprobe"`, `"fentry"` or null, as the attach record has always said.
fn flavour_or_null<S: serde::Serializer>(f: &Option<Flavour>, s: S) -> Result<S::Ok, S::Error> {
    match f {
        Some(f) => s.serialize_str(super::events::flavour_str(*f)),
        None => s.serialize_none(),
    }
}

fn explain(e: &dyn std::fmt::Display, flavour: &str) -> String {
    let s = e.to_string();
    if flavour == "kprobe" && !Path::new(KPROBE_PMU).exists() {
        return format!(
            "kprobes unavailable: no {KPROBE_PMU} (kernel built without CONFIG_KPROBES) ({s})"
        );
    }
    if is_eperm(&s) {
        return format!(
            "{flavour} refused by the kernel (EPERM; lockdown=confidentiality or a BPF LSM?) ({s})"
        );
    }
    s
}

fn full_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl Probes {
    /// Loads the object (no program is loaded into the kernel yet).
    pub fn open(opts: &Options) -> anyhow::Result<Probes> {
        // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (aya-template does the same).
        let unlimited = rustix::process::Rlimit {
            current: None,
            maximum: None,
        };
        if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Memlock, unlimited) {
            tracing::debug!("raising RLIMIT_MEMLOCK failed ({e}); fine on kernels from 5.11");
        }
        let vmlinux = layout::load_vmlinux(Path::new(layout::VMLINUX_BTF))?;
        let pci = layout::pci_dev(&vmlinux)?;
        let trace_all = u32::from(opts.trace_all);
        let me = opts.ignore.unwrap_or_default();
        let mut ebpf = EbpfLoader::new()
            .override_global("PCI_DEV_VENDOR_OFF", &pci.vendor, true)
            .override_global("PCI_DEV_DEVICE_OFF", &pci.device, true)
            .override_global("PCI_DEV_NAME_OFF", &pci.name, true)
            .override_global("TRACE_ALL", &trace_all, true)
            .override_global("AGENT_TGID", &me.tgid, true)
            .override_global("AGENT_PIDNS_DEV", &me.pidns_dev, true)
            .override_global("AGENT_PIDNS_INO", &me.pidns_ino, true)
            .load(OBJECT)
            .map_err(|e| anyhow::anyhow!("loading the eBPF object failed: {}", full_error(&e)))?;
        let mut targets: HashMap<_, u32, u8> =
            HashMap::try_from(ebpf.map_mut("TARGETS").context("TARGETS map")?)?;
        for (v, d) in &opts.targets {
            targets.insert(&target_key(*v, *d), &1, 0)?;
        }
        let vfio_builtin = if Path::new(MODULE_BTF_DIR).join(layout::VFIO_MODULE).exists() {
            None
        } else {
            layout::vfio(&vmlinux).ok()
        };
        Ok(Probes {
            ebpf,
            vfio_links: None,
            vfio_builtin,
            attachments: Vec::new(),
        })
    }

    /// Attaches f's kretprobe, then its kprobe (loading them the first time); returns the
    /// links. Return first: a call entered between the two would otherwise leave an entry no
    /// return ever removes (a stale VFIO bracket marks that thread's later reset calls as its).
    fn kprobe(&mut self, f: Func) -> Result<Vec<(String, KProbeLinkId)>, String> {
        let mut links = Vec::new();
        for prefix in ["krp", "kp"] {
            let name = program_name(prefix, f);
            let p = self.kprobe_program(&name)?;
            if p.fd().is_err() {
                p.load()
                    .map_err(|e| format!("verifier rejected {name}: {}", full_error(&e)))?;
            }
            let link = p
                .attach(f.symbol(), 0)
                .map_err(|e| explain(&full_error(&e), "kprobe"))?;
            links.push((name, link));
        }
        Ok(links)
    }

    fn kprobe_program(&mut self, name: &str) -> Result<&mut KProbe, String> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} missing from the object"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())
    }

    fn fentry(&mut self, f: Func, btf: &aya::Btf) -> Result<(), String> {
        let fe = program_name("fe", f);
        let p: &mut FEntry = self
            .ebpf
            .program_mut(&fe)
            .ok_or_else(|| format!("program {fe} missing"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        p.load(f.symbol(), btf)
            .map_err(|e| explain(&full_error(&e), "fentry"))?;
        p.attach().map_err(|e| explain(&full_error(&e), "fentry"))?;
        let fx = program_name("fx", f);
        let p: &mut FExit = self
            .ebpf
            .program_mut(&fx)
            .ok_or_else(|| format!("program {fx} missing"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        p.load(f.symbol(), btf)
            .map_err(|e| explain(&full_error(&e), "fexit"))?;
        p.attach().map_err(|e| explain(&full_error(&e), "fexit"))?;
        Ok(())
    }

    /// Attaches the reset-function probes (vmlinux), one flavour per function: kprobes first
    /// with `auto`, fentry where a kprobe cannot attach. Kprobes need no kernel BTF, whose
    /// parse for fentry's function ids doubles the agent's peak memory (bench-lab, 6.1: 20.4
    /// against 10.2 MB) for the same attach time; the BTF is parsed only if fentry is tried.
    pub fn attach_reset_probes(&mut self, choice: FlavourChoice) {
        let mut btf: Option<Option<aya::Btf>> = None;
        for f in Func::ALL.into_iter().filter(|f| !f.in_vfio_module()) {
            let mut notes = Vec::new();
            let mut flavour = None;
            if choice != FlavourChoice::Fentry {
                match self.kprobe(f) {
                    Ok(_) => flavour = Some(Flavour::Kprobe),
                    Err(e) => notes.push(format!("kprobe: {e}")),
                }
            }
            if flavour.is_none() && choice != FlavourChoice::Kprobe {
                let btf = btf.get_or_insert_with(|| aya::Btf::from_sys_fs().ok());
                match btf.as_ref().map(|b| self.fentry(f, b)) {
                    Some(Ok(())) => flavour = Some(Flavour::Fentry),
                    Some(Err(e)) => notes.push(format!("fentry: {e}")),
                    None => notes.push("fentry: no kernel BTF".into()),
                }
            }
            self.attachments.push(Attachment {
                function: f,
                flavour,
                note: (!notes.is_empty()).then(|| notes.join("; ")),
                unloaded: false,
            });
        }
    }

    /// Brings the VFIO brackets in line with the kernel: attached while vfio_pci_core is loaded
    /// (or built in), detached when it is unloaded, attached again when it comes back (the
    /// kernel disarms kprobes on a module's functions when the module goes). Returns whether
    /// anything changed.
    pub fn sync_vfio(&mut self) -> bool {
        let present = self.vfio_builtin.is_some() || vfio_module_state().as_deref() == Some("live");
        match (present, self.vfio_links.is_some()) {
            (true, false) => self.attach_vfio(),
            (false, true) => self.detach_vfio(),
            _ => return false,
        }
        true
    }

    /// The module is loading (its `add` uevent comes before its init has run): kprobes put on
    /// its functions now may never fire, so attaching waits until it is live.
    pub fn vfio_coming(&self) -> bool {
        self.vfio_builtin.is_none() && vfio_module_state().as_deref() == Some("coming")
    }

    fn attach_vfio(&mut self) {
        // The attachment table shows why a probe is not attached, as a sentence.
        let layout = self.vfio_layout().map_err(|e| e.to_string()).and_then(|l| {
            tracing::info!(
                "vfio_pci_core_device: pdev at byte {}, needs_reset {}",
                l.pdev,
                layout::NeedsReset::of(&l)
            );
            let mut arr: Array<_, VfioLayout> = Array::try_from(
                self.ebpf
                    .map_mut("VFIO_LAYOUT")
                    .ok_or("VFIO_LAYOUT map missing")?,
            )
            .map_err(|e| e.to_string())?;
            arr.set(0, &l, 0).map_err(|e| e.to_string())
        });
        let mut links = Vec::new();
        for f in [Func::VfioPciCoreEnable, Func::VfioPciCoreDisable] {
            let r = layout.clone().and_then(|()| self.kprobe(f));
            let ok = r.is_ok();
            let note = match r {
                Ok(l) => {
                    links.extend(l);
                    self.vfio_builtin
                        .map(|_| "vfio_pci_core is built into this kernel".to_string())
                }
                Err(e) => Some(e),
            };
            self.set_attachment(f, ok.then_some(Flavour::Kprobe), note, false);
        }
        self.vfio_links = Some(links);
    }

    fn detach_vfio(&mut self) {
        // Entries first, returns last: the reverse of attaching.
        for (name, link) in self.vfio_links.take().unwrap_or_default().into_iter().rev() {
            if let Ok(p) = self.kprobe_program(&name) {
                let _ = p.detach(link);
            }
        }
        for f in [Func::VfioPciCoreEnable, Func::VfioPciCoreDisable] {
            self.set_attachment(
                f,
                None,
                Some("vfio_pci_core was unloaded; attached again when it loads".into()),
                true,
            );
        }
    }

    fn set_attachment(
        &mut self,
        f: Func,
        flavour: Option<Flavour>,
        note: Option<String>,
        unloaded: bool,
    ) {
        self.attachments.retain(|a| a.function != f);
        self.attachments.push(Attachment {
            function: f,
            flavour,
            note,
            unloaded,
        });
    }

    fn vfio_layout(&self) -> Result<VfioLayout, layout::LayoutError> {
        if let Some(l) = self.vfio_builtin {
            return Ok(l);
        }
        let vmlinux = layout::load_vmlinux(Path::new(layout::VMLINUX_BTF))?;
        let path = Path::new(MODULE_BTF_DIR).join(layout::VFIO_MODULE);
        let btf = layout::load_module(&path, &vmlinux)?;
        layout::vfio(&btf)
    }

    /// (ring buffer drops, bracket-table drops) summed over CPUs.
    pub fn drops(&self) -> (u64, u64) {
        let Some(map) = self.ebpf.map("DROPS") else {
            return (0, 0);
        };
        let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else {
            return (0, 0);
        };
        let sum = |i| arr.get(&i, 0).map_or(0, |v| v.iter().sum());
        (sum(DROPS_RINGBUF), sum(DROPS_BRACKETS))
    }

    /// The ring buffer the programs write events to.
    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        Ok(RingBuf::try_from(
            self.ebpf.take_map("EVENTS").context("EVENTS map")?,
        )?)
    }

    /// The programs' log output, for aya-log.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Loads every program of one flavour through the kernel's verifier without attaching it.
    pub fn verify(&mut self, flavour: Flavour) -> Vec<(String, Result<(), String>)> {
        let btf = aya::Btf::from_sys_fs().ok();
        let mut out = Vec::new();
        let mut done = HashSet::new();
        for f in Func::ALL {
            let names: &[&str] = match flavour {
                Flavour::Kprobe => &["kp", "krp"],
                Flavour::Fentry if f.in_vfio_module() => &[],
                Flavour::Fentry => &["fe", "fx"],
            };
            for prefix in names {
                let name = program_name(prefix, f);
                if !done.insert(name.clone()) {
                    continue;
                }
                let r = match self.ebpf.program_mut(&name) {
                    None => Err("missing from the object".to_string()),
                    Some(aya::programs::Program::KProbe(p)) => p.load().map_err(|e| full_error(&e)),
                    Some(aya::programs::Program::FEntry(p)) => match &btf {
                        Some(b) => p.load(f.symbol(), b).map_err(|e| full_error(&e)),
                        None => Err("no kernel BTF".into()),
                    },
                    Some(aya::programs::Program::FExit(p)) => match &btf {
                        Some(b) => p.load(f.symbol(), b).map_err(|e| full_error(&e)),
                        None => Err("no kernel BTF".into()),
                    },
                    Some(_) => Err("unexpected program type".into()),
                };
                out.push((name, r));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Typed inside, the attach record's text outside: the symbol, the flavour's name or null
    /// (the lab's scenarios and the trace's readers match on these).
    #[test]
    fn an_attachment_is_written_as_the_attach_record_has_it() {
        let on = Attachment {
            function: Func::PciDevSpecificReset,
            flavour: Some(Flavour::Fentry),
            note: None,
            unloaded: false,
        };
        let off = Attachment {
            function: Func::VfioPciCoreDisable,
            flavour: None,
            note: Some("vfio_pci_core was unloaded".into()),
            unloaded: true,
        };
        assert_eq!(
            serde_json::to_value([on, off]).unwrap(),
            serde_json::json!([
                {"function": "pci_dev_specific_reset", "flavour": "fentry", "note": null,
                 "unloaded": false},
                {"function": "vfio_pci_core_disable", "flavour": null,
                 "note": "vfio_pci_core was unloaded", "unloaded": true}
            ])
        );
    }
}
