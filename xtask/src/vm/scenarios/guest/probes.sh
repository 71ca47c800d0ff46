
RP=0000:01:00.0; ROOT=$(dev_by_id 0x1234 0x11e8 0000:00:) || { echo "no root-bus edu"; exit 1; }
echo "edu behind a root port: $RP, edu on the root bus: $ROOT"
# A vfio-pci module loads only after the tracer started: its probes must attach when it appears.
# Built in (Ubuntu/Proxmox style), they attach at start from vmlinux BTF.
MOD=$(grep -c '^vfio_pci_core ' /proc/modules); echo "VMLAB vfio-module=$MOD"
[ "$MOD" = 1 ] && { rmmod vfio_pci vfio_pci_core || { echo "cannot unload vfio-pci"; exit 1; }; }
qcom-reset trace --all --json --flavour fentry > /tmp/auto.json 2>/tmp/auto.err & P=$!
wait_for /tmp/auto.json '"kind":"attach"' 60 || { cat /tmp/auto.err; exit 1; }
[ "$MOD" = 1 ] && modprobe vfio-pci
wait_for /tmp/auto.json '"function":"vfio_pci_core_disable"' 20 || { cat /tmp/auto.err; exit 1; }
echo 1 > /sys/bus/pci/devices/$RP/reset
bind_vfio $RP; vmlab-guest vfio-cycle $RP
echo "" > /sys/bus/pci/devices/$RP/reset_method
echo 1 > /sys/bus/pci/devices/$RP/reset 2>/dev/null && echo "VMLAB reset unexpectedly worked"
vmlab-guest vfio-cycle $RP
bind_vfio $ROOT; vmlab-guest vfio-cycle $ROOT
wait_for /tmp/auto.json "\"release\".*\"bdf\":\"$ROOT\"" 20
sleep 0.5; kill -INT $P; wait $P
dump trace-fentry /tmp/auto.json; cat /tmp/auto.err
echo default > /sys/bus/pci/devices/$RP/reset_method
qcom-reset trace --all --json > /tmp/kp.json 2>/tmp/kp.err & P=$!
wait_for /tmp/kp.json '"kind":"attach"' 60 || { cat /tmp/kp.err; exit 1; }
echo 1 > /sys/bus/pci/devices/$RP/reset
wait_for /tmp/kp.json '"pci_reset_function"' 20
sleep 0.5; kill -INT $P; wait $P
dump trace-auto /tmp/kp.json
