#!/usr/bin/env bash
# Benchmark of outboxd: durable enqueue rate and delivery rate, each as a
# ratio against a baseline measured in the same run, plus the daemon's peak
# RSS; then delivery through outbox-relay against direct delivery in the same
# run, and the relay's RSS idle and under load; when sshd is installed, the
# same deliveries through an ssh tunnel (`ssh -L`) too, to compare the relay
# with; and through a plain TCP forward, the floor of any relay that shares
# the daemon's cores (--no-forward skips it). See the "Benchmark" section of
# README.md.
#
# The ssh comparison needs `apt-get install openssh-server openssh-client`
# (without sshd it is skipped, and --no-ssh skips it).
#
#   deploy/bench.sh                          # 100000 messages, 64 producers, 1 KiB, concurrency 64
#   deploy/bench.sh --messages 20000         # any outbox-bench flag passes through
#   deploy/bench.sh --relay-only --relay-concurrency 128   # only the relay phase
#   deploy/bench.sh --no-relay               # only outboxd's own phases
#   deploy/bench.sh >> bench-results.jsonl   # one JSON line per run on stdout
#
# The table goes to stderr. BENCH_TIMEOUT (seconds, default 3600) bounds the
# whole run; the bench also bounds each phase (--phase-timeout, default 900),
# and on SIGTERM/SIGINT it kills the daemon and deletes its data.
set -euo pipefail

cd "$(dirname "$0")/.."

cargo build --release -p outbox-daemon -p outbox-relay -p outbox-tests --bins >&2

exec timeout --kill-after=30 "${BENCH_TIMEOUT:-3600}" \
    target/release/outbox-bench --outboxd target/release/outboxd \
    --outbox target/release/outbox --outbox-relay target/release/outbox-relay "$@"
