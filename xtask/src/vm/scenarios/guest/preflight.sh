
echo "VMLAB vfio-module=$(grep -c '^vfio_pci_core ' /proc/modules)"
qcom-reset check > /tmp/check.txt 2>&1; echo "check-rc=$?" >> /tmp/check.txt
dump check /tmp/check.txt
timeout 20 qcom-reset run > /tmp/run.txt 2>&1; echo "run-rc=$?" >> /tmp/run.txt
dump run /tmp/run.txt
