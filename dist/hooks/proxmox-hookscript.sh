#!/bin/sh
# Proxmox VE hookscript: copy to /var/lib/vz/snippets/qcom-reset.sh, chmod +x, then
#   qm set <vmid> --hookscript local:snippets/qcom-reset.sh
# pre-start:  reset supported Qualcomm devices passed to the VM (modems need it for first boot)
# post-stop:  reset them after the VM is gone (the agent would too; the per-device lock
#             serializes both). Devices not in qcom-reset's table are left alone.
set -u
QCOM_RESET=${QCOM_RESET:-/usr/local/bin/qcom-reset}
vmid="$1"; phase="$2"
case "$phase" in
  pre-start|post-stop) ;;
  *) exit 0 ;;
esac
# hostpci0: 0000:03:00.0,pcie=1   or   hostpci1: 03:00,pcie=1 (all functions: .0 assumed)
qm config "$vmid" | sed -n 's/^hostpci[0-9]*: *\([^,;]*\).*/\1/p' | while read -r dev; do
  case "$dev" in
    *:*:*.*) bdf=$dev ;;
    *:*.*) bdf="0000:$dev" ;;
    *:*) bdf="0000:$dev.0" ;;
    *) continue ;;   # a resource mapping name, not an address
  esac
  "$QCOM_RESET" reset "$bdf" --only-targets 2>&1 | logger -t "qcom-reset-hook[$vmid]"
done
exit 0
