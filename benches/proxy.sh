#!/usr/bin/env bash
# Side-by-side proxy benchmark: pgbench against one PostgreSQL 15 node, directly and through
# pgwarden-proxy, PgBouncer (session mode) and HAProxy (TCP mode), each plain and with TLS,
# interleaved (every target in turn for each workload, ROUNDS times), with each proxy's own CPU
# time per 1000 transactions read from /proc.
#
#   benches/proxy.sh [seconds-per-run]        (default 10; results on stdout as Markdown tables)
#
# Each run's result goes to a runs file; benches/summary.py turns it into the table (mean TPS with
# the lowest and highest round, latency, ratio to direct, CPU) and the performance targets with
# the ratio of every round.
#
# MEMORY_SESSIONS=500 benches/proxy.sh measures memory instead: each proxy's resident memory with
# 5 and with that many idle TLS sessions (pgbench clients sleeping in a transaction), per session.
#
# Environment: ROUNDS (default 1); for quicker experiments, WORKLOADS (an extended regular
# expression, keeps the workloads whose name matches), SSLMODES (default "disable require"),
# TARGETS (default "direct pgwarden pgbouncer haproxy"), and PW_ALT (TOML lines appended to a
# second pgwarden-proxy's configuration, run as the extra target "pgwarden-alt", e.g.
# PW_ALT='worker_threads = 1'; tables go inline: PW_ALT='limits = { max_client_connections = 50 }'),
# and ALT_BIN (another pgwarden-proxy binary for "pgwarden-alt", say a build of an earlier commit,
# for an A/B of two builds in one run; plaintext rows only, as for PW_ALT).
#
# TLS to the node: "pgwarden-nodetls" is pgwarden-proxy as the control plane runs it (it
# authenticates clients itself with SCRAM from the role's verifier, and reaches the node over TLS
# verified against the CA, its login bound to the node's certificate); "pgbouncer-nodetls" is
# PgBouncer with server_tls_sslmode=verify-full. Their plaintext rows are TLS on the node leg only.
#
# TLS: pgwarden-proxy and PgBouncer terminate client TLS and reach the node in plaintext;
# HAProxy in TCP mode cannot terminate PostgreSQL's in-band TLS, so its TLS row is TLS end to end
# with PostgreSQL through HAProxy (what HAProxy + Patroni users get). Direct TLS is the baseline
# for TLS rows. Everything listens on 127.0.0.1; every run is bounded by -T.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
ROUNDS=${ROUNDS:-1}
PGBIN=/usr/lib/postgresql/15/bin
RUN_AS=${PGWARDEN_NODE_USER:-postgres}

scripts/setup.sh --bench >&2
cargo build --release --locked -p pgwarden-proxy >&2

work=$(mktemp -d /tmp/pgwarden-bench-XXXXXX)
pids=()
cleanup() {
  # Logs of the last run are kept for a look after a failure.
  mkdir -p /tmp/pgwarden-bench-logs && cp "$work"/*.log /tmp/pgwarden-bench-logs/ 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # runuser does not pass the signal on: stop PgBouncer through its own pidfile.
  [ -f "$work/pgbouncer.pid" ] && kill "$(cat "$work/pgbouncer.pid")" 2>/dev/null || true
  [ -f "$work/pgbouncer-tls.pid" ] && kill "$(cat "$work/pgbouncer-tls.pid")" 2>/dev/null || true
  [ -f "$work/data/postmaster.pid" ] && as_node "$PGBIN/pg_ctl" -D "$work/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=benches/common.sh
. benches/common.sh

make_certs "$work"

PG_PORT=$(free_port); PW_PORT=$(free_port); PW_ADMIN=$(free_port); PGB_PORT=$(free_port); HA_PORT=$(free_port)
PWT_PORT=$(free_port); PWT_ADMIN=$(free_port); PGBT_PORT=$(free_port)
PASSWORD=bench-password
start_node "$work" "$PG_PORT" $((200 + ${MEMORY_SESSIONS:-0} + 20))
export PGPASSWORD=$PASSWORD

# pgwarden-proxy
cat > "$work/routes.json" <<JSON
{"epoch": 1, "databases": {"bench": {"primary": "127.0.0.1:$PG_PORT"}}}
JSON
cat > "$work/proxy.toml" <<TOML
listen = "127.0.0.1:$PW_PORT"
admin_listen = "127.0.0.1:$PW_ADMIN"
admin_token = "bench"
routes_file = "$work/routes.json"
[tls]
cert = "$work/server.crt"
key = "$work/server.key"
TOML
RUST_LOG=warn target/release/pgwarden-proxy --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
pids+=($!)
PW_PID=$!
# The same proxy as the control plane configures it: verifiers and the nodes' CA in the table.
python3 - "$work" "$PG_PORT" "$SCRAM" > "$work/routes-tls.json" <<'PY'
import json, sys
work, port, scram = sys.argv[1:4]
print(json.dumps({"epoch": 1, "node_ca": open(f"{work}/ca.crt").read(),
                  "databases": {"bench": {"primary": f"127.0.0.1:{port}", "users": {"bench": scram}}}}))
PY
sed -e "s/127.0.0.1:$PW_PORT/127.0.0.1:$PWT_PORT/" -e "s/127.0.0.1:$PW_ADMIN/127.0.0.1:$PWT_ADMIN/" \
  -e "s#$work/routes.json#$work/routes-tls.json#" "$work/proxy.toml" > "$work/proxy-tls.toml"
RUST_LOG=warn target/release/pgwarden-proxy --config "$work/proxy-tls.toml" >"$work/proxy-tls.log" 2>&1 &
pids+=($!)
PWT_PID=$!
PWA_PORT=$(free_port); PWA_PID=
if [ -n "${PW_ALT:-}${ALT_BIN:-}" ]; then
  sed -e "s/127.0.0.1:$PW_PORT/127.0.0.1:$PWA_PORT/" -e "s/127.0.0.1:$PW_ADMIN/127.0.0.1:$(free_port)/" \
    "$work/proxy.toml" > "$work/proxy-alt.toml"
  # Top-level keys must come before the first table.
  { printf '%s\n' "${PW_ALT:-}"; cat "$work/proxy-alt.toml"; } > "$work/proxy-alt2.toml"
  RUST_LOG=warn "${ALT_BIN:-target/release/pgwarden-proxy}" --config "$work/proxy-alt2.toml" >"$work/proxy-alt.log" 2>&1 &
  pids+=($!)
  PWA_PID=$!
fi

# PgBouncer, session mode, client TLS, SCRAM with the role's own secret
printf '"bench" "%s"\n' "$SCRAM" > "$work/userlist.txt"
cat > "$work/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $work/userlist.txt
pool_mode = session
max_client_conn = $((500 + ${MEMORY_SESSIONS:-0}))
default_pool_size = $((100 + ${MEMORY_SESSIONS:-0}))
client_tls_sslmode = allow
client_tls_cert_file = $work/server.crt
client_tls_key_file = $work/server.key
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
INI
# The same with TLS to the node, verified (CA and the address in the certificate).
sed -e "s/^listen_port = .*/listen_port = $PGBT_PORT/" -e "s#pgbouncer\.\(log\|pid\)#pgbouncer-tls.\1#" \
  "$work/pgbouncer.ini" > "$work/pgbouncer-tls.ini"
printf 'server_tls_sslmode = verify-full\nserver_tls_ca_file = %s\n' "$work/ca.crt" >> "$work/pgbouncer-tls.ini"
[ "$(id -u)" = 0 ] && chown -R "$RUN_AS" "$work"
as_node sh -c 'ulimit -n "$(ulimit -Hn)" && exec pgbouncer -q "$0"' "$work/pgbouncer-tls.ini" &
pids+=($!)
# As the node's user, whose soft limit on open files may be 1024: raised to the hard limit.
as_node sh -c 'ulimit -n "$(ulimit -Hn)" && exec pgbouncer -q "$0"' "$work/pgbouncer.ini" &
pids+=($!)

# HAProxy, TCP mode
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn $((1000 + ${MEMORY_SESSIONS:-0}))
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen pg
  bind 127.0.0.1:$HA_PORT
  server pg 127.0.0.1:$PG_PORT
CFG
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)
HA_PID=$!

for port in $PW_PORT $PWT_PORT $PGB_PORT $PGBT_PORT $HA_PORT ${PWA_PID:+$PWA_PORT}; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

for _ in $(seq 50); do [ -s "$work/pgbouncer-tls.pid" ] && break; sleep 0.1; done
PGB_PID=$(cat "$work/pgbouncer.pid"); PGBT_PID=$(cat "$work/pgbouncer-tls.pid")
HZ=$(getconf CLK_TCK)
pid_of() {
  case $1 in pgwarden) echo "$PW_PID" ;; pgwarden-alt) echo "$PWA_PID" ;; pgbouncer) echo "$PGB_PID" ;; haproxy) echo "$HA_PID" ;;
    pgwarden-nodetls) echo "$PWT_PID" ;; pgbouncer-nodetls) echo "$PGBT_PID" ;; esac
}
# CPU ticks (user + system) of a target's process; empty for direct PostgreSQL.
ticks() {
  local pid; pid=$(pid_of "$1"); [ -n "$pid" ] || return 0
  awk '{print $14 + $15}' "/proc/$pid/stat"
}

# For the log: the machine's idle and total ticks, then (for a proxy) its user and system ticks
# and context switches.
counters() {
  local pid; pid=$(pid_of "$1")
  echo "$(awk '/^cpu / {print $5, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat)" \
    "$([ -n "$pid" ] && awk '{print $14, $15}' "/proc/$pid/stat")" \
    "$([ -n "$pid" ] && awk '/ctxt_switches/ {s += $2} END {print s}' /proc/"$pid"/task/*/status)"
}
detail() {
  python3 -c 'import sys
a, b = [list(map(int, x.split())) for x in sys.argv[1:3]]
hz, tx = int(sys.argv[3]), int(sys.argv[4]) / 1000
out = f"idle={(b[0]-a[0])*100/max(b[1]-a[1], 1):.0f}%"
if len(a) == 5:
    out += f" user={(b[2]-a[2])*1000/hz/tx:.2f} sys={(b[3]-a[3])*1000/hz/tx:.2f} ms/1000tx switches={(b[4]-a[4])/tx:.0f}/1000tx"
print(out)' "$2" "$(counters "$1")" "$HZ" "$3"
}
# Memory mode: RSS from /proc/<pid>/status with 5 and with MEMORY_SESSIONS idle TLS sessions.
if [ -n "${MEMORY_SESSIONS:-}" ]; then
  printf '\\sleep 15 s\n' > "$work/idle.sql"
  rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
  # Opens $2 idle TLS sessions to $1's port, waits until they are established, prints the RSS.
  rss_with() {
    local pid port=$2 clients=$3; pid=$(pid_of "$1")
    PGSSLMODE=require "$PGBIN/pgbench" -n -c "$clients" -j 2 -t 1 -f "$work/idle.sql" \
      -h 127.0.0.1 -p "$port" -U bench bench >"$work/idle.log" 2>&1 &
    local bench=$! rss
    sleep 10
    rss=$(rss_kib "$pid")
    wait "$bench" || { echo "pgbench failed for $1:" >&2; cat "$work/idle.log" >&2; exit 1; }
    echo "$rss"
  }
  echo "| target | RSS with 5 sessions (KiB) | RSS with $MEMORY_SESSIONS sessions (KiB) | per session (bytes) |"
  echo "|---|---:|---:|---:|"
  for name in pgwarden pgbouncer haproxy; do
    port=$(case $name in pgwarden) echo "$PW_PORT" ;; pgbouncer) echo "$PGB_PORT" ;; haproxy) echo "$HA_PORT" ;; esac)
    few=$(rss_with "$name" "$port" 5)
    many=$(rss_with "$name" "$port" "$MEMORY_SESSIONS")
    echo "| $name | $few | $many | $(( (many - few) * 1024 / (MEMORY_SESSIONS - 5) )) |"
  done
  exit 0
fi

# name|port|sslmode
declare -A port_of=([direct]=$PG_PORT [pgwarden]=$PW_PORT [pgwarden-alt]=$PWA_PORT [pgbouncer]=$PGB_PORT [haproxy]=$HA_PORT
  [pgwarden-nodetls]=$PWT_PORT [pgbouncer-nodetls]=$PGBT_PORT)
names=${TARGETS:-direct pgwarden ${PWA_PID:+pgwarden-alt} pgwarden-nodetls pgbouncer pgbouncer-nodetls haproxy}
targets=()
for sslmode in ${SSLMODES:-disable require}; do
  for name in $names; do targets+=("$name|${port_of[$name]}|$sslmode"); done
done
# name|pgbench arguments
all_workloads=(
  "select-only, 16 clients, -M extended|-S -M extended -c 16 -j 2"
  "select-only, 16 clients, -M prepared|-S -M prepared -c 16 -j 2"
  "select-only, 1 client|-S -c 1 -j 1"
  "reconnect storm (-C), 8 clients|-S -C -c 8 -j 2"
  "reconnect storm (-C), 8 clients, 8 threads|-S -C -c 8 -j 8"
  "tpcb-like, 16 clients|-c 16 -j 2"
)
workloads=()
for w in "${all_workloads[@]}"; do
  if [[ -z "${WORKLOADS:-}" || "${w%%|*}" =~ $WORKLOADS ]]; then workloads+=("$w"); fi
done

: > "$work/runs.tsv"
for round in $(seq "$ROUNDS"); do
  for w in "${workloads[@]}"; do
    wname=${w%%|*}; wargs=${w#*|}
    for t in "${targets[@]}"; do
      IFS='|' read -r name port sslmode <<<"$t"
      before=$(ticks "$name"); d_before=$(counters "$name")
      [ -z "$(pid_of "$name")" ] || [ -d "/proc/$(pid_of "$name")" ] || { echo "$name is not running" >&2; exit 1; }
      out=$(PGSSLMODE=$sslmode "$PGBIN/pgbench" $wargs -T "$DURATION" -n -h 127.0.0.1 -p "$port" -U bench bench 2>&1) || {
        echo "pgbench failed for $name/$sslmode/$wname:" >&2; echo "$out" >&2; exit 1; }
      after=$(ticks "$name")
      txs=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
      failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
      [ "${failed:-0}" = 0 ] || { echo "$name/$sslmode/$wname: $failed failed transactions" >&2; exit 1; }
      run_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
      run_lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
      run_cpu=-
      [ -n "$before" ] && run_cpu=$(python3 -c "print(($after - $before) * 1000 / $HZ / ($txs / 1000))")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wname" "$name" "$sslmode" "$round" "$run_tps" "$run_lat" "$run_cpu" >> "$work/runs.tsv"
      echo "round $round: $wname|$name|$sslmode tps=$run_tps $(detail "$name" "$d_before" "$txs")" >&2
    done
  done
done

# The tables: means over the rounds with the spread, then the performance issue's targets.
python3 benches/summary.py "$work/runs.tsv"
