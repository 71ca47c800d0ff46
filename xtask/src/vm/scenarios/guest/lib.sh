
dev_by_id() { for d in /sys/bus/pci/devices/$3*; do [ "$(cat $d/vendor)" = "$1" ] && [ "$(cat $d/device)" = "$2" ] && { basename $d; return 0; }; done; return 1; }
bind_vfio() { echo vfio-pci > /sys/bus/pci/devices/$1/driver_override; [ -e /sys/bus/pci/devices/$1/driver ] && echo $1 > /sys/bus/pci/devices/$1/driver/unbind; echo $1 > /sys/bus/pci/drivers_probe; }
wait_for() { i=0; while ! grep -q "$2" "$1" 2>/dev/null; do i=$((i+1)); [ $i -gt $(($3*10)) ] && { echo "VMLAB timeout waiting for $2 in $1"; return 1; }; sleep 0.1; done; }
dump() { echo "VMLAB-BEGIN $1"; cat "$2"; echo; echo "VMLAB-END $1"; }
pci_command() { dd if=/sys/bus/pci/devices/$1/config bs=1 skip=4 count=2 2>/dev/null | od -An -tx2 | tr -d ' '; }
