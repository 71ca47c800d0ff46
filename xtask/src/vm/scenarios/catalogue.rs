//! The catalogue: one record per scenario, in the order a full run boots them.
use super::checks::handover::check_handover;
use super::checks::host::{
    check_by_id, check_container, check_linkdrop, check_port, check_power, check_preflight,
};
use super::checks::judge::{check_driver_judge, check_wlan_judge};
use super::checks::loops::{KernelRegime, check_kernel_regime, check_loop};
use super::checks::probes::check_probes;
use super::checks::safety::{
    check_bind, check_fault, check_graceful, check_held, check_kill, check_observe, check_own,
    check_reload,
};
use super::guest::{
    PREFLIGHT, PROBES, REGIME_VIEWS, agent_loop, bind, by_id, container, driver_judge, graceful,
    handover, held, kill, linkdrop, observe, own, port, power, reload,
};
use super::{
    ATH11K_JUDGE, ATH12K_JUDGE, BY_ID_SIBLING, Check, LinkDropRule, MHI_JUDGE, Place, Scenario,
    Spec,
};

const MISSION: &[&str] = &["mission"];
const KILLED: &[&str] = &["mission", "crashed"];
const WCN6855: Option<(&str, &str)> = Some(("wcn6855", ""));
const SDX65: Option<(&str, &str)> = Some(("sdx65", ""));

/// A scenario with the common settings: the chosen topologies, one boot from a live session,
/// the link drop as the kernel's regime has it, nothing else.
const fn spec(
    scenario: Scenario,
    name: &'static str,
    sim: Option<(&'static str, &'static str)>,
    script: fn() -> String,
    check: Check,
) -> Spec {
    Spec {
        scenario,
        name,
        states: MISSION,
        place: Place::Chosen,
        sim,
        stale_on_kernel_reset: false,
        link_drop: LinkDropRule::ByKernel,
        card_ids: None,
        judge: None,
        devices: &[],
        script,
        check,
    }
}

/// Every scenario, in boot order.
pub static SCENARIOS: [Spec; 24] = [
    Spec {
        place: Place::Own,
        ..spec(
            Scenario::Preflight,
            "preflight",
            None,
            || PREFLIGHT.into(),
            |_, c, _| check_preflight(c),
        )
    },
    Spec {
        place: Place::Own,
        // edu behind a root port (reset_method "bus") and edu on the root bus (no method at all).
        devices: &[
            "-device",
            "pcie-root-port,id=rp1,slot=1",
            "-device",
            "edu,bus=rp1",
            "-device",
            "edu",
        ],
        ..spec(
            Scenario::Probes,
            "probes",
            None,
            || PROBES.into(),
            |_, c, _| check_probes(c),
        )
    },
    Spec {
        states: KILLED,
        ..spec(
            Scenario::LoopWlan,
            "loop-wlan",
            WCN6855,
            || agent_loop("", ""),
            |r, c, s| check_loop(r, c, s, "wlan", 3),
        )
    },
    Spec {
        states: KILLED,
        ..spec(
            Scenario::LoopModem,
            "loop-modem",
            SDX65,
            || agent_loop("", ""),
            |r, c, s| check_loop(r, c, s, "modem", 1),
        )
    },
    spec(Scenario::Held, "held", WCN6855, held, |_, c, s| {
        check_held(c, s)
    }),
    spec(
        Scenario::Fault,
        "fault",
        Some(("wcn6855", "never-returns")),
        || agent_loop("max_attempts = 2\nbackoff_ms = 200\ncooldown_s = 600\n", ""),
        |_, c, s| check_fault(c, s),
    ),
    spec(
        Scenario::Graceful,
        "graceful",
        WCN6855,
        graceful,
        |_, c, s| check_graceful(c, s),
    ),
    spec(Scenario::Bind, "bind", SDX65, bind, |_, c, s| {
        check_bind(c, s)
    }),
    spec(Scenario::Observe, "observe", WCN6855, observe, |_, c, s| {
        check_observe(c, s)
    }),
    Spec {
        stale_on_kernel_reset: true,
        // READY 6 s late: the verification polls long enough for a VM to start meanwhile.
        ..spec(
            Scenario::Own,
            "own",
            Some(("sdx65", "slow-ready-ms=6000")),
            own,
            |_, c, s| check_own(c, s),
        )
    },
    Spec {
        stale_on_kernel_reset: true,
        ..spec(Scenario::Kill, "kill", SDX65, kill, |_, c, _| check_kill(c))
    },
    Spec {
        stale_on_kernel_reset: true,
        ..spec(
            Scenario::Handover,
            "handover",
            SDX65,
            handover,
            |_, c, s| check_handover(c, s),
        )
    },
    spec(Scenario::Reload, "reload", WCN6855, reload, |_, c, s| {
        check_reload(c, s)
    }),
    spec(
        Scenario::Container,
        "container",
        WCN6855,
        container,
        check_container,
    ),
    Spec {
        place: Place::RootPort,
        stale_on_kernel_reset: true,
        ..spec(Scenario::Port, "port", SDX65, port, |_, c, s| {
            check_port(c, s)
        })
    },
    Spec {
        place: Place::RootPort,
        ..spec(Scenario::Power, "power", WCN6855, power, |_, c, s| {
            check_power(c, s)
        })
    },
    Spec {
        card_ids: Some(BY_ID_SIBLING),
        ..spec(Scenario::ById, "by-id", SDX65, by_id, check_by_id)
    },
    Spec {
        stale_on_kernel_reset: true,
        ..spec(
            Scenario::LinkDrop,
            "linkdrop",
            SDX65,
            linkdrop,
            check_linkdrop,
        )
    },
    Spec {
        states: KILLED,
        ..spec(
            Scenario::KernelStale,
            "kernel-stale",
            Some(("wcn6855", "resets-missed=2")),
            || agent_loop("", ""),
            |r, c, s| check_kernel_regime(r, c, s, KernelRegime::STALE),
        )
    },
    spec(
        Scenario::ActWithKernel,
        "act-with-kernel",
        WCN6855,
        || agent_loop("act_with_kernel_reset = true\n", REGIME_VIEWS),
        |r, c, s| check_kernel_regime(r, c, s, KernelRegime::ACT_WITH_KERNEL),
    ),
    Spec {
        link_drop: LinkDropRule::FunctionReset,
        ..spec(
            Scenario::KernelTimeout,
            "kernel-timeout",
            WCN6855,
            || agent_loop("", ""),
            |r, c, s| check_kernel_regime(r, c, s, KernelRegime::TIMEOUT),
        )
    },
    Spec {
        states: &["mission", "crashed", "stuck"],
        judge: Some(&MHI_JUDGE),
        ..spec(
            Scenario::DriverJudge,
            "driver-judge",
            SDX65,
            || driver_judge(&MHI_JUDGE),
            check_driver_judge,
        )
    },
    Spec {
        states: KILLED,
        judge: Some(&ATH11K_JUDGE),
        link_drop: LinkDropRule::KeepsConfig,
        // ath1xk's power-up reads BAR0 10 ms after its own global reset and carries on: the
        // link of the parts it runs on is back by then (the model's default is 40 ms).
        ..spec(
            Scenario::DriverJudgeAth11k,
            "driver-judge-ath11k",
            Some(("wcn6855", "link-down-ms=5")),
            || driver_judge(&ATH11K_JUDGE),
            |r, c, s| check_wlan_judge(r, c, s, &ATH11K_JUDGE),
        )
    },
    Spec {
        states: KILLED,
        judge: Some(&ATH12K_JUDGE),
        link_drop: LinkDropRule::KeepsConfig,
        ..spec(
            Scenario::DriverJudgeAth12k,
            "driver-judge-ath12k",
            Some(("wcn7850", "link-down-ms=5")),
            || driver_judge(&ATH12K_JUDGE),
            |r, c, s| check_wlan_judge(r, c, s, &ATH12K_JUDGE),
        )
    },
];
