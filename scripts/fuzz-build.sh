#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ on STABLE Rust: the wire parsers (pdu_decode,
# connect_data, queue_receive, engine_frame, virtio_blk_chain) and the engine's on-disk formats (engine_ops,
# engine_wal, engine_checkpoint; see docs/ENGINE-FORMATS.md).
#
# cargo-fuzz needs nightly only for sanitizers (-Zsanitizer=...). With `--sanitizer none` it
# passes nothing unstable: coverage instrumentation comes from LLVM's sancov pass, which stable
# rustc accepts via -Cpasses / -Cllvm-args. So the build is
#
#     cargo fuzz build --sanitizer none --target-dir fuzz/target
#
# which this script runs after installing cargo-fuzz (pinned version, from crates.io, about a
# minute) if it is missing. If cargo-fuzz cannot be installed, or FUZZ_BUILD_MODE=plain, it runs
# the equivalent plain `cargo build --release --bins --target <host>` with the same RUSTFLAGS
# cargo-fuzz would use (the explicit --target keeps the instrumentation off build scripts and
# proc macros). Both put the binaries in fuzz/target/<host triple>/release/. The fuzz package is
# standalone (its own [workspace], its own Cargo.lock), not part of the main workspace.
#
# Usage:
#     scripts/fuzz-build.sh                 # all targets
#     scripts/fuzz-build.sh pdu_decode      # some targets
#     FUZZ_BUILD_MODE=plain scripts/fuzz-build.sh   # skip cargo-fuzz
#
# A cold build (all dependencies, on 2 cores) takes about 3 minutes, plus about one minute the
# first time to install cargo-fuzz; rebuilding after a change to the parsers takes well under a
# minute.
#
# Running a target for N seconds (here 60), from the repository root; the corpus grows in
# fuzz/corpus/<target>/ and crashing inputs land in fuzz/artifacts/<target>/ (all git-ignored):
#
#     cargo fuzz run pdu_decode -s none --target-dir fuzz/target -- -max_total_time=60
#
# or, without cargo-fuzz, the built binary directly (it is an ordinary libFuzzer binary, so any
# libFuzzer flag works: -jobs=2, -max_len=..., -runs=...):
#
#     mkdir -p fuzz/corpus/pdu_decode fuzz/artifacts/pdu_decode
#     fuzz/target/x86_64-unknown-linux-gnu/release/pdu_decode -max_total_time=60 \
#         -artifact_prefix=fuzz/artifacts/pdu_decode/ fuzz/corpus/pdu_decode
#
# Seeding the engine format targets with real files (WAL segments, checkpoints and WAL record
# payloads written by a target running a small workload on the in-memory backend):
#
#     cargo run --manifest-path fuzz/Cargo.toml --example engine_seeds
#
# Reproducing a crash: pass the artifact file instead of the corpus directory,
#     fuzz/target/x86_64-unknown-linux-gnu/release/pdu_decode fuzz/artifacts/pdu_decode/crash-...
# (or `cargo fuzz run pdu_decode -s none --target-dir fuzz/target fuzz/artifacts/pdu_decode/crash-...`).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
target_dir="$fuzz_dir/target"
mode="${FUZZ_BUILD_MODE:-auto}"
host="$(rustc -vV | sed -n 's/^host: //p')"

# These would otherwise redirect or alter the build.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR

have_cargo_fuzz() {
    cargo fuzz --version >/dev/null 2>&1
}

if [[ "$mode" == auto || "$mode" == cargo-fuzz ]]; then
    if ! have_cargo_fuzz; then
        echo "fuzz-build: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io" >&2
        if ! cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked; then
            if [[ "$mode" == cargo-fuzz ]]; then
                echo "fuzz-build: cargo-fuzz could not be installed" >&2
                exit 1
            fi
            echo "fuzz-build: cargo-fuzz could not be installed; falling back to a plain cargo build" >&2
        fi
    fi
    if have_cargo_fuzz; then
        mode=cargo-fuzz
    else
        mode=plain
    fi
fi

cd "$root"
case "$mode" in
    cargo-fuzz)
        if [[ $# -eq 0 ]]; then
            cargo fuzz build --sanitizer none --target "$host" --target-dir "$target_dir"
        else
            for t in "$@"; do
                cargo fuzz build --sanitizer none --target "$host" --target-dir "$target_dir" "$t"
            done
        fi
        ;;
    plain)
        # The flags cargo-fuzz 0.13 passes for `--sanitizer none` (release, debug assertions on).
        flags=(
            -Cpasses=sancov-module
            -Cllvm-args=-sanitizer-coverage-level=4
            -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
            -Cllvm-args=-sanitizer-coverage-pc-table
            -Cllvm-args=-sanitizer-coverage-trace-compares
            --cfg fuzzing
            -Cllvm-args=-simplifycfg-branch-fold-threshold=0
            -Cllvm-args=-sanitizer-coverage-stack-depth
            -Cdebug-assertions
            -Ccodegen-units=1
        )
        bins=(--bins)
        if [[ $# -gt 0 ]]; then
            bins=()
            for t in "$@"; do
                bins+=(--bin "$t")
            done
        fi
        RUSTFLAGS="${flags[*]}" cargo build --manifest-path "$fuzz_dir/Cargo.toml" --release \
            --target "$host" --target-dir "$target_dir" "${bins[@]}"
        ;;
    *)
        echo "fuzz-build: unknown FUZZ_BUILD_MODE '$mode' (auto, cargo-fuzz or plain)" >&2
        exit 2
        ;;
esac

echo "fuzz-build: built ($mode) in $target_dir/$host/release:" >&2
for t in pdu_decode connect_data queue_receive engine_frame engine_ops engine_wal engine_checkpoint virtio_blk_chain; do
    if [[ -x "$target_dir/$host/release/$t" ]]; then
        echo "  $target_dir/$host/release/$t" >&2
    fi
done
