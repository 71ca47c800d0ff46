//! The guest's side: its init, the shell library every scenario sources, and each scenario's
//! script, built from the fragments in `guest/`.
use super::Judge;

pub const INIT: &str = include_str!("guest/init.sh");

pub const LIB: &str = include_str!("guest/lib.sh");

pub(crate) const PREFLIGHT: &str = include_str!("guest/preflight.sh");

pub(crate) const PROBES: &str = include_str!("guest/probes.sh");

/// Finds the card, binds it to vfio-pci unless `bind` is false, and writes the agent
/// configuration; `extra` goes at the top level. The vfio-user card is found by the device
/// table; the ivshmem stand-in needs its `profile`/`bar` override (`/card.env`, [`card_env`]).
pub(crate) fn setup(extra: &str, bind: bool) -> String {
    setup_with("$(card_section $D)", extra, bind)
}

/// What the guest's scripts need to know of the card: `CARD_ID` (vendor and device for
/// `dev_by_id`), `CARD_IDS` (as a `[[device]]` rule names them), `CARD_BAR` (a rule's BAR
/// override), `CARD_CLI` (the CLI's override flags) and `card_section BDF` (the agent's).
pub fn card_env(kind: crate::vm::CardKind, profile: &str, ids: Option<&str>) -> String {
    match kind {
        crate::vm::CardKind::Ivshmem => format!(
            "CARD_ID=\"0x1af4 0x1110\"\nCARD_IDS=1af4:1110\nCARD_BAR=\"bar = 2\"\n\
             CARD_CLI=\"--profile {profile} --bar 2\"\n\
             card_section() {{ printf '[devices.\"%s\"]\\nprofile = \"%s\"\\nbar = 2\\n' \"$1\" {profile}; }}\n"
        ),
        crate::vm::CardKind::VfioUser => {
            let (v, d) = ids
                .unwrap_or(profile_ids(profile))
                .split_once(':')
                .expect("vvvv:dddd");
            format!(
                "CARD_ID=\"0x{v} 0x{d}\"\nCARD_IDS={v}:{d}\nCARD_BAR=\nCARD_CLI=\n\
                 card_section() {{ :; }}\n"
            )
        }
    }
}

/// The IDs `qcom-reset-sim --profile` presents: each profile's reference entry in the table.
pub(crate) fn profile_ids(profile: &str) -> &'static str {
    match profile {
        "wcn6855" => "17cb:1103",
        "wcn7850" => "17cb:1107",
        "sdx55" => "17cb:0306",
        _ => "17cb:0308",
    }
}

/// Like [`setup`], with the card's configuration section given (e.g. a `[[device]]` rule).
pub(crate) fn setup_with(device: &str, extra: &str, bind: bool) -> String {
    // The device was stuck before the test: unless the scenario asks, only its events trigger.
    let rescan = if extra.contains("rescan =") {
        ""
    } else {
        "rescan = false\n"
    };
    format!(
        r#". /card.env
D=$(dev_by_id $CARD_ID) || {{ echo "no card $CARD_ID on the bus"; exit 1; }}
S=/sys/bus/pci/devices/$D
echo "VMLAB lspci: $D [$(cut -c3-6 $S/class)]: [$(cut -c3- $S/vendor):$(cut -c3- $S/device)] (rev $(od -An -tx1 -j8 -N1 $S/config | tr -d ' '))"
echo "VMLAB card at $D ($CARD_ID), reset_method: $(cat /sys/bus/pci/devices/$D/reset_method 2>/dev/null || echo none)"
{}
mkdir -p /etc/qcom-reset
cat > /etc/qcom-reset/config.toml <<CONFIG
{rescan}debounce_ms = 200
journal = "/tmp/journal.jsonl"
state_file = "/tmp/state.json"
{extra}
{device}
CONFIG
"#,
        if bind { "bind_vfio $D" } else { "" }
    )
}

pub(crate) const START_AGENT: &str = include_str!("guest/start_agent.sh");

pub(crate) const STOP_AND_DUMP: &str = include_str!("guest/stop_and_dump.sh");

/// `check` and `status` before the agent starts: each names the card's regime.
pub(crate) const REGIME_VIEWS: &str = include_str!("guest/regime_views.sh");

pub(crate) fn agent_loop(extra: &str, views: &str) -> String {
    let until = if extra.contains("max_attempts") {
        "gave up"
    } else {
        "\"type\":\"action\""
    };
    format!(
        r#"{}{views}{START_AGENT}
vmlab-guest port-regs $D >> /tmp/port.txt 2>/dev/null
vmlab-guest vfio-cycle $D
wait_for /tmp/journal.jsonl '{until}' 90
vmlab-guest port-regs $D >> /tmp/port.txt 2>/dev/null
dump port /tmp/port.txt
{STOP_AND_DUMP}"#,
        setup(extra, true)
    )
}

pub(crate) fn held() -> String {
    format!(
        r#"{}{START_AGENT}
vmlab-guest vfio-cycle $D 4000 & H=$!
sleep 2
qcom-reset reset $D $CARD_CLI > /tmp/cli.out 2>&1; echo "cli-rc=$?" >> /tmp/cli.out
wait $H
wait_for /tmp/journal.jsonl '"type":"action"' 60
sleep 1
dump cli /tmp/cli.out{STOP_AND_DUMP}"#,
        setup("", true)
    )
}

pub(crate) fn graceful() -> String {
    format!(
        r#"{}{START_AGENT}
vmlab-guest vfio-graceful $D 500 3000
wait_for /tmp/journal.jsonl '"result":"clean"\|"result":"nothing-to-do"' 60
sleep 1
{STOP_AND_DUMP}"#,
        setup("", true)
    )
}

pub(crate) fn bind() -> String {
    format!(
        r#"{}{START_AGENT}
bind_vfio $D
wait_for /tmp/journal.jsonl '"type":"action"' 60
sleep 1
{STOP_AND_DUMP}"#,
        setup("", false)
    )
}

pub(crate) fn observe() -> String {
    format!(
        r#"{}
state() {{ echo "pci_command=$(pci_command $D) power=$(cat /sys/bus/pci/devices/$D/power/control)"; }}
echo "VMLAB before $(state)"
{START_AGENT}
wait_for /tmp/journal.jsonl '"trigger":"rescan"' 60
echo "VMLAB after-rescan $(state)"
sed -i 's/^observe_only = true/observe_only = false/; s/^debounce_ms = 200/debounce_ms = 250/' /etc/qcom-reset/config.toml
kill -HUP $P
wait_for /tmp/agent.log "configuration reloaded" 30
vmlab-guest vfio-cycle $D
wait_for /tmp/journal.jsonl '"result":"dry-run"\|"trigger":"kernel-reset"' 60
{STOP_AND_DUMP}"#,
        setup("observe_only = true\nrescan = true", true)
    )
}

/// The agent's log line (a grep pattern) once the modem's reset is under way, for at least 2 s:
/// its own sequence's wait, or, on a kernel with the device-specific reset, the kernel's reset
/// it is about to ask for (whose own 2 s wait follows).
pub(crate) const RESETTING: &str = "wait for the modem to reboot\\|using its reset instead of ours";

pub(crate) fn own() -> String {
    format!(
        r#"{}{START_AGENT}
vmlab-guest vfio-cycle $D
wait_for /tmp/agent.log '{RESETTING}' 60
vmlab-guest vfio-cycle $D > /tmp/vm.out 2>&1; echo "vm-rc=$?" >> /tmp/vm.out
wait_for /tmp/agent.log 'VFIO group let go' 60
vmlab-guest vfio-use $D 5000 > /tmp/vm2.out 2>&1; echo "vm2-rc=$?" >> /tmp/vm2.out
wait_for /tmp/journal.jsonl '"result":"clean"\|"result":"nothing-to-do"' 60
dump vm /tmp/vm.out; dump vm2 /tmp/vm2.out{STOP_AND_DUMP}"#,
        setup("", true)
    )
}

pub(crate) fn kill() -> String {
    format!(
        r#"{}
state() {{ echo "pci_command=$(pci_command $D) power=$(cat /sys/bus/pci/devices/$D/power/control)"; }}
vmlab-guest port-regs $D >> /tmp/port.txt 2>/dev/null
{START_AGENT}
vmlab-guest vfio-cycle $D
wait_for /tmp/agent.log '{RESETTING}' 60
kill -KILL $P; wait $P
echo "VMLAB killed $(state)"
vmlab-guest port-regs $D >> /tmp/port.txt 2>/dev/null
dump record /run/qcom-reset/$D.json
qcom-reset run > /tmp/agent2.log 2>&1 & P=$!
wait_for /tmp/agent2.log "recovered" 60
wait_for /tmp/agent2.log "agent running" 60
echo "VMLAB recovered $(state)"
vmlab-guest port-regs $D >> /tmp/port.txt 2>/dev/null
dump port /tmp/port.txt
[ -e /run/qcom-reset/$D.json ] && echo "VMLAB record still there"
kill -TERM $P; wait $P
dump agent-log /tmp/agent2.log
"#,
        setup("", true)
    )
}

/// Kprobe events (CLOCK_MONOTONIC, as the helper's stamps) on every sysfs config write and every
/// `power/control` write ("on" is `pm_runtime_forbid`, "auto" `pm_runtime_allow`), each naming
/// its device: a write of the value already there is seen too, which a before/after reading
/// would miss.
pub(crate) const TRACE_WRITES: &str = include_str!("guest/trace_writes.sh");

pub(crate) fn handover() -> String {
    // The agent's log lines carry CLOCK_MONOTONIC stamps: the handover is timed against the
    // SoC reset request, which the simulator timestamps on its own clock.
    format!(
        r#"{}
[ -d /sys/bus/pci/drivers/uio_pci_generic ] || modprobe uio_pci_generic || {{ echo "VMLAB cannot load uio_pci_generic"; exit 1; }}
{TRACE_WRITES}
qcom-reset run 2>&1 | vmlab-guest stamp > /tmp/agent.log &
wait_for /tmp/agent.log "agent running" 60 || {{ cat /tmp/agent.log; exit 1; }}
vmlab-guest vfio-cycle $D
wait_for /tmp/agent.log '{RESETTING}' 60 || {{ cat /tmp/agent.log; exit 1; }}
# 0.5-0.7 s into the modem's 2 s wait, as a VM's managed reattach would come.
sleep 0.5
vmlab-guest handover $D uio_pci_generic || echo "VMLAB handover failed"
dump record /run/qcom-reset/$D.json
wait_for /tmp/journal.jsonl '"type":"action"' 60
sleep 1
[ -e /run/qcom-reset/$D.json ] && echo "VMLAB record still there"
kill -TERM $(pidof qcom-reset); wait
vmlab-guest card $D
echo 0 > $T/events/qr/enable
dump trace $T/trace
dump journal /tmp/journal.jsonl; dump agent-log /tmp/agent.log
"#,
        setup("", true)
    )
}

pub(crate) fn container() -> String {
    format!(
        r#"{}
unshare -p -f --mount-proc qcom-reset run > /tmp/agent.log 2>&1 &
wait_for /tmp/agent.log "agent running" 60 || {{ cat /tmp/agent.log; exit 1; }}
P=$(pidof qcom-reset)
echo "VMLAB agent host-pid=$P ns-pid=$(grep NSpid /proc/$P/status | tr -s '\t ' ' ' | cut -d' ' -f2-)"
vmlab-guest vfio-cycle $D
wait_for /tmp/journal.jsonl '"type":"action"' 90
sleep 3
{STOP_AND_DUMP}"#,
        setup("access = \"vfio\"", true)
    )
}

/// The header as the guest reads it, vendor ID and header type, one line per change, while
/// the agent resets the modem.
pub(crate) fn linkdrop() -> String {
    format!(
        r#"{}{START_AGENT}
watch_config() {{
    while [ ! -e /tmp/stop-watch ]; do
        echo "$(od -An -tx2 -N2 /sys/bus/pci/devices/$D/config | tr -d ' ') $(od -An -tx1 -j14 -N1 /sys/bus/pci/devices/$D/config | tr -d ' ')"
    done | uniq > /tmp/watch.txt
}}
watch_config & W=$!
vmlab-guest vfio-cycle $D
wait_for /tmp/journal.jsonl '"type":"action"' 90
touch /tmp/stop-watch; wait $W
dump watch /tmp/watch.txt
{STOP_AND_DUMP}"#,
        setup("", true)
    )
}

/// What ends the wait for mhi-pci-generic's verdict: each of its ways to give up, and the
/// firmware download it reaches on a usable card (grep patterns).
pub(crate) const MHI_ENDS: [&str; 7] = [
    "Error loading firmware",
    "failed to power up MHI controller",
    "is not a valid EE for power on",
    "Device failed to clear MHI Reset",
    "Device failed to enter MHI Ready",
    "MHI did not enter READY state",
    "Failed to reset MHI due to syserr state",
];

/// The card bound to the guest's driver for it (the next owner's) until the driver gives up or
/// reaches its firmware download (at most 15 s: 6.1's mhi-pci-generic waits 8 s for mission
/// mode), its messages dumped, then back on vfio-pci: first as the VM left it, then after the
/// VM's use and the agent's reset.
pub(crate) fn driver_judge(j: &Judge) -> String {
    let ends = j.ends.join("' -e '");
    let (module, driver) = (j.module, j.driver);
    let modules = [j.needs, &[module]].concat().join(" ");
    format!(
        r#"{}
for m in {modules}; do modprobe $m || {{ echo "VMLAB cannot load $m"; exit 1; }}; done
DRV=$(ls /sys/bus/pci/drivers | grep -m1 '^{driver}')
[ -n "$DRV" ] || {{ echo "VMLAB {module} registered no PCI driver {driver}*"; exit 1; }}
judge() {{
  n=$(dmesg | wc -l)
  echo $DRV > $S/driver_override
  [ -e $S/driver ] && echo $D > $S/driver/unbind
  echo $D > /sys/bus/pci/drivers_probe
  i=0
  while [ $i -lt 150 ] && ! dmesg | tail -n +$((n+1)) | grep -q -e '{ends}'; do sleep 0.1; i=$((i+1)); done
  sleep 1
  dmesg | tail -n +$((n+1)) > /tmp/$1.txt
  echo "VMLAB judged driver=$(basename "$(readlink $S/driver)") after $((i/10)) s" >> /tmp/$1.txt
  dump $1 /tmp/$1.txt
  bind_vfio $D
}}
judge judge-before
{START_AGENT}
vmlab-guest vfio-cycle $D
wait_for /tmp/journal.jsonl '"type":"action"' 60
{STOP_AND_DUMP}
judge judge-after
"#,
        setup("", true)
    )
}

pub(crate) fn by_id() -> String {
    format!(
        r#"{}
qcom-reset status $D > /tmp/status.txt 2>&1; echo "status-rc=$?" >> /tmp/status.txt
dump status /tmp/status.txt
{START_AGENT}
vmlab-guest vfio-cycle $D
wait_for /tmp/journal.jsonl '"type":"action"' 90
{STOP_AND_DUMP}"#,
        setup_with(
            "[[device]]\nids = \"$CARD_IDS\"\nprofile = \"sdx55\"\n$CARD_BAR",
            "",
            true
        )
    )
}

pub(crate) fn port() -> String {
    format!(
        r#"{}{START_AGENT}
vmlab-guest port-regs $D > /tmp/port.txt
vmlab-guest vfio-cycle $D
wait_for /tmp/agent.log '{RESETTING}' 60
vmlab-guest port-regs $D >> /tmp/port.txt
wait_for /tmp/journal.jsonl '"result":"clean"' 60
sleep 1
vmlab-guest port-regs $D >> /tmp/port.txt
dump port /tmp/port.txt{STOP_AND_DUMP}"#,
        setup("", true)
    )
}

pub(crate) fn power() -> String {
    format!(
        r#"{}
echo "VMLAB slots: $(for s in /sys/bus/pci/slots/*; do echo "$s=$(cat $s/address 2>/dev/null) power=$([ -e $s/power ] && cat $s/power)"; done)"
qcom-reset power-cycle $D --dry-run > /tmp/plan.txt 2>&1; echo "plan-rc=$?" >> /tmp/plan.txt
dump plan /tmp/plan.txt
qcom-reset power-cycle $D --method d3cold --json > /tmp/pc.json 2>/tmp/pc.err; echo "VMLAB pc-rc=$?"
dump pc-out /tmp/pc.err
dump pc-report /tmp/pc.json
echo "VMLAB after driver=$(basename $(readlink /sys/bus/pci/devices/$D/driver)) autoprobe=$(cat /sys/bus/pci/drivers_autoprobe) override=$(cat /sys/bus/pci/devices/$D/driver_override) record=$(ls /run/qcom-reset/*.power.json 2>/dev/null | wc -l)"
"#,
        setup("", true)
    )
}

pub(crate) fn reload() -> String {
    format!(
        r#"{}{START_AGENT}
rmmod vfio_pci vfio_pci_core || {{ echo "VMLAB cannot unload vfio-pci"; exit 1; }}
wait_for /tmp/agent.log 'vfio_pci_core was unloaded' 30
modprobe vfio-pci
wait_for /tmp/agent.log 'probe vfio_pci_core_disable attached' 30
# A release within tens of ms of the re-attach was missed in 6 of 8 runs under TCG (docs/testing.md).
sleep 1
bind_vfio $D
vmlab-guest vfio-cycle $D
wait_for /tmp/journal.jsonl '"result":"clean"' 60
sleep 1
{STOP_AND_DUMP}"#,
        setup("bind_settle_ms = 0", true)
    )
}
