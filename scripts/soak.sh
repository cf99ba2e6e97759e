#!/usr/bin/env bash
# Soak test of the cache layer (see examples/soak.rs): a mixed load (hits, misses, bypasses,
# 512 KiB bodies) for 60 s while redis-server is killed and restarted every 10 s. Every
# request must succeed; prints totals, failures and RSS, and exits non-zero on any failure.
#
#   scripts/soak.sh          # 60 s
#   scripts/soak.sh 300      # 5 minutes (SOAK_RESTART_EVERY, SOAK_WARMUP, SOAK_CLIENTS: see the example)
#
# Loopback only: it starts its own redis-server on a free port and its own HTTP server on
# 127.0.0.1, and stops them when done.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian package)..." >&2
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq redis-server >/dev/null
fi

exec cargo run --release --quiet --example soak -- "$@"
