#!/bin/sh
# Builds iovmm and shows its main job:
#  1. the project's fast test guest on this machine's KVM (prints and exits in well under a second);
#  2. stock Linux on real KVM behind iovmm's vIOMMUs, its virtio-net traffic served by DPDK
#     testpmd through the vhost-user IOTLB. On a host with VMX/SVM that is this machine's KVM;
#     elsewhere (kvm-pvm, which cannot run Linux) it runs nested: QEMU TCG with emulated SVM runs
#     an L1 Linux whose KVM boots the guest (resources/build-nested-l1.sh, tests/src/nested/).
#     It prints the scenario table: frames at both ends, IOTLB misses, UPDATEs and INVALIDATEs
#     per frame, and Linux's driver lines.
set -eu
cd "$(dirname "$0")/.."

cargo build --release -p vmm -p integration-tests --bins
guest=$(cargo run -q --release -p integration-tests --bin iovmm-test-guest-path)
echo "== fast test guest: $guest"
target/release/iovmm --kernel "$guest" --cmdline "iovmm.test=hello" --memory 128M

if grep -qwE 'vmx|svm' /proc/cpuinfo; then
    echo "== Linux guest on this machine's KVM"
    target/release/iovmm --kernel resources/out/vmlinux --initramfs resources/out/initramfs.cpio.gz \
        --memory 512M --cmdline "console=ttyS0 reboot=k panic=-1 rdinit=/init"
    echo "== Linux powered off cleanly"
else
    echo "== no VMX/SVM here: Linux on nested KVM (QEMU TCG L0 -> L1 KVM -> iovmm -> Linux)"
    bash resources/build-nested-l1.sh
    target/release/iovmm-nested --only viommu-strict-dpdk --only vtd-ats-strict-dpdk
fi
