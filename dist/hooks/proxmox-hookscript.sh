#!/bin/sh
# Proxmox VE hookscript (installed as /usr/share/qcom-reset/proxmox-hookscript.sh). Copy it to a
# storage with the "snippets" content type on every node that may run the VM (or to shared
# storage), e.g.
#   pvesm set local --content iso,vztmpl,backup,snippets
#   cp /usr/share/qcom-reset/proxmox-hookscript.sh /var/lib/vz/snippets/qcom-reset.sh
#   qm set <vmid> --hookscript local:snippets/qcom-reset.sh
# Called as: qcom-reset.sh <vmid> <phase> (PVE::GuestHelpers::exec_hookscript; stdin is empty).
#
# pre-start   reset the Qualcomm cards passed to the VM (a modem needs it for first boot).
#             qemu-server's vm_start_nolock (PVE/QemuServer.pm) runs the pre-start hookscript
#             first, with stop-on-error set: a non-zero exit aborts the start and its stderr is
#             in the task log. Only afterwards does it build the command line and call
#             PVE::QemuServer::PCI::prepare_pci_device for each hostpci device, which binds it to
#             vfio-pci (PVE::SysFSTools::pci_dev_group_bind_to_vfio, pci_dev_bind_to_vfio). So a
#             card that rests on ath11k_pci/mhi-pci-generic is still on it here: qcom-reset
#             refuses (exit 4) and writes nothing; a card pre-bound to vfio-pci (vfio-pci.ids=,
#             driverctl) is reset.
#             The VM is refused only on a definite verdict that the card is not usable: exit 3,
#             the reset ran and the card is not clean afterwards. Then one line on stderr names
#             the device and its verdict, and the hookscript exits 1. Anything else (refused,
#             busy, error, not root, qcom-reset missing) lets the VM start, with one warning line
#             in syslog naming the device and the reason.
#             QCOM_RESET_PRESTART=never in /etc/default/qcom-reset never refuses a VM (the
#             default, refuse-not-clean, is the behaviour above).
# post-stop   reset them after the VM is gone (vm_stop_cleanup, after QEMU exited; PVE leaves the
#             cards on vfio-pci); never fails.
#
# Devices: hostpciN: 0000:03:00.0 / 03:00 (function .0 assumed) / a;b (several devices) /
# host=... / mapping=<name> (PVE 8 resource mappings: the map entries for this node, from
# `pvesh get /cluster/mapping/pci/<name>`; several entries for one node are alternatives, of which
# qemu-server picks the first free one, so the VM is refused only if every alternative has a card
# that is not clean). Devices not in qcom-reset's table are left alone (--only-targets). Nothing is
# printed on stdout; qcom-reset's output goes to syslog.
set -u
set -f
QCOM_RESET=${QCOM_RESET:-/usr/bin/qcom-reset}
QCOM_RESET_DEFAULTS=${QCOM_RESET_DEFAULTS:-/etc/default/qcom-reset}
vmid="${1:-}"; phase="${2:-}"
case "$phase" in
  pre-start|post-stop) ;;
  *) exit 0 ;;
esac
# A snippet outlives the package: without qcom-reset there is nothing to do.
[ -x "$QCOM_RESET" ] || exit 0
tag="qcom-reset-hook[$vmid]"
log() { logger -p "user.$1" -t "$tag" "$phase: $2"; }

prestart=refuse-not-clean
if [ -r "$QCOM_RESET_DEFAULTS" ]; then
  v=$(sed -n 's/^[[:space:]]*QCOM_RESET_PRESTART=//p' "$QCOM_RESET_DEFAULTS" | tail -n 1 |
    sed "s/[[:space:]]*#.*//; s/^[\"']//; s/[\"']\$//")
  case "$v" in
    '') ;;
    refuse-not-clean|never) prestart=$v ;;
    *) log warning "QCOM_RESET_PRESTART=$v in $QCOM_RESET_DEFAULTS is neither refuse-not-clean nor never: using refuse-not-clean" ;;
  esac
fi

# The reason a reset did not leave the card clean, from its exit status and output.
why() {
  last=$(printf '%s\n' "$2" | sed '/^[[:space:]]*$/d' | tail -n 1)
  case "$1" in
    1) echo "error (exit 1)${last:+: $last}" ;;
    2) echo "usage error (exit 2; is qcom-reset older than this hook?)${last:+: $last}" ;;
    3) v=$(printf '%s\n' "$2" | sed -n 's/^ *verdict: //p' | head -n 1); echo "${v:-$last}" ;;
    4) echo "refused, nothing written (exit 4)${last:+: $last}" ;;
    69) echo "unavailable on this host (exit 69)${last:+: $last}" ;;
    75) echo "busy, nothing written (exit 75)${last:+: $last}" ;;
    77) echo "not run as root (exit 77)" ;;
    78) echo "invalid configuration (exit 78)${last:+: $last}" ;;
    126|127) echo "could not run $QCOM_RESET (exit $1)" ;;
    *) echo "unexpected exit $1${last:+: $last}" ;;
  esac
}

# 0000:03:00.0, 03:00.0, 0000:03:00, 03:00 -> 0000:03:00.0
bdf_of() {
  p=$(printf '%s' "$1" | tr 'A-F' 'a-f')
  case "$p" in
    *:*:*.*) echo "$p" ;;
    *:*:*) echo "$p.0" ;;
    *:*.*) echo "0000:$p" ;;
    *:*) echo "0000:$p.0" ;;
    *) return 1 ;;
  esac
}

# The paths of a resource mapping's entries for this node, one line per entry (an entry may list
# several devices, separated by ';'). PVE names nodes by their short host name.
node=$(hostname 2>/dev/null || uname -n); node=${node%%.*}
mapping_paths() {
  pvesh get "/cluster/mapping/pci/$1" --output-format json 2>/dev/null |
    perl -MJSON::PP -e '
      my $d = eval { decode_json(do { local $/; <STDIN> }) } or exit 1;
      for my $m (@{ $d->{map} || [] }) {
        my %e = map { /^([^=]+)=(.*)$/ ? ($1, $2) : () } split /,/, $m;
        print "$e{path}\n" if defined $e{path} && ($e{node} // "") eq $ARGV[0];
      }' "$node"
}

# qm config prints "hostpciN: <property string>"; --current: the devices the VM has (post-stop)
# or is about to get (vm_start_nolock applies pending changes before pre-start).
if ! config=$(qm config "$vmid" --current 1 2>&1); then
  log warning "qm config $vmid failed, nothing reset: $(printf '%s\n' "$config" | tail -n 1)"
  exit 0
fi
entries=$(printf '%s\n' "$config" | sed -n 's/^\(hostpci[0-9]*\): *\([^ ]*\)$/\1|\2/p')
refusal=""
for entry in $entries; do
  key=${entry%%|*}
  host=""; mapping=""
  oldifs=$IFS; IFS=,
  for f in ${entry#*|}; do
    case "$f" in
      host=*) host=${f#host=} ;;
      mapping=*) mapping=${f#mapping=} ;;
      *=*) ;;
      *) host=$f ;;
    esac
  done
  IFS=$oldifs
  if [ -n "$mapping" ]; then
    alternatives=$(mapping_paths "$mapping")
    if [ -z "$alternatives" ]; then
      log warning "$key: mapping $mapping has no device on node $node (pvesh get /cluster/mapping/pci/$mapping): nothing reset"
      continue
    fi
  else
    alternatives=$host
  fi

  # Every device of every alternative is reset; the entry is refused only if each alternative
  # has a device that is definitely not clean.
  n_alt=0; n_bad=0; bad=""
  for alt in $alternatives; do
    n_alt=$((n_alt + 1)); alt_bad=""
    oldifs=$IFS; IFS=';'
    for path in $alt; do
      IFS=$oldifs
      bdf=$(bdf_of "$path") || { log warning "$key: cannot read '$path' as a PCI address: skipped"; continue; }
      out=$("$QCOM_RESET" reset "$bdf" --only-targets 2>&1); rc=$?
      [ -z "$out" ] || printf '%s\n' "$out" | logger -p user.info -t "$tag"
      if [ "$rc" -eq 3 ] && [ "$phase" = pre-start ]; then
        alt_bad="${alt_bad:+$alt_bad; }$bdf is not clean: $(why "$rc" "$out")"
      elif [ "$rc" -eq 3 ]; then
        log warning "$bdf: not clean after the reset (exit 3): $(why "$rc" "$out")"
      elif [ "$rc" -ne 0 ]; then
        if [ "$phase" = pre-start ]; then
          log warning "$bdf: not reset, starting VM $vmid anyway: $(why "$rc" "$out")"
        else
          log warning "$bdf: $(why "$rc" "$out")"
        fi
      fi
    done
    IFS=$oldifs
    [ -z "$alt_bad" ] || { n_bad=$((n_bad + 1)); bad="${bad:+$bad; }$alt_bad"; }
  done
  [ -n "$bad" ] || continue
  if [ "$n_bad" -lt "$n_alt" ]; then
    log warning "$bad; starting VM $vmid: $key has another alternative on this node"
  elif [ "$prestart" = never ]; then
    log warning "$bad; starting VM $vmid anyway (QCOM_RESET_PRESTART=never)"
  else
    refusal="${refusal:+$refusal; }$bad"
  fi
done

[ -n "$refusal" ] || exit 0
log err "not starting VM $vmid: $refusal"
echo "qcom-reset: not starting VM $vmid: $refusal" >&2
exit 1
