#!/usr/bin/env bash
# Installs everything the tests need and runs all of them: formatting, clippy, unit, property and
# integration tests, the fuzz targets' build, and the real-host QEMU harness (tests/nvme-cli).
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s ====\n' "$*"; }

step "setup: apt packages, guest kernel and initramfs"
bash tests/nvme-cli/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit, proptest, integration with real processes)"
cargo test --workspace

if [ -x scripts/fuzz-build.sh ]; then
    step "fuzz targets build"
    scripts/fuzz-build.sh
fi

step "real Linux host in QEMU: nvme-cli, fio, nvme-tcp (also an EC volume of tessera up, one engine killed)"
cargo build --release -p tessera-nvmf -p tessera-ctl -p tessera-mgmt -p tessera-engine
python3 tests/nvme-cli/run.py --no-setup --no-build

step "all tests passed"
