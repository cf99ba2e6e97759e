#!/usr/bin/env bash
# Side-by-side hit benchmark on one machine, one upstream: the upstream alone (nginx serving a
# static file), tower-redis-cache-proxy (embedded store), Varnish (Debian's `varnish`) and
# nginx's proxy_cache (Debian's `nginx-light`), each loaded by wrk with the same cached URL.
# Prints one markdown row per server: requests/s, p99 latency and the server's CPU time per
# request (user + system, read from /proc before and after the run).
#
#   scripts/bench_proxy.sh [seconds per run, default 10] [connections, default 64]
#
# Installs varnish, nginx-light and wrk with apt-get when missing (Debian/Ubuntu, as root or
# with sudo). Listens on 127.0.0.1:18001-18004 only; stops everything it started on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONNECTIONS="${2:-64}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
command -v varnishd >/dev/null 2>&1 || [ -x /usr/sbin/varnishd ] || missing+=(varnish)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} with apt-get" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The packages start their own services; this benchmark runs private instances.
    $SUDO systemctl stop varnish nginx >/dev/null 2>&1 || true
fi
PATH="$PATH:/usr/sbin"

cargo build --release --quiet -p tower-redis-cache-proxy
PROXY_BIN="${CARGO_TARGET_DIR:-target}/release/tower-redis-cache-proxy"

WORK="$(mktemp -d /tmp/trc-bench.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
    [ -f "$WORK/nc/nginx.pid" ] && kill "$(cat "$WORK/nc/nginx.pid")" 2>/dev/null || true
    [ -f "$WORK/varnish.pid" ] && kill "$(cat "$WORK/varnish.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT

# A 1 KiB page, cacheable for an hour. nginx's workers run as `nobody`: mktemp's directory is
# private (0700), and without read access every server would measure nginx's 403 instead.
mkdir -p "$WORK/up/www" "$WORK/nc/cache"
head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/up/www/page.html"
chmod 755 "$WORK" "$WORK/up" "$WORK/up/www"
chmod 644 "$WORK/up/www/page.html"

nginx_conf() { # dir, server block
    cat > "$1/nginx.conf" <<EOF
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1; proxy_temp_path $1; fastcgi_temp_path $1;
    uwsgi_temp_path $1; scgi_temp_path $1;
    $2
}
EOF
}

# The upstream: one nginx worker serving the page.
nginx_conf "$WORK/up" "server { listen 127.0.0.1:18001; root $WORK/up/www;
    location / { add_header Cache-Control \"max-age=3600\"; } }"
nginx -c "$WORK/up/nginx.conf"

# nginx proxy_cache, one worker.
nginx_conf "$WORK/nc" "proxy_cache_path $WORK/nc/cache keys_zone=c:10m;
    server { listen 127.0.0.1:18004; location / { proxy_pass http://127.0.0.1:18001;
    proxy_cache c; proxy_http_version 1.1; proxy_set_header Connection \"\";
    add_header X-Cache \$upstream_cache_status; } }"
nginx -c "$WORK/nc/nginx.conf"

# Varnish, in-memory storage.
varnishd -a 127.0.0.1:18003 -b 127.0.0.1:18001 -s malloc,256m -n "$WORK/varnish" \
    -P "$WORK/varnish.pid" >/dev/null

# This proxy, embedded store.
UPSTREAM=http://127.0.0.1:18001 LISTEN=127.0.0.1:18002 "$PROXY_BIN" > "$WORK/proxy.log" 2>&1 &
PIDS+=($!)
PROXY_PID=$!

for port in 18001 18002 18003 18004; do
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/page.html" && break
        sleep 0.1
    done
    # Twice: the second request must be a hit (of a 200: a benchmark of error pages is none).
    status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/page.html")
    if [ "$status" != 200 ]; then
        echo "port $port answered $status, not 200: not benchmarking error pages" >&2
        exit 1
    fi
done

cpu_ticks() { # pids... -> utime+stime in clock ticks, summed
    local total=0
    for pid in "$@"; do
        if [ -r "/proc/$pid/stat" ]; then
            read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat")
            total=$((total + f[11] + f[12]))
        fi
    done
    echo "$total"
}
nginx_pids() { # instance dir -> its master and workers (workers' command lines name no file)
    local master
    master=$(cat "$1/nginx.pid")
    echo "$master $(pgrep -P "$master" | tr '\n' ' ')"
}

TICKS=$(getconf CLK_TCK)
echo "| server | hit req/s | p99 | CPU per request |"
echo "|---|---:|---:|---:|"
run() { # name, port, pids...
    local name=$1 port=$2; shift 2
    local before after out rps p99 requests
    before=$(cpu_ticks "$@")
    out=$(wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/page.html")
    after=$(cpu_ticks "$@")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    local us_per_req
    us_per_req=$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="$requests" \
        'BEGIN { printf "%.1f µs", t / hz * 1e6 / n }')
    printf '| %s | %.0f | %s | %s |\n' "$name" "$rps" "$p99" "$us_per_req"
}
run "upstream alone (nginx static)" 18001 $(nginx_pids "$WORK/up")
run "tower-redis-cache-proxy (memory)" 18002 "$PROXY_PID"
run "Varnish (malloc)" 18003 $(pgrep -f "varnishd.*$WORK/varnish" | tr '\n' ' ')
run "nginx proxy_cache" 18004 $(nginx_pids "$WORK/nc")
echo
echo "$(nproc) cores; wrk -t2 -c$CONNECTIONS -d${DURATION}s on the same machine; 1 KiB page."
