#!/usr/bin/env bash
# Instructions per request of an in-process hit next to the bare handler, counted by
# callgrind (repeatable whatever else the machine is doing; see examples/hit_instructions.rs).
#
#   scripts/hit_instructions.sh              # modes bare, memory, decoding
#   scripts/hit_instructions.sh bare memory  # chosen modes
#
# Each mode runs twice (20,000 and 40,000 requests); the difference divided by 20,000 is the
# cost of one request without start-up and priming.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    echo "installing valgrind (Debian package)..." >&2
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq valgrind >/dev/null
fi

cargo build --release --quiet --features bench-internals --example hit_instructions
bin=target/release/examples/hit_instructions
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(bare memory decoding)

count() { # mode requests -> instructions
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

declare -A per
for mode in "${modes[@]}"; do
    small=$(count "$mode" 20000)
    large=$(count "$mode" 40000)
    per[$mode]=$(( (large - small) / 20000 ))
    printf '%-10s %8d instructions/request\n' "$mode" "${per[$mode]}"
done
if [ -n "${per[bare]:-}" ]; then
    for mode in "${modes[@]}"; do
        [ "$mode" = bare ] && continue
        printf '%-10s %8d over bare (%.2fx)\n' "$mode" $(( per[$mode] - per[bare] )) \
            "$(awk "BEGIN { print ${per[$mode]} / ${per[bare]} }")"
    done
fi
