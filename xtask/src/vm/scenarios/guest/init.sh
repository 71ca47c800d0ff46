#!/bin/sh
export PATH=/bin NO_COLOR=1
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null; mount -t bpf bpf /sys/fs/bpf 2>/dev/null
echo "VMLAB init at $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"
for m in vfio-pci vfio_iommu_type1; do modprobe $m || echo "VMLAB modprobe $m failed"; done
sh /scenario.sh; rc=$?
echo "VMLAB-RC=$rc at $(cut -d' ' -f1 /proc/uptime)s"
sync; poweroff -f
