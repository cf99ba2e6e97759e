#!/usr/bin/env bash
# Load benchmark of the cache layer (see examples/loadbench.rs and docs/performance.md).
#
#   scripts/loadbench.sh            # the six-row table and the target ratios (~60 s)
#   scripts/loadbench.sh --pools    # plus the Redis connection-setup comparison (~2 min)
#
# Loopback only: it starts its own redis-server on a free port and its own HTTP servers on
# 127.0.0.1, and stops them all when done. Extra arguments go to the benchmark (--help).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need redis-server; then
    echo "installing wrk and redis-server (Debian packages)..." >&2
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq wrk redis-server >/dev/null
fi

exec cargo run --release --quiet --features bb8,tiered,cluster,bench-internals --example loadbench -- "$@"
