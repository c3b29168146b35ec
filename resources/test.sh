#!/bin/bash
# The project's test command: refreshes the nested L1 image (so the nested Linux suite runs the
# iovmm of this tree; a release build and a repack only when something changed), then runs every
# test of the workspace: unit tests, KVM guests on this machine, and Linux guests on nested KVM.
#
# Usage: bash resources/test.sh [cargo test arguments...]
# Needs: resources/install-deps.sh --with-qemu (root) and resources/build-linux-guest.sh, once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash resources/build-nested-l1.sh
exec cargo test --workspace "$@"
