#!/bin/sh
# Installs the host packages iovmm's tests and guest build need (Debian bookworm, run as root).
#
# Usage: install-deps.sh [--with-qemu] [--with-ovs]
#
# Enables the bookworm-backports suite (it carries the 6.12 cloud kernel used as the Linux guest) by
# reusing the mirror already configured for bookworm, so no registry host name lives in this repo.
# Safe to run repeatedly: it does nothing when everything is already configured and installed.
set -eu

PACKAGES="busybox-static cpio zstd xz-utils binutils gcc dpdk-dev python3 curl"
# QEMU (reference runs, the nested suite) comes from bookworm-backports: newer virtio-iommu/VT-d
# models. qemu-utils ships qemu-storage-daemon, the real vhost-user-blk backend of the blk tests
# (tests/tests/blk_qemu_storage_daemon.rs); both come from the same suite so their versions match.
QEMU_PACKAGES="qemu-system-x86 qemu-utils"
# Shared libraries of bookworm's QEMU 7.2, which fetch-qemu72.sh unpacks without installing it
# (the benchmark's reference VMM). Installed from the default suites.
QEMU72_LIBS="libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30
    libhogweed6 libibverbs1 libjpeg62-turbo libnettle8 libnuma1 libpixman-1-0 libpmem1 libpng16-16
    librdmacm1 libsasl2-2 libseccomp2 libslirp0 libudev1 liburing2 libvdeplug2 libzstd1"
# Open vSwitch with DPDK (tests/tests/ovs_two_vms.rs): about 5 MB to download, 25 MB installed,
# about 12 s here. The tests run a private instance; the package's own service is not used.
OVS_PACKAGES="openvswitch-switch-dpdk"
WITH_QEMU=0
WITH_OVS=0
# IOVMM_APT_ETC lets tests point the script at a copy of /etc/apt.
APT_ETC=${IOVMM_APT_ETC:-/etc/apt}
BACKPORTS_FILE=$APT_ETC/sources.list.d/iovmm-backports.sources

die() {
    echo "install-deps.sh: error: $*" >&2
    exit 1
}

usage() {
    echo "usage: install-deps.sh [--with-qemu] [--with-ovs]" >&2
    exit 2
}

for arg in "$@"; do
    case "$arg" in
    --with-qemu) WITH_QEMU=1 ;;
    --with-ovs) WITH_OVS=1 ;;
    -h | --help) usage ;;
    *) echo "install-deps.sh: unknown argument '$arg'" >&2; usage ;;
    esac
done

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
if [ "$(id -u)" -ne 0 ]; then
    # It edits apt sources and installs packages: as a user, go through sudo when there is one.
    command -v sudo >/dev/null 2>&1 || die "must run as root (it edits apt sources and installs packages); sudo is not installed"
    exec sudo sh "$0" "$@"
fi
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script supports Debian bookworm only"
# shellcheck source=/dev/null
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ "$codename" = bookworm ] || die "expected Debian bookworm, found '${codename:-unknown}'"

# Prints every "URI<TAB>Signed-By<TAB>Suites" triple of the deb822 files (one line per stanza).
deb822_stanzas() {
    for f in "$APT_ETC"/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN { IGNORECASE = 1 }
            function flush() {
                if (types ~ /(^| )deb( |$)/ && enabled !~ /^no$/ && uris != "")
                    printf "%s\t%s\t%s\n", uris, signed, suites
                types = ""; uris = ""; suites = ""; signed = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            { key = $1; sub(/:$/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
              key = tolower(key)
              if (key == "types") types = val
              else if (key == "uris") uris = val
              else if (key == "suites") suites = val
              else if (key == "signed-by") signed = val
              else if (key == "enabled") enabled = val }
            END { flush() }' "$f"
    done
}

# Prints "URI<TAB>signed-by<TAB>suite" for one-line "deb" entries of sources.list and *.list files.
one_line_entries() {
    for f in "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -e 's/#.*//' "$f" | awk '$1 == "deb" {
            signed = ""
            if ($2 ~ /^\[/) {
                while (NF >= 2 && $2 !~ /\]$/) {
                    if ($2 ~ /^\[?signed-by=/) { signed = $2; sub(/^\[?signed-by=/, "", signed) }
                    $2 = ""; $0 = $0
                }
                if ($2 ~ /^\[?signed-by=/) { signed = $2; sub(/^\[?signed-by=/, "", signed); sub(/\]$/, "", signed) }
                $2 = ""; $0 = $0
            }
            if (NF >= 3) printf "%s\t%s\t%s\n", $2, signed, $3 }'
    done
}

all_entries() {
    deb822_stanzas
    one_line_entries
}

backports_configured() {
    all_entries | awk -F '\t' '{ n = split($3, s, " "); for (i = 1; i <= n; i++)
        if (s[i] == "bookworm-backports") found = 1 } END { exit !found }'
}

enable_backports() {
    # The first stanza that serves plain "bookworm" is the main archive mirror.
    main=$(all_entries | awk -F '\t' '{ n = split($3, s, " "); for (i = 1; i <= n; i++)
        if (s[i] == "bookworm") { print; exit } }')
    [ -n "$main" ] || die "no apt source for suite 'bookworm' found in $APT_ETC; configure the Debian mirror first"
    uri=$(printf '%s' "$main" | cut -f1 | awk '{ print $1 }')
    signed=$(printf '%s' "$main" | cut -f2)
    {
        echo "# Written by iovmm resources/install-deps.sh (mirror copied from the bookworm entry)."
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [ -z "$signed" ] || echo "Signed-By: $signed"
    } >"$BACKPORTS_FILE.tmp"
    mv "$BACKPORTS_FILE.tmp" "$BACKPORTS_FILE"
    echo "install-deps.sh: enabled bookworm-backports from $uri ($BACKPORTS_FILE)"
    NEED_UPDATE=1
}

# Prints the packages of $@ that are not installed.
missing_packages() {
    for p in "$@"; do
        status=$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null || true)
        [ "$status" = installed ] || printf '%s ' "$p"
    done
}

# Installs packages; "$1" is extra apt-get options (may be empty), the rest package names.
install_packages() {
    opts=$1
    shift
    echo "install-deps.sh: installing $*"
    # shellcheck disable=SC2086 # $opts is a word list
    apt-get install -y -qq --no-install-recommends $opts "$@" >"$LOG" 2>&1 || {
        cat "$LOG" >&2
        die "apt-get install $* failed (apt output above)"
    }
}

NEED_UPDATE=0
backports_configured || enable_backports
# shellcheck disable=SC2086 # the package lists are word lists
missing=$(missing_packages $PACKAGES)
missing_qemu=""
if [ "$WITH_QEMU" -eq 1 ]; then
    # shellcheck disable=SC2086
    missing_qemu=$(missing_packages $QEMU_PACKAGES)
    # shellcheck disable=SC2086
    missing=$missing$(missing_packages $QEMU72_LIBS)
fi
if [ "$WITH_OVS" -eq 1 ]; then
    # shellcheck disable=SC2086
    missing=$missing$(missing_packages $OVS_PACKAGES)
fi
if [ -z "$missing$missing_qemu" ] && [ "$NEED_UPDATE" -eq 0 ]; then
    echo "install-deps.sh: all packages present, bookworm-backports enabled; nothing to do"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >"$LOG" 2>&1 || {
    cat "$LOG" >&2
    die "apt-get update failed; check the apt sources in $APT_ETC and network access"
}
# shellcheck disable=SC2086
[ -z "$missing" ] || install_packages "" $missing
# shellcheck disable=SC2086
[ -z "$missing_qemu" ] || install_packages "-t bookworm-backports" $missing_qemu
command -v dpdk-testpmd >/dev/null 2>&1 || die "dpdk-testpmd not on PATH after installing dpdk-dev"
echo "install-deps.sh: done"
