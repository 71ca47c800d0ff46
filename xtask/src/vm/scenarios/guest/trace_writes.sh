
T=/sys/kernel/tracing
echo mono > $T/trace_clock
for e in 'config pci_write_config dev=+0(+0($arg2)):string off=$arg5:s64 len=$arg6:u64' \
         'power_on pm_runtime_forbid dev=+0(+0($arg1)):string' \
         'power_auto pm_runtime_allow dev=+0(+0($arg1)):string'; do
  echo "p:qr/$e" >> $T/kprobe_events || { echo "VMLAB cannot add kprobe event $e"; exit 1; }
done
echo 1 > $T/events/qr/enable
