# cargo xtask bench-lab: the guest side. Placeholders (capitals between at signs) are filled in by
# bench/mod.rs; every figure is printed as a "VMLAB <tag> <values>" line or dumped as a section.
modprobe virtio_pci; modprobe 9pnet_virtio; modprobe 9p
mkdir -p /host && mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host || { echo "VMLAB no 9p share"; exit 1; }
for m in proc sys dev; do mount -o rbind /$m /host/$m; done
mount -t tmpfs tmp /host/tmp
BT="chroot /host /usr/bin/bpftrace -B line"
for d in @WLAN@ @MODEMS@ @OTHER@; do bind_vfio $d; done
mkdir -p /etc/qcom-reset
cat > /etc/qcom-reset/config.toml <<CONFIG
rescan = false
debounce_ms = 200
journal = "/tmp/journal.jsonl"
state_file = "/tmp/state.json"
CONFIG

# Attach: time to the first attach record (ours, each flavour choice, with the peak memory
# then) and to BEGIN after all probes (bpftrace).
hwm() { grep VmHWM /proc/$1/status | tr -s ' ' | cut -d' ' -f2; }
for i in 1 2 3 4 5; do
  set -- $(vmlab-guest until '"kind":"attach"' /tmp/t$i.log qcom-reset trace --json); echo "VMLAB attach-ours $1"; echo "VMLAB hwm-auto $(hwm $2)"; kill -INT $2; sleep 1
  set -- $(vmlab-guest until '"kind":"attach"' /tmp/k$i.log qcom-reset trace --json --flavour kprobe); echo "VMLAB attach-kprobe $1"; echo "VMLAB hwm-kprobe $(hwm $2)"; kill -INT $2; sleep 1
  set -- $(vmlab-guest until 'ready-now' /tmp/b$i.log $BT -e 'BEGIN { printf("r%s\n", "eady-now"); } @PROBES@ { @s[tid] = nsecs; } @RETS@ { @d = hist(nsecs - @s[tid]); }'); echo "VMLAB attach-bpftrace $1"; kill -INT $2; sleep 1
done
grep -q Attaching /tmp/b5.log && ! grep -q WARNING /tmp/b5.log || { cat /tmp/b5.log; exit 1; }

vmlab-guest unit-costs @WLAN@ | grep VMLAB

set -- $(vmlab-guest until "agent running" /tmp/agent.log qcom-reset run); P=$2; echo "VMLAB agent-start $1"
rss() { echo "$(grep -E '^(VmRSS|VmHWM)' /proc/$P/status | tr -s ' \t' ' ' | tr '\n' ' ')threads=$(ls /proc/$P/task | wc -l)"; }
cpu() { echo "$(cut -d' ' -f14,15 /proc/$P/stat) $(cat /proc/$P/task/*/status | awk '/ctxt_switches/ {s+=$2} END {print s}') $(vmlab-guest now)"; }
echo "VMLAB rss-start $(rss)"
# Past the blocking pool's 10 s keep-alive: the threads counted live through the window.
sleep 12
echo "VMLAB idle-before $(cpu)"; sleep @IDLE@; echo "VMLAB idle-after $(cpu)"
echo "VMLAB rss-idle $(rss)"

# Detection and overhead: the WLAN released @RELEASES@ times, each once the last is answered.
$BT -e 'kretprobe:vfio_pci_core_disable { printf("%llu\n", nsecs); }' 2>/dev/null | vmlab-guest stamp > /tmp/bt.txt &
wait_for /tmp/bt.txt Attaching 60 || exit 1
sleep 1
actions() { n=$(grep -c '"type":"action"' /tmp/journal.jsonl 2>/dev/null); echo ${n:-0}; }
until_actions() { vmlab-guest wait-count /tmp/journal.jsonl '"type":"action"' $1 || { echo "VMLAB no action $1"; tail -5 /tmp/agent.log; exit 1; }; }
for i in $(seq 1 @RELEASES@); do vmlab-guest vfio-cycle @WLAN@ > /dev/null; until_actions $i; done
kill -INT $(pidof bpftrace) 2>/dev/null; sleep 1
echo "VMLAB rss-after $(rss)"

# Scale: one modem, then all of them released at once (each has a mandated 2 s wait).
n=$(actions); t0=$(vmlab-guest now); vmlab-guest vfio-cycle @M1@ > /dev/null; until_actions $((n+1)); t1=$(vmlab-guest now)
echo "VMLAB one-card $(( (t1-t0)/1000000 ))"
n=$(actions); t0=$(vmlab-guest now); pids=""
for d in @MODEMS@; do vmlab-guest vfio-cycle $d > /dev/null & pids="$pids $!"; done
wait $pids; until_actions $((n+@N_MODEMS@)); t1=$(vmlab-guest now)
echo "VMLAB all-cards $(( (t1-t0)/1000000 ))"

# A non-target released as fast as the guest can: alone, then with a WLAN release in the middle.
echo "VMLAB flood-before $(cpu)"
vmlab-guest vfio-flood @OTHER@ @FLOOD@
echo "VMLAB flood-after $(cpu)"
n=$(actions)
echo "VMLAB flood-with-before $(cpu)"
vmlab-guest vfio-flood @OTHER@ @FLOOD@ & F=$!
sleep $((@FLOOD@ / 2)); vmlab-guest vfio-cycle @WLAN@ > /dev/null
wait $F; until_actions $((n+1))
echo "VMLAB flood-with-after $(cpu)"
echo "VMLAB flood-events $(grep '"type":"event"' /tmp/journal.jsonl | grep -c '"bdf":"@OTHER@"')"
echo "VMLAB lost $(grep -c 'events lost' /tmp/agent.log)"

kill -TERM $P; while kill -0 $P 2>/dev/null; do sleep 0.1; done
dump journal /tmp/journal.jsonl; dump bpftrace /tmp/bt.txt; head -30 /tmp/agent.log
