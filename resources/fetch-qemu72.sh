#!/bin/bash
# Fetches Debian bookworm's QEMU 7.2 (the benchmark's reference VMM) without installing it.
#
# Usage: fetch-qemu72.sh [OUTDIR]      (default: resources/out/qemu-7.2 next to this script)
#
# Installing bookworm's qemu-system-x86 7.2 would conflict with the bookworm-backports QEMU, so
# this script only `apt-get download`s the exact 7.2 packages (qemu-system-x86, -common, -data)
# and bookworm's seabios, and unpacks them with `dpkg-deb -x` into OUTDIR. Run the result as
#
#   QEMU_MODULE_DIR=OUTDIR/usr/lib/x86_64-linux-gnu/qemu OUTDIR/usr/bin/qemu-system-x86_64 \
#       -L OUTDIR/usr/share/qemu -L OUTDIR/usr/share/seabios -nodefaults ...
#
# (QEMU_MODULE_DIR keeps it from loading the installed QEMU's modules; give virtio-net-pci
# `romfile=` because no iPXE ROMs are fetched). OUTDIR/qemu72 is a wrapper doing exactly that.
# The shared libraries it needs come from `install-deps.sh --with-qemu`.
# Needs no root. Does nothing when OUTDIR already holds a working 7.2.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
OUTDIR=${1:-$SCRIPT_DIR/out/qemu-7.2}
# Debian bookworm's QEMU 7.2 versions look like 1:7.2+dfsg-7+deb12u18 (arch: all) or
# 1:7.2+dfsg-7+deb12u18+b3 (binary rebuilds); backports versions never match.
QEMU_VERSION_RE='^1:7\.2\+dfsg-7\+deb12u[0-9]+(\+b[0-9]+)?$'
QEMU_PACKAGES="qemu-system-x86 qemu-system-common qemu-system-data"
# bookworm's own seabios (the backports one is newer than what 7.2 shipped with).
SEABIOS_VERSION_RE='^1\.16\.[0-9.]+-[0-9]+$'

die() {
    echo "fetch-qemu72.sh: error: $*" >&2
    exit 1
}

for tool in apt-get apt-cache dpkg-deb ldd sort; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; this script needs Debian's apt tools"
done

BIN=$OUTDIR/usr/bin/qemu-system-x86_64
MODDIR=$OUTDIR/usr/lib/x86_64-linux-gnu/qemu

# Prints the version line of the unpacked QEMU, or fails.
qemu_version() {
    QEMU_MODULE_DIR=$MODDIR "$BIN" --version 2>&1 | head -n 1
}

# Fails unless the unpacked binary finds all its shared libraries and reports 7.2.
check_qemu() {
    [ -x "$BIN" ] || return 1
    missing=$(ldd "$BIN" | awk '/not found/ { printf "%s ", $1 }')
    if [ -n "$missing" ]; then
        echo "fetch-qemu72.sh: missing shared libraries: $missing" >&2
        die "run 'resources/install-deps.sh --with-qemu' as root to install them"
    fi
    qemu_version | grep -q 'QEMU emulator version 7\.2\.' || return 1
    [ -f "$OUTDIR/usr/share/seabios/bios-256k.bin" ] && [ -d "$MODDIR" ] && [ -x "$OUTDIR/qemu72" ]
}

if check_qemu; then
    echo "fetch-qemu72.sh: $(qemu_version) already in $OUTDIR"
    exit 0
fi

# Prints the newest version of package $1 whose version matches the ERE $2.
pick_version() {
    apt-cache madison "$1" | awk -F '|' '{ gsub(/ /, "", $2); print $2 }' | grep -E -- "$2" |
        sort -V | tail -n 1
}

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
BIN=$OUTDIR/usr/bin/qemu-system-x86_64
MODDIR=$OUTDIR/usr/lib/x86_64-linux-gnu/qemu
CACHE=$OUTDIR/debs
mkdir -p "$CACHE"

# Downloads package $1 at version $2 into the cache (unless there already) and unpacks it.
fetch_and_extract() {
    # apt-get download names files NAME_VERSION_ARCH.deb with ':' escaped as %3a.
    file_version=${2//:/%3a}
    set -- "$1" "$2" "$CACHE/$1_${file_version}_"*.deb
    if [ ! -f "$3" ]; then
        opts=()
        # As root, apt's sandbox user may not be able to write here; root may write anyway.
        [ "$(id -u)" -ne 0 ] || opts=(-o APT::Sandbox::User=root)
        (cd "$CACHE" && apt-get download -qq "${opts[@]}" "$1=$2") ||
            die "apt-get download $1=$2 failed"
        set -- "$1" "$2" "$CACHE/$1_${file_version}_"*.deb
        [ -f "$3" ] || die "apt-get download $1=$2 produced no .deb in $CACHE"
    fi
    dpkg-deb -x "$3" "$OUTDIR" || die "cannot unpack $3"
    echo "fetch-qemu72.sh: unpacked $1 $2"
}

for pkg in $QEMU_PACKAGES; do
    v=$(pick_version "$pkg" "$QEMU_VERSION_RE")
    [ -n "$v" ] || die "apt knows no bookworm 7.2 version of $pkg; is the bookworm suite in the apt sources (and 'apt-get update' done)?"
    fetch_and_extract "$pkg" "$v"
done
v=$(pick_version seabios "$SEABIOS_VERSION_RE")
[ -n "$v" ] || die "apt knows no bookworm version of seabios"
fetch_and_extract seabios "$v"

cat >"$OUTDIR/qemu72" <<WRAPPER
#!/bin/sh
# Runs the unpacked QEMU 7.2 with its own modules and firmware (written by fetch-qemu72.sh).
QEMU_MODULE_DIR="$MODDIR" exec "$BIN" -L "$OUTDIR/usr/share/qemu" -L "$OUTDIR/usr/share/seabios" "\$@"
WRAPPER
chmod 755 "$OUTDIR/qemu72"

check_qemu || die "the unpacked $BIN does not report QEMU 7.2: $(qemu_version)"
echo "fetch-qemu72.sh: $(qemu_version) in $OUTDIR"
