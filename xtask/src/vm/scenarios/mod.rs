//! The VM-lab scenarios: the guest script each runs and the assertions the host makes on what it
//! printed (and, for the loops, on the simulator's own report). Every scenario asserts.

mod catalogue;
mod checks;
mod guest;

use crate::vm::records::SimReport;

pub use catalogue::SCENARIOS;
use guest::MHI_ENDS;
pub use guest::{INIT, LIB, card_env};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Probes of both flavours see sysfs resets, VFIO opens and releases, bus resets named as such.
    Probes,
    /// The simulated WLAN card: release (after the kernel's bus reset, if any) -> agent -> WLAN
    /// sequence on the card's BAR -> clean.
    LoopWlan,
    /// The same with the modem profile.
    LoopModem,
    /// While a process holds the VFIO fd, nothing is written and the agent says why.
    Held,
    /// The simulated link never comes back: link-down verdict, PCI_COMMAND restored, no retry storm.
    Fault,
    /// A graceful QEMU shutdown: the group stays open 3 s after the device closes; the agent
    /// waits for it, then resets once.
    Graceful,
    /// A modem bound to vfio-pci while the agent runs is reset before any VM opens it.
    Bind,
    /// Observe-only: the simulator receives no write, PCI_COMMAND and power/control unchanged.
    Observe,
    /// While the agent resets the modem, a VM that tries to open it fails with EBUSY; one that
    /// opens it and maps its BAR during the verification (which lets the group go once the card
    /// answers; the modem is slow to READY here) starts, keeps the card untouched (the kernel
    /// revokes the agent's BAR mapping: no SIGBUS death), and its release is reset after.
    Own,
    /// SIGKILL during the modem's 2 s wait; the restarted agent restores power/control and
    /// PCI_COMMAND from the crash record.
    Kill,
    /// vfio-pci unloaded and reloaded under a running agent: the VFIO probes are re-attached
    /// (module uevents) and the next release is still seen and reset.
    Reload,
    /// The agent in its own PID namespace (as in a container) resetting through VFIO: its own
    /// opens and releases are recognised by (namespace, TGID), never come back as events.
    Container,
    /// `qcom-reset check` (and, on kernels before 5.15, `run`) against the kernel: VFIO module or
    /// built in, which `needs_reset` the summary reads, or the one-line refusal of old kernels.
    Preflight,
    /// Behind the root port: the port's hotplug events and AER Surprise Down are masked while
    /// the agent resets the modem, and restored after (QEMU never drops the link itself).
    Port,
    /// A host driver takes the modem mid-reset (libvirt's managed reattach: `driver_override`,
    /// unbind, `drivers_probe`; uio_pci_generic stands in for ath11k/mhi-pci-generic): from then
    /// on the session writes nothing to the card, no config word, no `power/control`, no BAR
    /// register, says it was taken, and removes its crash record.
    Handover,
    /// `qcom-reset power-cycle` behind the root port: the function is removed, the port put
    /// through runtime PM (QEMU has no _PR3: D3hot, no real power cut), rescanned, rebound to
    /// vfio-pci with autoprobe held off, then reset and verified clean.
    Power,
    /// A modem added by ID (`[[device]] ids = "…" profile = "sdx55"`, an experimental profile
    /// named for it, on an ID the table lacks: 17cb:03ff on the vfio-user card, 1af4:1110 on
    /// ivshmem) is reset like any target; `status` and `reset --only-targets` follow
    /// the rule too.
    ById,
    /// The vfio-user card only: while the modem's reset has the link down, the guest's config
    /// reads return all-ones (vendor 0xffff; a header type of 0x7f, QEMU keeping its own
    /// multifunction bit), as the users' `rev ff` reports show; the function reset takes
    /// PCI_COMMAND; the agent's verdict is clean and the header comes back.
    #[value(name = "linkdrop")]
    LinkDrop,
    /// A kernel with the device-specific reset only (`--kernel devspecific`): the kernel's
    /// reset at open and at release reached a SoC that ignored both (the simulator's
    /// `resets-missed=2`); the agent's verification finds the card stale and resets it through
    /// the kernel's own `device_specific`, which takes this time.
    KernelStale,
    /// A kernel with the device-specific reset only: `act_with_kernel_reset = true` makes the
    /// agent follow the kernel's reset at release with its own register sequence.
    ActWithKernel,
    /// A kernel with the device-specific reset only, the WLAN card's link drop resetting the
    /// function (the simulator's default, which the other runs on that kernel turn off): the
    /// reviewed reset's link poll reads all-ones until it gives up (-ETIMEDOUT after 5 s) at
    /// the VM's open and at the agent's kernel reset; the agent falls back to its own sequence.
    KernelTimeout,
    /// The guest kernel's own `mhi-pci-generic` judges the simulated SDX65: bound to it (not
    /// vfio-pci) as a killed VM left it (`mission`, `crashed`, `stuck`), it fails as the users'
    /// reports say and never reaches its firmware download; after a VM's use and qcom-reset's
    /// reset it gets past the MHI state checks to `request_firmware`, which stops at the missing
    /// `qcom/sdx65m/xbl.elf`: the card is usable.
    DriverJudge,
    /// The guest's `ath11k_pci` against the simulated WCN6855, as the VM left it and after the
    /// reset: how far the WLAN driver gets on the register model (docs/testing.md).
    #[value(name = "driver-judge-ath11k")]
    DriverJudgeAth11k,
    /// The guest's `ath12k` against the simulated WCN7850, the same way.
    #[value(name = "driver-judge-ath12k")]
    DriverJudgeAth12k,
}

/// The next owner's driver a judging scenario binds to the card, and what it says.
pub struct Judge {
    /// The module that registers the PCI driver.
    pub module: &'static str,
    /// The start of the PCI driver's name (ath12k's moved between modules and names).
    driver: &'static str,
    /// Loaded first: what the driver needs but does not depend on (QMI's socket family for
    /// ath1xk, without which it defers its probe before touching the SoC).
    pub needs: &'static [&'static str],
    /// The first firmware file it asks for once it finds the card usable.
    firmware: &'static str,
    /// Its messages that end the wait (grep patterns): each way it gives up, and its firmware
    /// request.
    ends: &'static [&'static str],
}

const MHI_JUDGE: Judge = Judge {
    module: "mhi_pci_generic",
    driver: "mhi-pci-generic",
    needs: &[],
    firmware: "qcom/sdx65m/xbl.elf",
    ends: &MHI_ENDS,
};

const ATH_ENDS: [&str; 4] = [
    "Direct firmware load",
    "failed with error",
    "Unsupported",
    "failed to",
];

const ATH11K_JUDGE: Judge = Judge {
    module: "ath11k_pci",
    driver: "ath11k_pci",
    needs: &["qrtr"],
    firmware: "ath11k/WCN6855/hw2.0/amss.bin",
    ends: &ATH_ENDS,
};

/// 6.16 moved the PCI driver into `ath12k_wifi7`; before, `ath12k` has it.
const ATH12K_JUDGE: Judge = Judge {
    module: "ath12k_wifi7",
    driver: "ath12k",
    needs: &["qrtr"],
    firmware: "ath12k/WCN7850/hw2.0/amss.bin",
    ends: &ATH_ENDS,
};

/// An SDX55-based modem ID that is not in the device table.
const BY_ID_SIBLING: &str = "17cb:03ff";

/// Where the simulated card sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// On the root bus: no kernel reset method (what 7.2/7.3's NO_BUS_RESET gives real cards).
    RootBus,
    /// Alone behind a `pcie-root-port`: reset_method `bus`, the kernel SBRs it at open and
    /// release (<=7.1 hosts). QEMU's SBR resets ivshmem's config space, never the simulated
    /// firmware: exactly what the real parts do.
    RootPort,
}

impl Topology {
    pub const ALL: [Topology; 2] = [Topology::RootBus, Topology::RootPort];

    pub fn name(self) -> &'static str {
        match self {
            Topology::RootBus => "root-bus",
            Topology::RootPort => "root-port",
        }
    }

    /// QEMU arguments placing the card's `-device` value (key=value or JSON) here.
    pub fn place(self, dev: &str) -> Vec<String> {
        match self {
            Topology::RootBus => vec!["-device".into(), dev.into()],
            Topology::RootPort => {
                let on_port = match dev.strip_prefix('{') {
                    Some(rest) => format!("{{\"bus\":\"rpsim\",{rest}"),
                    None => format!("{dev},bus=rpsim"),
                };
                vec![
                    "-device".into(),
                    "pcie-root-port,id=rpsim,slot=2".into(),
                    "-device".into(),
                    on_port,
                ]
            }
        }
    }
}

/// One boot: a scenario in a topology, with the simulated card in a state.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub scenario: Scenario,
    pub topology: Topology,
    /// `qcom-reset-sim --state`.
    pub state: &'static str,
}

impl Run {
    pub fn label(&self) -> String {
        match self.scenario.simulator() {
            Some(_) => format!(
                "{} {} {}",
                self.scenario.name(),
                self.topology.name(),
                self.state
            ),
            None => self.scenario.name().to_string(),
        }
    }

    pub fn tag(&self) -> String {
        self.label().replace(' ', "-")
    }
}

/// Where a scenario's card may sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// In every topology the run chose.
    Chosen,
    /// Behind a root port only (its port is what it is about).
    RootPort,
    /// The scenario brings its own devices: one boot, on the root bus.
    Own,
}

/// What the simulated link drop does to config space (`qcom-reset-sim --link-drop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkDropRule {
    /// The reviewed device-specific reset polls the WLAN card's BAR for the link to come back,
    /// which works only if the drop keeps the header: upstream tested it on the real parts, so
    /// on a kernel with it the lab keeps config; elsewhere the drop resets the function.
    ByKernel,
    /// The WLAN drivers reset the SoC themselves at every power-up (ath1xk's
    /// `soc_global_reset`) and carry on through BAR0: upstream runs that on the real parts (with
    /// `function-reset` the driver's MMIO never decodes again).
    KeepsConfig,
    /// The other case on a device-specific kernel: the reviewed reset's link poll gives up.
    FunctionReset,
}

/// What a scenario's checks take: the run, the guest console, the simulator's report.
pub type Check = fn(&Run, &str, Option<&SimReport>) -> anyhow::Result<Vec<String>>;

/// One scenario, as data: its boots, the card and its faults, the guest script and the host's
/// checks. [`SCENARIOS`] has one record each, in the order a full run boots them.
pub struct Spec {
    pub scenario: Scenario,
    pub name: &'static str,
    /// The card's state as a killed VM left it: one boot each.
    pub states: &'static [&'static str],
    pub place: Place,
    /// The simulated card: (profile, faults); None where the scenario brings its own devices.
    pub sim: Option<(&'static str, &'static str)>,
    /// On a kernel that resets the card at every VFIO open and release, the scenarios about
    /// what happens during the agent's own reset need the agent to reset: the SoC ignores the
    /// kernel's two (`resets-missed=2`) and the agent's verification finds the card stale.
    pub stale_on_kernel_reset: bool,
    pub link_drop: LinkDropRule,
    /// IDs the vfio-user card presents instead of its profile's.
    pub card_ids: Option<&'static str>,
    /// The next owner's driver that judges the card.
    pub judge: Option<&'static Judge>,
    /// QEMU devices besides intel-iommu (the card is added by the runner).
    pub devices: &'static [&'static str],
    pub script: fn() -> String,
    pub check: Check,
}

impl Scenario {
    /// Every scenario, in boot order.
    pub fn all() -> impl Iterator<Item = Scenario> {
        SCENARIOS.iter().map(|s| s.scenario)
    }

    /// This scenario's record.
    pub fn spec(self) -> &'static Spec {
        SCENARIOS
            .iter()
            .find(|s| s.scenario == self)
            .expect("every scenario has a record")
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The next owner's driver that judges the card, for the `driver-judge*` scenarios.
    pub fn judge(self) -> Option<&'static Judge> {
        self.spec().judge
    }

    /// Why this scenario cannot run on a kernel, if it cannot: before 5.15 there is no
    /// vfio_pci_core and only the preflight refusal is testable; a built-in vfio-pci cannot be
    /// unloaded; `builtin-vfio` has no UIO; the device-specific regime needs a kernel
    /// that has it (and the card's real IDs, which its quirk keys on).
    pub fn unsupported(
        self,
        k: &super::host::Kernel,
        card: super::CardKind,
    ) -> Option<&'static str> {
        match self {
            Scenario::Preflight => None,
            Scenario::LinkDrop if card == super::CardKind::Ivshmem => {
                Some("the ivshmem card's config space is QEMU's: it never reads all-ones")
            }
            _ if k.major_minor() < (5, 15) => {
                Some("no vfio_pci_core before 5.15 (preflight covers it)")
            }
            Scenario::KernelStale | Scenario::ActWithKernel | Scenario::KernelTimeout
                if !k.device_specific || card == super::CardKind::Ivshmem =>
            {
                Some(
                    "needs the device-specific reset (--kernel devspecific) and the card's real IDs",
                )
            }
            // Seen 2026-12-03: an instruction fetch from the direct map in pci_reset_function
            // once the kprobe flavour attaches where the fentry trampolines were just detached.
            // Debian's own 7.3.4 passes the same scenario: a kernel bug this configuration
            // meets, not qcom-reset's (whose programs the kernel's verifier and attach own).
            _ if self.judge().is_some() && card == super::CardKind::Ivshmem => {
                Some("the drivers bind only to the card's real IDs (the vfio-user card)")
            }
            _ if self
                .judge()
                .is_some_and(|j| !super::initramfs::has_module(k, j.module)) =>
            {
                Some("this kernel does not have the driver as a module")
            }
            Scenario::Probes if k.device_specific => Some(
                "the lab's tinyconfig 7.3.4 oopses in pci_reset_function when kprobes follow \
                 detached fentry trampolines (Debian's 7.3.4 passes: --kernel 7.3 --scenario probes)",
            ),
            Scenario::Reload if k.vfio_builtin => Some("vfio-pci is built in: nothing to unload"),
            Scenario::Handover if !super::initramfs::has_module(k, "uio_pci_generic") => {
                Some("this kernel has no uio_pci_generic to hand the card to")
            }
            _ => None,
        }
    }

    /// The boots this scenario needs in the chosen topologies: one per state the card is left
    /// in, in each topology its place allows.
    pub fn runs(self, topologies: &[Topology]) -> Vec<Run> {
        let spec = self.spec();
        let topologies = match spec.place {
            Place::Own => &[Topology::RootBus][..],
            Place::RootPort => &[Topology::RootPort][..],
            Place::Chosen => topologies,
        };
        topologies
            .iter()
            .flat_map(|&topology| {
                spec.states.iter().map(move |&state| Run {
                    scenario: self,
                    topology,
                    state,
                })
            })
            .collect()
    }

    /// The simulator behind the card: (profile, faults), if the scenario has one.
    pub fn simulator(self) -> Option<(&'static str, &'static str)> {
        self.spec().sim
    }

    /// The simulator's faults on a kernel (see [`Spec::stale_on_kernel_reset`]).
    pub fn faults(self, device_specific_kernel: bool) -> Option<String> {
        let (_, faults) = self.simulator()?;
        let stale = device_specific_kernel && self.spec().stale_on_kernel_reset;
        Some(match (faults, stale) {
            (f, false) => f.to_string(),
            ("", true) => "resets-missed=2".into(),
            (f, true) => format!("{f},resets-missed=2"),
        })
    }

    /// What the simulated link drop does to config space on a kernel ([`LinkDropRule`]).
    pub fn link_drop(self, device_specific_kernel: bool) -> &'static str {
        match self.spec().link_drop {
            LinkDropRule::KeepsConfig => "keeps-config",
            LinkDropRule::ByKernel if device_specific_kernel => "keeps-config",
            LinkDropRule::ByKernel | LinkDropRule::FunctionReset => "function-reset",
        }
    }

    /// IDs the vfio-user card presents instead of its profile's: `by-id` proves a `[[device]]`
    /// rule on a sibling the table lacks.
    pub fn card_ids(self) -> Option<&'static str> {
        self.spec().card_ids
    }

    /// QEMU devices besides intel-iommu (the card is added by the runner).
    pub fn devices(self) -> Vec<String> {
        self.spec()
            .devices
            .iter()
            .map(std::string::ToString::to_string)
            .collect()
    }

    pub fn script(self) -> String {
        format!("{LIB}\n{}", (self.spec().script)())
    }

    pub fn check(
        self,
        run: &Run,
        console: &str,
        sim: Option<&SimReport>,
    ) -> anyhow::Result<Vec<String>> {
        (self.spec().check)(run, console, sim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum as _;

    /// Every scenario the command line accepts has exactly one record, under the name the
    /// command line gives it: one missing would panic only when a lab run reaches it.
    #[test]
    fn every_scenario_has_one_record_under_its_cli_name() {
        for v in Scenario::value_variants() {
            let records: Vec<&Spec> = SCENARIOS.iter().filter(|s| s.scenario == *v).collect();
            assert_eq!(records.len(), 1, "{v:?}");
            let cli = v.to_possible_value().expect("not skipped");
            assert_eq!(cli.get_name(), records[0].name, "{v:?}");
        }
        assert_eq!(SCENARIOS.len(), Scenario::value_variants().len());
    }

    /// A scenario with its own devices boots once on the root bus; the port's scenarios only
    /// behind a port; the rest in each chosen topology, once per state.
    #[test]
    fn runs_follow_each_records_place_and_states() {
        let both = [Topology::RootBus, Topology::RootPort];
        assert_eq!(Scenario::Probes.runs(&both).len(), 1);
        assert!(
            Scenario::Port
                .runs(&both)
                .iter()
                .all(|r| r.topology == Topology::RootPort)
        );
        assert_eq!(Scenario::LoopWlan.runs(&both).len(), 4);
        assert_eq!(Scenario::DriverJudge.runs(&[Topology::RootPort]).len(), 3);
        assert_eq!(
            Scenario::Kill.faults(true).as_deref(),
            Some("resets-missed=2")
        );
        assert_eq!(Scenario::Kill.faults(false).as_deref(), Some(""));
        assert_eq!(Scenario::KernelTimeout.link_drop(true), "function-reset");
        assert_eq!(Scenario::LoopWlan.link_drop(true), "keeps-config");
        assert_eq!(Scenario::DriverJudgeAth11k.link_drop(false), "keeps-config");
    }
}
