#!/usr/bin/env bash
# Builds Tessera and starts the NVMe/TCP target with the built-in default configuration:
# subsystem nqn.2026-11.io.tessera:default, one 1 GiB malloc namespace, on 127.0.0.1:4420.
# Extra arguments go to tessera-nvmf (for example --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/tessera-nvmf "$@"
