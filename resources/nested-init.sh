#!/bin/sh
# /init of the L1 guest for nested-KVM runs (copied into l1.cpio.gz by resources/build-nested-l1.sh).
#
# L0 is QEMU TCG with an emulated AMD SVM CPU; this L1 Debian 6.12 kernel loads kvm_amd with
# nested=1, which makes /dev/kvm real SVM KVM, so iovmm can boot a stock Linux L2 guest here.
#
# Console protocol (one line each, on the serial console):
#   NESTED-L1-READY kvm=<ok|missing> nested=<kvm_amd nested param|none> vhost-net=<ok|missing>
#                   cpus=<N> mem_kb=<MemTotal>
#   NESTED-L1-DONE rc=<exit status of sh /scenarios.sh>
#   NESTED-L1-ERROR <what failed>          (instead of DONE; then powers off)
# /scenarios.sh comes from a second cpio archive appended to the initrd. It runs with cwd /,
# PATH=/bin:/sbin:/usr/bin:/usr/sbin and the IOVMM_* variables exported below.
# This script never waits for input: it always ends in a power-off (QEMU -no-reboot then exits).

PATH=/bin:/sbin:/usr/bin:/usr/sbin
HOME=/tmp
export PATH HOME

power_off() {
    sync
    poweroff -f
    # Only reached if ACPI power-off failed: a reset also ends QEMU under -no-reboot.
    sleep 2
    reboot -f
}

fail() {
    echo "NESTED-L1-ERROR $*"
    if [ -r /proc/kmsg ]; then
        echo "nested-l1: last kernel messages:"
        dmesg 2>/dev/null | tail -n 15
    fi
    power_off
    exit 1
}

# The archive has no /dev/console node: take the one devtmpfs provides, before anything prints.
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1 || exit 1

mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount tmpfs /tmp"
mount -t tmpfs -o mode=755 tmpfs /run || fail "mount tmpfs /run"
mkdir -p /var/run/dpdk /run/dpdk || fail "mkdir /var/run/dpdk"

# kvm_amd refuses to load (ENODEV) when the CPU has no SVM: report kvm=missing, then fail below.
kvm_err=""
insmod /lib/modules/irqbypass.ko || kvm_err="insmod irqbypass.ko"
[ -n "$kvm_err" ] || insmod /lib/modules/kvm.ko || kvm_err="insmod kvm.ko"
[ -n "$kvm_err" ] || insmod /lib/modules/kvm-amd.ko nested=1 || kvm_err="insmod kvm-amd.ko nested=1"

# The vhost-net scenarios' modules after KVM's: tun, vhost_iotlb, vhost, tap, vhost_net (load-order).
while read -r m; do
    case "$m" in irqbypass.ko | kvm.ko | kvm_amd.ko) continue ;; esac
    insmod "/lib/modules/$m" || echo "nested-l1: insmod $m failed"
done </lib/modules/load-order
vhost_net=missing
[ -c /dev/vhost-net ] && [ -c /dev/net/tun ] && vhost_net=ok

kvm=missing
[ -c /dev/kvm ] && kvm=ok
nested=none
[ -r /sys/module/kvm_amd/parameters/nested ] && nested=$(cat /sys/module/kvm_amd/parameters/nested)
mem_kb=$(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo)
echo "NESTED-L1-READY kvm=$kvm nested=$nested vhost-net=$vhost_net cpus=$(nproc) mem_kb=$mem_kb"
[ -z "$kvm_err" ] || fail "$kvm_err"
[ "$kvm" = ok ] || fail "/dev/kvm missing after loading kvm-amd"

# DPDK PMD plugins for dpdk-testpmd: every shared object in /lib/dpdk, as -d options.
plugins=""
for p in /lib/dpdk/*.so*; do
    [ -f "$p" ] && plugins="$plugins -d $p"
done
[ -n "$plugins" ] || fail "no DPDK plugins in /lib/dpdk"
IOVMM_DPDK_PLUGINS=${plugins# }
IOVMM_L2_KERNEL=/l2/vmlinux
IOVMM_L2_INITRAMFS=/l2/initramfs.cpio.gz
IOVMM_TEST_GUEST=/l2/test-guest
# L1's TSC frequency in kHz (for the L2 command line's tsc_early_khz=), empty if not found.
IOVMM_L1_TSC_KHZ=$(dmesg | sed -n 's/.*tsc: Detected \([0-9]*\)\.\([0-9]\{3\}\).* MHz processor.*/\1\2/p' | head -n 1)
export IOVMM_DPDK_PLUGINS IOVMM_L2_KERNEL IOVMM_L2_INITRAMFS IOVMM_TEST_GUEST IOVMM_L1_TSC_KHZ
for f in "$IOVMM_L2_KERNEL" "$IOVMM_L2_INITRAMFS" "$IOVMM_TEST_GUEST" /bin/iovmm /bin/iovmm-test-backend /bin/iovmm-tap-peer /bin/dpdk-testpmd /bin/curl; do
    [ -f "$f" ] || fail "$f missing from the initramfs"
done

if [ -f /scenarios.sh ]; then
    cd / || fail "cd /"
    sh /scenarios.sh
    rc=$?
else
    echo "nested-l1: no /scenarios.sh (append a scenarios cpio to the initrd)"
    rc=0
fi
if [ "$rc" -ne 0 ]; then
    # With `quiet` the console showed none of these (kvm warnings, e.g. unhandled MSRs).
    echo "nested-l1: last kernel messages:"
    dmesg | tail -n 20
fi
echo "NESTED-L1-DONE rc=$rc"
power_off
