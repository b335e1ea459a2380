#!/bin/sh
# Fuzzes the outbox-proto decoder: runs the `decode` target of this
# cargo-fuzz project for SECONDS (default 30) and fails on any crash.
#
#   proto/fuzz/run.sh [SECONDS]
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address and friends) to rustc; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them. Build output stays in proto/fuzz/target,
# the corpus in proto/fuzz/corpus/decode, crashes in proto/fuzz/artifacts.
set -eu

seconds="${1:-30}"
cd "$(dirname "$0")"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "run.sh: cargo-fuzz is not installed; run: cargo install cargo-fuzz" >&2
    exit 1
fi

RUSTC_BOOTSTRAP=1 exec cargo fuzz run --fuzz-dir . decode -- \
    -max_total_time="$seconds"
