#!/bin/busybox sh
# vmfactory guest init (PID 1 in the initramfs).
# Loads the virtio/ext4 modules in dependency order, mounts the read-only root
# image from /dev/vda, and hands PID 1 to the agent.  Any failure powers the VM
# off with one line on the console, so the host sees QEMU exit with a reason.
BB=/bin/busybox
$BB mount -t proc proc /proc
read INIT_UPTIME _rest < /proc/uptime
$BB mount -t sysfs sysfs /sys
$BB mount -t devtmpfs devtmpfs /dev
# Terminals for containers (run -t): the agent opens pseudo-terminal pairs here.
$BB mkdir -p /dev/pts
$BB mount -t devpts -o mode=0620,ptmxmode=0666 devpts /dev/pts

fail() {
    echo "vmfactory-init: FAILED: $*" > /dev/console
    $BB poweroff -f
}

CMDLINE=$($BB cat /proc/cmdline)
case " $CMDLINE " in
    *" vmfactory.probe=1 "*)
        # Acceleration probe: reaching here proves the kernel ran.
        echo "VMFACTORY-PROBE-OK" > /dev/console
        $BB poweroff -f ;;
esac

for m in $($BB cat /etc/modules.order); do
    $BB insmod "/lib/modules/$m.ko" || fail "insmod $m"
done

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 500 ] && fail "root device /dev/vda did not appear"
    $BB usleep 10000
done
$BB mount -t ext4 -o ro /dev/vda /newroot || fail "mount root image"
$BB mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
$BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp || fail "mount /tmp"
for fs in proc sys dev; do
    $BB mount --move /$fs /newroot/$fs || fail "move /$fs"
done

case " $CMDLINE " in
    *" vmfactory.agent=off "*)
        # Test hook: a VM whose agent never answers.
        echo "vmfactory-init: agent disabled" > /dev/console
        exec $BB switch_root /newroot /bin/busybox sleep 2147483647 ;;
esac

export VMF_INIT_UPTIME="$INIT_UPTIME" PYTHONPATH=/opt/vmfactory PYTHONDONTWRITEBYTECODE=1
export PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8
exec $BB switch_root /newroot /usr/bin/python3.11 -m vmfactory.guest.agent
