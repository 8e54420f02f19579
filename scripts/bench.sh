#!/usr/bin/env bash
# Reproduces the four comparisons of BENCHMARKS.md from a clean clone:
#   1. the register directly vs through the gateway (fixed rate, saturation)
#   2. the gateway vs nginx as a plain mutual-TLS reverse proxy (same register)
#   3. full and resumed mutual-TLS handshakes per second (per gateway CPU-second)
#   4. resident memory of the gateway with N idle mutual-TLS connections
#
# Usage: scripts/bench.sh            (builds --release unless KARIBCHE_BIN is set)
# Knobs (environment): RATE=1000 DURATION=20s WARMUP=3s CONCURRENCY=64
#   IDLE_CONNECTIONS=10000 HS_DURATION=10s OUT=target/bench KARIBCHE_BIN=path
#   ONLY="1 2 3 4" (which comparisons to run)
#   RUNS="gateway-closed-http1 …" (only these runs of the chosen comparisons)
#   PERF="gateway-closed-http1 …" (runs to profile with perf record, to $OUT/NAME.perf.data)
#   PERF_OPTS="-F 999 -g" (perf record's sampling options, e.g. "-F 199 --call-graph dwarf")
#
# Everything runs on 127.0.0.1 on ports 18443-18445/19090 in a temporary
# directory (development PKI, SQLite database, a copy of policies/ whose
# quotas are raised so saturation measures the gateway, not the quota).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
CONCURRENCY=${CONCURRENCY:-64}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
HS_DURATION=${HS_DURATION:-10s}
ONLY=${ONLY:-"1 2 3 4"}
OUT=${OUT:-$ROOT/target/bench}
GW_ADDR=127.0.0.1:18443
REG_ADDR=127.0.0.1:18444
NGINX_ADDR=127.0.0.1:18445
ADMIN_ADDR=127.0.0.1:19090

if [ -z "${KARIBCHE_BIN:-}" ]; then
    cargo build --release --quiet
    KARIBCHE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/karibche
fi
BIN=$KARIBCHE_BIN

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "installing nginx (Debian package)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# 10,000 idle connections need that many descriptors in the gateway and in the load generator.
ulimit -n "$(ulimit -Hn)" || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_CONNECTIONS + 1000)) ]; then
    echo "warning: ulimit -n is $(ulimit -n); the idle test is cut to $(( $(ulimit -n) - 1000 )) connections" >&2
    IDLE_CONNECTIONS=$(( $(ulimit -n) - 1000 ))
fi

WORK=$(mktemp -d /tmp/karibche-bench.XXXXXX)
mkdir -p "$OUT" "$WORK/nginx-tmp"
GW_PID= NGINX_PID=
cleanup() {
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

# Policies as shipped, quotas raised: the quota checks still run on every request.
cp -r "$ROOT/policies" "$WORK/policies"
cat > "$WORK/policies/limits.toml" <<'TOML'
# Benchmark quotas: high enough never to refuse, so saturation measures the gateway.
[defaults]
agency = { rate = "1000000/s", burst = 1000000 }
officer = { rate = "1000000/s", burst = 1000000 }
TOML

cat > "$WORK/bench.toml" <<TOML
data_dir = "$WORK/var"
policies_dir = "$WORK/policies"

[gateway]
listen = "$GW_ADDR"
max_connections = 30000
# Idle connections are the point of comparison 4: hyper's header timer also runs between requests.
header_timeout = "10m"

[registry]
listen = "$REG_ADDR"
seed_persons = 10000

[admin]
listen = "$ADMIN_ADDR"

[limits]
max_connections_per_agency = 30000
idle_timeout = "10m"
provider_concurrency = 1024
TOML

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -m | awk '/Mem:/ {print $2}') MiB; $(uname -sr)" | tee "$OUT/machine.txt"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews absolute figures; ratios are measured side by side)" | tee -a "$OUT/machine.txt"

# start_gateway: the gateway and its built-in register, in one process ($GW_PID), ready.
start_gateway() {
    "$BIN" --config "$WORK/bench.toml" serve >>"$WORK/serve.log" 2>&1 &
    GW_PID=$!
    for _ in $(seq 1 600); do
        curl -sf "http://$ADMIN_ADDR/readyz" >/dev/null 2>&1 && break
        kill -0 "$GW_PID" 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
        sleep 0.2
    done
    curl -sf "http://$ADMIN_ADDR/readyz" >/dev/null || { echo "gateway not ready"; cat "$WORK/serve.log"; exit 1; }
    echo "gateway + register: pid $GW_PID ($BIN)"
}
stop_gateway() {
    kill "$GW_PID" && wait "$GW_PID" || true
    GW_PID=
}
start_gateway

PKI=$WORK/var/pki
sed -e "s#@WORK@#$WORK#g" -e "s#@PKI@#$PKI#g" -e "s#@LISTEN@#$NGINX_ADDR#g" -e "s#@UPSTREAM@#$REG_ADDR#g" \
    "$ROOT/scripts/bench/nginx.conf.in" >"$WORK/nginx.conf"
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK" &
NGINX_PID=$!
for _ in $(seq 1 100); do
    (echo >/dev/tcp/127.0.0.1/${NGINX_ADDR##*:}) 2>/dev/null && break
    sleep 0.1
done
echo "nginx: pid $NGINX_PID ($("$NGINX" -v 2>&1))"

: >"$OUT/summary.txt"
# bench NAME ARGS…: one run of the load generator; its report goes to $OUT/NAME.txt.
bench() {
    local name=$1
    shift
    if [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]]; then return 0; fi
    echo
    local perf_pid=
    if [[ " ${PERF:-} " == *" $name "* ]]; then
        # Samples the karibche process (gateway + register) for the measured part of this run.
        (sleep "${WARMUP%s}"; exec perf record -q ${PERF_OPTS:--F 999 -g} -p "$GW_PID" -o "$OUT/$name.perf.data" -- sleep "${DURATION%s}") &
        perf_pid=$!
    fi
    "$BIN" --config "$WORK/bench.toml" bench "$@" | tee "$OUT/$name.txt"
    [ -n "$perf_pid" ] && wait "$perf_pid" && echo "profile: perf report -i $OUT/$name.perf.data --no-children --sort sym"
    grep '^summary ' "$OUT/$name.txt" | sed "s/^summary /summary run=$name /" >>"$OUT/summary.txt"
}
# get NAME KEY: one figure of a run.
get() { grep "run=$1 " "$OUT/summary.txt" | sed -n "s/.* $2=\([^ ]*\).*/\1/p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
diff_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

LOAD=(--duration "$DURATION" --warmup "$WARMUP" --concurrency "$CONCURRENCY")
GW=(--target gateway --pid "$GW_PID" --check-audit)

if [[ " $ONLY " == *" 1 "* || " $ONLY " == *" 2 "* ]]; then
    for proto in http1 http2; do
        conns=$([ $proto = http2 ] && echo 8 || echo "$CONCURRENCY")
        bench "direct-open-$proto" --target direct --pid "$GW_PID" --mode open --rate "$RATE" --protocol $proto --connections "$conns" "${LOAD[@]}"
        bench "gateway-open-$proto" "${GW[@]}" --mode open --rate "$RATE" --protocol $proto --connections "$conns" "${LOAD[@]}"
        bench "nginx-open-$proto" --target nginx --addr "$NGINX_ADDR" --mode open --rate "$RATE" --protocol $proto --connections "$conns" "${LOAD[@]}"
        bench "direct-closed-$proto" --target direct --pid "$GW_PID" --mode closed --protocol $proto --connections "$conns" "${LOAD[@]}"
        bench "gateway-closed-$proto" "${GW[@]}" --mode closed --protocol $proto --connections "$conns" "${LOAD[@]}"
        bench "nginx-closed-$proto" --target nginx --addr "$NGINX_ADDR" --mode closed --protocol $proto --connections "$conns" "${LOAD[@]}"
    done
fi
if [[ " $ONLY " == *" 3 "* ]]; then
    HS=(--mode handshakes --mix read=100 --duration "$HS_DURATION" --warmup 1s --concurrency 32)
    bench gateway-handshakes-only-full "${GW[@]}" "${HS[@]}" --handshake-only
    bench gateway-handshakes-only-resumed "${GW[@]}" "${HS[@]}" --handshake-only --resume
    bench nginx-handshakes-only-full --target nginx --addr "$NGINX_ADDR" "${HS[@]}" --handshake-only
    bench gateway-handshakes-full "${GW[@]}" "${HS[@]}"
    bench gateway-handshakes-resumed "${GW[@]}" "${HS[@]}" --resume
    bench nginx-handshakes-full --target nginx --addr "$NGINX_ADDR" "${HS[@]}"
    bench nginx-handshakes-resumed --target nginx --addr "$NGINX_ADDR" "${HS[@]}" --resume
fi
if [[ " $ONLY " == *" 4 "* ]]; then
    # A fresh process for each: memory freed by earlier runs would be reused and hide the cost.
    stop_gateway
    start_gateway
    GW=(--target gateway --pid "$GW_PID" --check-audit)
    bench gateway-idle "${GW[@]}" --mode idle --connections "$IDLE_CONNECTIONS" --mix read=100 --protocol http1
    stop_gateway
    start_gateway
    GW=(--target gateway --pid "$GW_PID" --check-audit)
    bench gateway-idle-h2 "${GW[@]}" --mode idle --connections "$IDLE_CONNECTIONS" --mix read=100 --protocol http2
fi

{
    echo
    echo "== ratios ($(date -u +%FT%TZ))"
    if [[ " $ONLY " == *" 1 "* || " $ONLY " == *" 2 "* ]]; then
        for p in http1 http2; do
            echo "-- $p"
            echo "1. added latency at $RATE/s: p50 +$(diff_ms "$(get gateway-open-$p p50_ms)" "$(get direct-open-$p p50_ms)") ms, p99 +$(diff_ms "$(get gateway-open-$p p99_ms)" "$(get direct-open-$p p99_ms)") ms (service time: p50 +$(diff_ms "$(get gateway-open-$p svc_p50_ms)" "$(get direct-open-$p svc_p50_ms)") ms, p99 +$(diff_ms "$(get gateway-open-$p svc_p99_ms)" "$(get direct-open-$p svc_p99_ms)") ms)"
            echo "1. saturation: gateway $(get gateway-closed-$p rps)/s, direct $(get direct-closed-$p rps)/s = $(ratio "$(get gateway-closed-$p rps)" "$(get direct-closed-$p rps)") of direct"
            echo "2. vs nginx: throughput $(get gateway-closed-$p rps)/s / $(get nginx-closed-$p rps)/s = $(ratio "$(get gateway-closed-$p rps)" "$(get nginx-closed-$p rps)"); p99 at $RATE/s $(get gateway-open-$p p99_ms) / $(get nginx-open-$p p99_ms) ms = $(ratio "$(get gateway-open-$p p99_ms)" "$(get nginx-open-$p p99_ms)"); p99 at saturation $(get gateway-closed-$p p99_ms) / $(get nginx-closed-$p p99_ms) ms = $(ratio "$(get gateway-closed-$p p99_ms)" "$(get nginx-closed-$p p99_ms)")"
        done
    fi
    if [[ " $ONLY " == *" 3 "* ]]; then
        echo "3. gateway bare handshakes: full $(get gateway-handshakes-only-full rps)/s using $(get gateway-handshakes-only-full cpu_s) CPU-s = $(get gateway-handshakes-only-full per_cpu_s) per core-second; resumed $(get gateway-handshakes-only-resumed rps)/s = $(get gateway-handshakes-only-resumed per_cpu_s) per core-second; nginx full $(get nginx-handshakes-only-full rps)/s"
        echo "3. gateway handshake + one request: full $(get gateway-handshakes-full rps)/s using $(get gateway-handshakes-full cpu_s) CPU-s = $(get gateway-handshakes-full per_cpu_s) per core-second; resumed $(get gateway-handshakes-resumed rps)/s = $(get gateway-handshakes-resumed per_cpu_s) per core-second ($(get gateway-handshakes-resumed resumed_hs) resumed); nginx full $(get nginx-handshakes-full rps)/s, resumed $(get nginx-handshakes-resumed rps)/s"
    fi
    if [[ " $ONLY " == *" 4 "* ]]; then
        echo "4. idle: $(get gateway-idle conns) HTTP/1.1 connections = $(get gateway-idle kib_per_conn) KiB each; $(get gateway-idle-h2 conns) HTTP/2 = $(get gateway-idle-h2 kib_per_conn) KiB each"
    fi
    grep -c . "$WORK/nginx-access.log" | sed 's/^/nginx access log lines: /'
} | tee "$OUT/ratios.txt"
echo "reports in $OUT"
