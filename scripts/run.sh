#!/usr/bin/env bash
# Builds Tessera and starts a whole system on this machine with `tessera up`: the management
# service (127.0.0.1:7400), 3 engines with 2 targets each (127.0.0.1:7410-7412), and the
# NVMe/TCP target (127.0.0.1:4420) serving volume vol0 (1 GiB, EC_2P1) of pool default as
# nqn.2026-11.io.tessera:vol0. Data and logs go to ./tessera-data and are reused next time.
# Ctrl-C stops everything. Extra arguments go to `tessera up` (see `tessera up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The etcd client's build compiles etcd's protocol files with protoc.
if ! command -v protoc >/dev/null; then
    echo "installing protobuf-compiler (protoc), which the build needs" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends protobuf-compiler >&2
fi
cargo build --release --bins
exec target/release/tessera up "$@"
