#!/bin/bash
# Builds the Linux test guest: kernel (bzImage + uncompressed ELF vmlinux) and a busybox initramfs.
#
# Usage: build-linux-guest.sh [OUTDIR]      (default: resources/out next to this script)
#
# Needs no root. Takes the newest Debian linux-image-6.12.*-cloud-amd64 package apt knows about
# (bookworm-backports/-security; run install-deps.sh first) and writes to OUTDIR:
#   bzImage            the kernel as shipped (/boot/vmlinuz-*)
#   vmlinux            the ELF kernel inside it (for 64-bit direct boot)
#   initramfs.cpio.gz  busybox userspace: /init mounts proc/sys/devtmpfs, loads virtio_iommu,
#                      virtio_blk, virtio_net, button, evdev (+deps), prints IOVMM-GUEST-READY and
#                      powers off (with `iovmm.poweroff=button` only once the ACPI power button
#                      was pressed: it reads KEY_POWER from the button's input device);
#                      with `iovmm.bench=net-tx iovmm.frames=N iovmm.size=S` on the kernel
#                      command line it first sends N UDP frames of S bytes on eth0 with
#                      /bin/iovmm-netbench (guest-netbench.c) and prints its IOVMM-BENCH line
#   kernel-version     the kernel release string
# Does nothing when all outputs exist and are newer than this script and guest-tools.py.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
OUTDIR=${1:-$SCRIPT_DIR/out}
TOOLS=$SCRIPT_DIR/guest-tools.py
NETBENCH=$SCRIPT_DIR/guest-netbench.c
# button: the ACPI power button (PNP0C0C, notified by iovmm's GED); evdev: its /dev/input node.
MODULES="virtio_iommu virtio_blk virtio_net button evdev"
MARKER=IOVMM-GUEST-READY
# Addresses of the net-tx workload (a documentation prefix; nothing answers).
GUEST_IP=192.0.2.15
PEER_IP=192.0.2.2
PEER_MAC=02:00:00:00:00:02
OUTPUTS="bzImage vmlinux initramfs.cpio.gz kernel-version"

die() {
    echo "build-linux-guest.sh: error: $*" >&2
    exit 1
}

print_outputs() {
    for f in $OUTPUTS; do
        printf '%s\t%s\n' "$OUTDIR/$f" "$(wc -c <"$OUTDIR/$f") bytes"
    done
    echo "kernel: $(cat "$OUTDIR/kernel-version")"
}

up_to_date() {
    for f in $OUTPUTS; do
        for src in "$SCRIPT_DIR/build-linux-guest.sh" "$TOOLS" "$NETBENCH"; do
            [ "$OUTDIR/$f" -nt "$src" ] || return 1
        done
    done
}

for tool in apt-get apt-cache dpkg-deb readelf cpio gzip zstd python3 gcc; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; run resources/install-deps.sh as root"
done

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if up_to_date; then
    echo "build-linux-guest.sh: outputs are up to date"
    print_outputs
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/iovmm-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
CACHE=$OUTDIR/cache
mkdir -p "$CACHE"

# apt-get download as root warns that its sandbox user cannot write here; root may write anyway.
apt_download() {
    if [ "$(id -u)" -eq 0 ]; then
        set -- -o APT::Sandbox::User=root "$@"
    fi
    (cd "$CACHE" && apt-get download -qq "$@") || die "apt-get download $* failed"
}

# Prints the package to use: the newest 6.12 cloud kernel, the -unsigned flavour when it exists.
pick_kernel_package() {
    names=$(apt-cache pkgnames linux-image-6.12. |
        grep -E '^linux-image-6\.12\.[0-9][^ ]*-cloud-amd64(-unsigned)?$' || true)
    [ -n "$names" ] || die "apt knows no linux-image-6.12.*-cloud-amd64 package; run resources/install-deps.sh (enables bookworm-backports)"
    newest=$(printf '%s\n' "$names" | sed 's/-unsigned$//' | sort -V | tail -n 1)
    if printf '%s\n' "$names" | grep -qx -- "$newest-unsigned"; then
        echo "$newest-unsigned"
    else
        echo "$newest"
    fi
}

# Prints the cached .deb of package $1, if any.
cached_deb() {
    for f in "$CACHE/$1"_*.deb; do
        if [ -f "$f" ]; then
            echo "$f"
            return
        fi
    done
}

# Extracts package $1 (downloaded into the cache unless already there) into directory $2.
fetch_and_extract() {
    deb=$(cached_deb "$1")
    if [ -z "$deb" ]; then
        apt_download "$1"
        deb=$(cached_deb "$1")
        [ -n "$deb" ] || die "apt-get download $1 produced no .deb in $CACHE"
    fi
    mkdir -p "$2"
    dpkg-deb -x "$deb" "$2" || die "cannot extract $deb"
}

build_kernel() {
    pkg=$(pick_kernel_package)
    echo "build-linux-guest.sh: using $pkg"
    fetch_and_extract "$pkg" "$WORK/kernel"
    set -- "$WORK"/kernel/boot/vmlinuz-*
    [ -f "$1" ] || die "$pkg contains no /boot/vmlinuz-*"
    KVER=${1##*/vmlinuz-}
    cp "$1" "$WORK/bzImage"
    python3 "$TOOLS" vmlinux "$WORK/bzImage" "$WORK/vmlinux" || die "cannot extract vmlinux from $1"
    header=$(readelf -h "$WORK/vmlinux") || die "readelf rejects the extracted vmlinux"
    printf '%s\n' "$header" | grep -q 'Type:.*EXEC' || die "extracted vmlinux is not an ELF executable"
    printf '%s\n' "$header" | grep -q 'Machine:.*X86-64' || die "extracted vmlinux is not an x86-64 ELF"
}

# Prints the path of a static busybox, downloading busybox-static when it is not installed.
static_busybox() {
    status=$(dpkg-query -W -f '${db:Status-Status}' busybox-static 2>/dev/null || true)
    if [ "$status" = installed ] && [ -x /bin/busybox ]; then
        echo /bin/busybox
        return
    fi
    fetch_and_extract busybox-static "$WORK/busybox" >&2
    echo "$WORK/busybox/bin/busybox"
}

write_init() {
    cat >"$1" <<INIT
#!/bin/sh
# iovmm test guest init, generated by resources/build-linux-guest.sh.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The archive has no /dev/console node; use the one devtmpfs provides.
exec </dev/console >/dev/console 2>&1
echo "iovmm-init: started at uptime \$(cut -d' ' -f1 /proc/uptime) s"
while read -r m; do
    insmod "/lib/modules/\$m" || echo "iovmm-init: insmod \$m failed"
done </lib/modules/load-order
echo "iovmm-init: modules loaded: \$(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "iovmm-init: cpus online: \$(cat /sys/devices/system/cpu/online) processors: \$(grep -c ^processor /proc/cpuinfo)"
echo "iovmm-init: clocksource: \$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
# The kernel's lines about the devices iovmm emulates (the harness runs the guest with quiet).
dmesg | grep -E 'iommu|IOMMU|DMAR|virtio|rtc|clocksource|tsc:|smpboot' | sed 's/^/iovmm-init: dmesg: /'
# Optional workload: iovmm.bench=net-tx iovmm.frames=N iovmm.size=S on the kernel command line.
bench=""
frames=1000
size=1024
poweroff=now
for arg in \$(cat /proc/cmdline); do
    case "\$arg" in
    iovmm.poweroff=*) poweroff=\${arg#*=} ;;
    iovmm.bench=*) bench=\${arg#*=} ;;
    iovmm.frames=*) frames=\${arg#*=} ;;
    iovmm.size=*) size=\${arg#*=} ;;
    iovmm.qdisc=*) echo "\${arg#*=}" >/proc/sys/net/core/default_qdisc ;;
    iovmm.tx_cpus=*) export IOVMM_SPREAD_CPUS=\${arg#*=} ;;
    esac
done
case "\$bench" in
"") ;;
net-tx)
    # No IPv6 (its router/neighbour solicitations would be extra frames) and a permanent
    # neighbour entry (no ARP): the device sees exactly the benchmark's frames.
    echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6
    echo 1 >/proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null
    ip addr add $GUEST_IP/24 dev eth0 &&
        ip link set eth0 up &&
        arp -i eth0 -s $PEER_IP $PEER_MAC ||
        echo "iovmm-init: eth0 setup failed"
    /bin/iovmm-netbench $PEER_IP 9 "\$frames" "\$size" eth0 ||
        echo "iovmm-init: net-tx benchmark failed"
    ;;
net-rx)
    # The back end's generated frames (ethertype 0x88b5) into device-writable RX buffers; the
    # receiver opens its socket before it brings eth0 up, so it sees every frame.
    echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6
    echo 1 >/proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null
    /bin/iovmm-netbench --rx "\$frames" "\$size" eth0 ||
        echo "iovmm-init: net-rx benchmark failed"
    ;;
blk)
    # A random pattern written over the first part of /dev/vda, synced, the page cache dropped,
    # then read back from the device and compared (device writes into guest memory on reads).
    blocks=\$((frames < 16 ? 16 : frames))
    t0=\$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/urandom of=/tmp/pattern bs=64k count="\$blocks" 2>/dev/null &&
        dd if=/tmp/pattern of=/dev/vda bs=64k 2>/dev/null && sync && blockdev --flushbufs /dev/vda &&
        echo 3 >/proc/sys/vm/drop_caches || echo "iovmm-init: blk write failed"
    t1=\$(cut -d' ' -f1 /proc/uptime)
    want=\$(md5sum </tmp/pattern | cut -d' ' -f1)
    got=\$(dd if=/dev/vda bs=64k count="\$blocks" 2>/dev/null | md5sum | cut -d' ' -f1)
    t2=\$(cut -d' ' -f1 /proc/uptime)
    same=false
    [ "\$want" = "\$got" ] && same=true
    echo "IOVMM-BENCH {\"bench\":\"blk\",\"bytes\":\$((blocks * 65536)),\"match\":\$same,\"write_s\":\$(awk "BEGIN { print \$t1 - \$t0 }"),\"read_s\":\$(awk "BEGIN { print \$t2 - \$t1 }")}"
    ;;
*) echo "iovmm-init: unknown iovmm.bench=\$bench (known: net-tx, net-rx, blk)" ;;
esac
grep eth0 /proc/net/dev | tr -s ' ' | sed 's/^/iovmm-init: netdev: /'
# Interrupts the devices raised (MSI-X vectors per queue), for the harness's failure reports.
grep -E 'virtio|MSI|IR-' /proc/interrupts | tr -s ' ' | sed 's/^/iovmm-init: interrupts: /'
echo $MARKER
# iovmm.poweroff=button: power off only when the ACPI power button is pressed. The kernel's
# button driver reports it as KEY_POWER on its input device (it does not power off by itself):
# read struct input_event records (x86-64: 16 bytes of time, u16 type, u16 code, s32 value)
# until EV_KEY (1) KEY_POWER (116).
if [ "\$poweroff" = button ]; then
    dev=""
    for e in /sys/class/input/event*; do
        [ "\$(cat "\$e/device/name" 2>/dev/null)" = "Power Button" ] && dev=/dev/input/\${e##*/}
    done
    # The device is opened once, before the ready line, so a press that comes at once is
    # queued; dd reads one record per call from the subshell's standard input.
    if [ -n "\$dev" ]; then
        (
            echo "iovmm-init: waiting for the power button on \$dev"
            while :; do
                set -- \$(dd bs=24 count=1 2>/dev/null | od -An -tu2 -j16 -N4)
                [ "\$#" -eq 2 ] || { echo "iovmm-init: cannot read \$dev"; break; }
                [ "\$1" = 1 ] && [ "\$2" = 116 ] && { echo "iovmm-init: power button pressed"; break; }
            done
        ) <"\$dev" || echo "iovmm-init: cannot open \$dev"
    else
        echo "iovmm-init: no power button input device (button.ko not bound?)"
    fi
fi
poweroff -f
INIT
    chmod 755 "$1"
}

build_initramfs() {
    root=$WORK/initramfs
    mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/lib/modules"
    bb=$(static_busybox)
    cp "$bb" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    mkdir -p "$root/usr"
    ln -s bin "$root/sbin"
    ln -s ../bin "$root/usr/bin"
    ln -s ../bin "$root/usr/sbin"
    # shellcheck disable=SC2086 # the module list is split on purpose
    python3 "$TOOLS" modules "$WORK/kernel/lib/modules/$KVER" "$root/lib/modules" $MODULES ||
        die "cannot collect kernel modules $MODULES"
    gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/iovmm-netbench" "$NETBENCH" ||
        die "cannot build $NETBENCH (needs gcc and the static C library, libc6-dev)"
    write_init "$root/init"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9 -n >"$WORK/initramfs.cpio.gz" ||
        die "cannot create the initramfs archive"
}

build_kernel
build_initramfs
echo "$KVER" >"$WORK/kernel-version"
for f in $OUTPUTS; do
    mv "$WORK/$f" "$OUTDIR/$f"
done
print_outputs
