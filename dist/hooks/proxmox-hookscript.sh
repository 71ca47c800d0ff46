#!/bin/sh
# Proxmox VE hookscript (installed as /usr/share/qcom-reset/proxmox-hookscript.sh): copy it to a
# snippets storage, e.g. /var/lib/vz/snippets/qcom-reset.sh, then
#   qm set <vmid> --hookscript local:snippets/qcom-reset.sh
# pre-start:  reset supported Qualcomm devices passed to the VM (modems need it for first boot);
#             if one is not clean afterwards (link down, firmware still running or crashed), the
#             VM is not started: exit 1 with one line naming the device and its verdict.
# post-stop:  reset them after the VM is gone (the agent would too; the per-device lock
#             serializes both). Devices not in qcom-reset's table are left alone.
set -u
QCOM_RESET=${QCOM_RESET:-/usr/bin/qcom-reset}
vmid="$1"; phase="$2"
case "$phase" in
  pre-start|post-stop) ;;
  *) exit 0 ;;
esac
# hostpci0: 0000:03:00.0,pcie=1   or   hostpci1: 03:00,pcie=1 (all functions: .0 assumed)
devs=$(qm config "$vmid" | sed -n 's/^hostpci[0-9]*: *\([^,;]*\).*/\1/p')
refused=0
for dev in $devs; do
  case "$dev" in
    *:*:*.*) bdf=$dev ;;
    *:*.*) bdf="0000:$dev" ;;
    *:*) bdf="0000:$dev.0" ;;
    *) continue ;;   # a resource mapping name, not an address
  esac
  out=$("$QCOM_RESET" reset "$bdf" --only-targets 2>&1); rc=$?
  printf '%s\n' "$out" | logger -t "qcom-reset-hook[$vmid]"
  if [ "$phase" = pre-start ] && [ "$rc" -ne 0 ]; then
    why=$(printf '%s\n' "$out" | sed -n 's/^ *verdict: //p' | head -n 1)
    [ -n "$why" ] || why=$(printf '%s\n' "$out" | tail -n 1)
    echo "qcom-reset: not starting VM $vmid: $bdf is not clean: $why" >&2
    refused=1
  fi
done
exit "$refused"
