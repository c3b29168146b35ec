#!/bin/bash
# Builds the L1 guest of nested-KVM runs: the initramfs and kernel that QEMU TCG (L0, emulated AMD
# SVM) boots so that iovmm can run inside it on real KVM (kvm_amd nested=1) and boot Linux as L2.
#
# Usage: build-nested-l1.sh [OUTDIR]      (default: resources/out/nested next to this script)
#
# Needs no root once the packages are installed (install-deps.sh) and the Linux guest is built
# (build-linux-guest.sh). Inputs:
#   resources/out/{bzImage,vmlinux,initramfs.cpio.gz,kernel-version} and the kernel .deb in
#     resources/out/cache/ (from build-linux-guest.sh)
#   iovmm and iovmm-test-backend from $IOVMM_BIN_DIR; when it is unset the script first runs
#     `cargo build --release -p vmm -p integration-tests --bin iovmm --bin iovmm-test-backend
#     --bin iovmm-tap-peer --bin iovmm-test-guest-path` (the tap peer of the vhost-net
#     scenarios; the fast test guest ELF that iovmm-test-guest-path names)
#     and takes them from target/release (or $CARGO_TARGET_DIR/release)
#   dpdk-testpmd (dpdk-dev) with its PMD plugins librte_mempool_ring and librte_net_vhost,
#     curl (the API client of the shutdown scenario), busybox (busybox-static), nested-init.sh
#     (becomes /init)
# Writes to OUTDIR:
#   l1.cpio.gz  newc cpio, gzip: busybox, /init,
#               /bin/{iovmm,iovmm-test-backend,iovmm-tap-peer,dpdk-testpmd,curl},
#               the DPDK plugins in /lib/dpdk/, every shared library they need in
#               /lib/x86_64-linux-gnu/ (loader at its own path), /lib/modules/*.ko (kvm, kvm-amd,
#               irqbypass, tun, vhost, vhost_net, vhost_iotlb and deps, uncompressed; load order
#               in /lib/modules/load-order), the L2 guest in /l2/{vmlinux,initramfs.cpio.gz}, the
#               fast test guest in /l2/test-guest
#   bzImage     the L1 kernel (the same Debian 6.12 cloud kernel as the L2 guest)
# Does nothing when both outputs are newer than every input.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
GUEST=$SCRIPT_DIR/out
OUTDIR=${1:-$GUEST/nested}
INIT=$SCRIPT_DIR/nested-init.sh
TOOLS=$SCRIPT_DIR/guest-tools.py
MODULES="irqbypass kvm kvm_amd tun vhost vhost_net vhost_iotlb"
PLUGINS="librte_mempool_ring librte_net_vhost"
OUTPUTS="l1.cpio.gz bzImage"

die() {
    echo "build-nested-l1.sh: error: $*" >&2
    exit 1
}

for tool in cpio gzip ldd strip dpkg-deb python3 readelf; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; run resources/install-deps.sh as root"
done
for f in bzImage vmlinux initramfs.cpio.gz kernel-version; do
    [ -s "$GUEST/$f" ] || die "$GUEST/$f missing; run resources/build-linux-guest.sh first"
done
KVER=$(cat "$GUEST/kernel-version")
KDEB=""
for f in "$GUEST/cache/linux-image-$KVER"_*.deb "$GUEST/cache/linux-image-$KVER-unsigned"_*.deb; do
    if [ -f "$f" ]; then KDEB=$f; fi
done
[ -n "$KDEB" ] || die "no linux-image-$KVER .deb in $GUEST/cache; run resources/build-linux-guest.sh first"

# iovmm binaries: built here unless the caller names a directory that already has them.
if [ -n "${IOVMM_BIN_DIR:-}" ]; then
    BIN_DIR=$IOVMM_BIN_DIR
else
    command -v cargo >/dev/null 2>&1 || die "cargo not found (or set IOVMM_BIN_DIR to a directory with iovmm and iovmm-test-backend)"
    echo "build-nested-l1.sh: cargo build --release (iovmm, iovmm-test-backend)"
    (cd "$REPO" && cargo build --release -p vmm -p integration-tests --bin iovmm --bin iovmm-test-backend --bin iovmm-tap-peer --bin iovmm-test-guest-path) ||
        die "cargo build failed (set IOVMM_BIN_DIR to use already built binaries)"
    BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/release
fi
for b in iovmm iovmm-test-backend iovmm-tap-peer iovmm-test-guest-path; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing or not executable"
done
# The fast test guest (tests/guest, built by tests/build.rs) for the use-after-unmap scenarios.
TEST_GUEST=$("$BIN_DIR/iovmm-test-guest-path") || die "$BIN_DIR/iovmm-test-guest-path failed"
[ -f "$TEST_GUEST" ] || die "the fast test guest $TEST_GUEST is missing; build the integration-tests package"


# ldconfig lives in /sbin, which is not on a normal user's PATH.
LDCONFIG=$(PATH=$PATH:/usr/sbin:/sbin command -v ldconfig || true)
[ -n "$LDCONFIG" ] || die "ldconfig not found (package libc-bin)"
TESTPMD=$(command -v dpdk-testpmd 2>/dev/null || true)
[ -n "$TESTPMD" ] || die "dpdk-testpmd not found; run resources/install-deps.sh (package dpdk-dev)"
TESTPMD=$(readlink -f "$TESTPMD")
CURL=$(command -v curl 2>/dev/null || true)
[ -n "$CURL" ] || die "curl not found; run resources/install-deps.sh (package curl)"
CURL=$(readlink -f "$CURL")
# The plugins' ABI suffix is the one of the EAL testpmd links (bookworm's DPDK 22.11: .so.23).
ABI=$(ldd "$TESTPMD" | sed -n 's/^[[:space:]]*librte_eal\.so\.\([0-9]*\) =>.*/\1/p')
[ -n "$ABI" ] || die "cannot find librte_eal.so.N among $TESTPMD's libraries"
PLUGIN_FILES=""
for p in $PLUGINS; do
    path=$("$LDCONFIG" -p | awk -v n="$p.so.$ABI" '$1 == n && !found { print $NF; found = 1 }')
    [ -n "$path" ] || die "$p.so.$ABI not found by ldconfig; install the DPDK packages (dpdk-dev)"
    PLUGIN_FILES="$PLUGIN_FILES $(readlink -f "$path")"
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing; run resources/install-deps.sh (package busybox-static)"
case $(readelf -l "$BUSYBOX") in
*INTERP*) die "$BUSYBOX is dynamically linked; install busybox-static" ;;
esac

INPUTS="$SCRIPT_DIR/build-nested-l1.sh $INIT $TOOLS $GUEST/bzImage $GUEST/vmlinux
    $GUEST/initramfs.cpio.gz $GUEST/kernel-version $KDEB $BIN_DIR/iovmm $BIN_DIR/iovmm-test-backend
    $BIN_DIR/iovmm-tap-peer $TEST_GUEST
    $TESTPMD $CURL $PLUGIN_FILES $BUSYBOX"

print_outputs() {
    for f in $OUTPUTS; do
        printf '%s\t%s\n' "$OUTDIR/$f" "$(wc -c <"$OUTDIR/$f") bytes"
    done
}

up_to_date() {
    for f in $OUTPUTS; do
        for src in $INPUTS; do
            [ "$OUTDIR/$f" -nt "$src" ] || return 1
        done
    done
}

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if up_to_date; then
    echo "build-nested-l1.sh: outputs are up to date"
    print_outputs
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/iovmm-nested.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
root=$WORK/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,var/run/dpdk,l2,lib/dpdk,lib/x86_64-linux-gnu}

# busybox and its applets at their usual paths.
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [ "$applet" = bin/busybox ] || [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# ELF programs: iovmm's without debug info (they carry ~25 MB of it), DPDK's as packaged.
strip --strip-debug -o "$root/bin/iovmm" "$BIN_DIR/iovmm" || die "strip $BIN_DIR/iovmm failed"
strip --strip-debug -o "$root/bin/iovmm-test-backend" "$BIN_DIR/iovmm-test-backend" ||
    die "strip $BIN_DIR/iovmm-test-backend failed"
strip --strip-debug -o "$root/bin/iovmm-tap-peer" "$BIN_DIR/iovmm-tap-peer" ||
    die "strip $BIN_DIR/iovmm-tap-peer failed"
cp "$TESTPMD" "$root/bin/dpdk-testpmd"
cp "$CURL" "$root/bin/curl"
for f in $PLUGIN_FILES; do
    name=$(basename "$f")
    cp "$f" "$root/lib/dpdk/${name%.*}" # librte_x.so.23.0 -> librte_x.so.23
done

# Shared libraries, resolved by the host's loader: the loader at its own path, the rest flat in
# /lib/x86_64-linux-gnu (a default directory of Debian's loader; no ld.so.cache needed). Libraries
# found through testpmd's RUNPATH (dpdk/pmds-23.0) land there too, so EAL's plugin directory does
# not exist in L1 and only the -d plugins are loaded.
copy_libs() {
    out=$(ldd "$1") || die "ldd $1 failed"
    if printf '%s\n' "$out" | grep -q 'not found'; then
        die "$1 needs libraries this machine lacks: $(printf '%s\n' "$out" | grep 'not found' | tr -s ' \t\n' ' ')"
    fi
    printf '%s\n' "$out" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
        while read -r lib; do
            case "$lib" in
            */ld-linux*) dest=$root$lib ;;
            *) dest=$root/lib/x86_64-linux-gnu/$(basename "$lib") ;;
            esac
            if [ ! -e "$dest" ]; then
                mkdir -p "$(dirname "$dest")"
                cp -L "$lib" "$dest" || die "cannot copy $lib"
            fi
        done
}
for elf in "$BIN_DIR/iovmm" "$BIN_DIR/iovmm-test-backend" "$BIN_DIR/iovmm-tap-peer" "$TESTPMD" "$CURL" $PLUGIN_FILES; do
    copy_libs "$elf"
done

# Kernel modules from the kernel package, uncompressed, dependencies first in load-order.
mkdir -p "$WORK/kernel"
dpkg-deb -x "$KDEB" "$WORK/kernel" || die "cannot extract $KDEB"
# shellcheck disable=SC2086 # the module list is split on purpose
python3 "$TOOLS" modules "$WORK/kernel/lib/modules/$KVER" "$root/lib/modules" $MODULES ||
    die "cannot collect kernel modules $MODULES"
ln -s kvm_amd.ko "$root/lib/modules/kvm-amd.ko"
cp "$GUEST/bzImage" "$WORK/bzImage"

cp "$GUEST/vmlinux" "$GUEST/initramfs.cpio.gz" "$root/l2/"
cp "$TEST_GUEST" "$root/l2/test-guest"
cp "$INIT" "$root/init"
chmod 755 "$root/init"

# The image must run: check every program's libraries against the image itself.
for elf in "$root"/bin/iovmm "$root"/bin/iovmm-test-backend "$root"/bin/iovmm-tap-peer "$root"/bin/dpdk-testpmd "$root"/bin/curl "$root"/lib/dpdk/*; do
    interp=$(readelf -l "$elf" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    [ -z "$interp" ] || [ -e "$root$interp" ] || die "${elf#"$root"}: loader $interp missing from the image"
    for need in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        case "$need" in ld-linux*) continue ;; esac # the loader itself, already mapped
        [ -e "$root/lib/x86_64-linux-gnu/$need" ] || die "${elf#"$root"}: $need missing from the image"
    done
done

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 -n >"$WORK/l1.cpio.gz" ||
    die "cannot create the L1 initramfs"
for f in $OUTPUTS; do
    mv "$WORK/$f" "$OUTDIR/$f"
done
echo "build-nested-l1.sh: DPDK plugins: $(cd "$root" && echo lib/dpdk/* | sed 's,lib/,/lib/,g')"
print_outputs
