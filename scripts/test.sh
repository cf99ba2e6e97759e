#!/usr/bin/env bash
# Runs the whole test suite. The tests spawn their own redis-server processes, so
# redis-server must be installed; this installs it (Debian/Ubuntu) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server not found; installing it with apt-get" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi

# A full run builds every test binary once: incremental caches only slow a cold build (CI's).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# The library and the reverse proxy (proxy/), one build of their shared dependencies.
cargo test --workspace --all-features "$@"
