#!/usr/bin/env bash
# Transaction-pooling benchmark: pgbench against one PostgreSQL 15 node with max_connections 80
# (the business-1024 plan), directly, through pgwarden-proxy's pool address (DATABASE_POOL_URL)
# and through PgBouncer in transaction mode with prepared statements on (max_prepared_statements,
# PgBouncer 1.21+ built by `scripts/setup.sh --bench`; Debian 12's 1.18 has none), interleaved:
# every target in turn for each workload, ROUNDS times. Both poolers get 60 server connections
# (what the control plane gives business-1024's pool) and terminate client TLS; their idle server
# connections close after 1 s, and each run waits 3 s first, so that every target finds the
# node's connections free.
#
#   benches/pool.sh [seconds-per-run]        (default 10; Markdown tables on stdout)
#
# Per run: TPS; p50 and p99 latency from pgbench's per-transaction log, over the steady state
# (transactions ending after the first 2 s, while the pool fills and 1000 clients log in) and
# p99 over the whole run; the pooler's own CPU time per 1000 transactions (user + system, from
# /proc) and pgbench's, and what pgbench's CPU alone bounds the target to (all cores busy with
# pgbench, the pooler and PostgreSQL costing nothing) against direct's TPS. Workloads:
# - TLS reconnect storm: select-only, a new TLS connection per transaction (-C), 8 clients, each
#   its own pgbench process;
# - 1000 clients select-only (direct PostgreSQL refuses them: max_connections 80);
# - 16 clients, prepared statements (-M prepared), tpcb-like.
#
# Environment: ROUNDS (default 1), WORKLOADS (an extended regular expression on the workload's
# name), TARGETS (default "direct pgwarden pgbouncer", plus pgwarden-base with BASE_PROXY),
# BASE_PROXY (another pgwarden-proxy binary, say a build of an earlier commit: it runs beside
# this one as the target pgwarden-base, configured alike, for an A/B comparison in one run),
# PROXY_THREADS and BASE_THREADS (the runtime threads of each; default one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
ROUNDS=${ROUNDS:-1}
PGBIN=/usr/lib/postgresql/15/bin
RUN_AS=${PGWARDEN_NODE_USER:-postgres}

scripts/setup.sh --bench >&2
cargo build --release --locked -p pgwarden-proxy >&2
cache=/var/cache/pgwarden
[ "$(id -u)" = 0 ] || cache="$HOME/.cache/pgwarden"
PGBOUNCER=$(ls -d "$cache"/pgbouncer-*/bin/pgbouncer | sort -V | tail -n1)

work=$(mktemp -d /tmp/pgwarden-pool-bench-XXXXXX)
pids=()
cleanup() {
  mkdir -p /tmp/pgwarden-bench-logs && cp "$work"/*.log /tmp/pgwarden-bench-logs/ 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/pgbouncer.pid" ] && kill "$(cat "$work/pgbouncer.pid")" 2>/dev/null || true
  [ -f "$work/data/postmaster.pid" ] && as_node "$PGBIN/pg_ctl" -D "$work/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=benches/common.sh
. benches/common.sh

make_certs "$work"

PG_PORT=$(free_port); PW_PORT=$(free_port); PW_POOL=$(free_port); PW_ADMIN=$(free_port); PGB_PORT=$(free_port)
PASSWORD=bench-password
start_node "$work" "$PG_PORT" 80
export PGPASSWORD=$PASSWORD

# pgwarden-proxy as the control plane runs it: it authenticates clients (the role's verifier
# in the table) and pools on its pool address.
python3 - "$PG_PORT" "$SCRAM" > "$work/routes.json" <<'PY'
import json, sys
port, scram = sys.argv[1:3]
print(json.dumps({"epoch": 1, "databases": {"bench": {
    "primary": f"127.0.0.1:{port}", "users": {"bench": scram}, "pool_size": 60}}}))
PY
cat > "$work/proxy.toml" <<TOML
listen = "127.0.0.1:$PW_PORT"
pool_listen = "127.0.0.1:$PW_POOL"
admin_listen = "127.0.0.1:$PW_ADMIN"
admin_token = "bench"
routes_file = "$work/routes.json"
# Each target gets the node's connections in turn: idle server connections close within 1 s.
limits = { pool_idle_timeout_secs = 1 }
${PROXY_THREADS:+worker_threads = $PROXY_THREADS}
[tls]
cert = "$work/server.crt"
key = "$work/server.key"
TOML
RUST_LOG=warn target/release/pgwarden-proxy --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
pids+=($!)
PW_PID=$!
PWB_PID= PWB_POOL=
if [ -n "${BASE_PROXY:-}" ]; then
  PWB_PORT=$(free_port); PWB_POOL=$(free_port); PWB_ADMIN=$(free_port)
  sed -e "s/:$PW_PORT\"/:$PWB_PORT\"/" -e "s/:$PW_POOL\"/:$PWB_POOL\"/" \
    -e "s/:$PW_ADMIN\"/:$PWB_ADMIN\"/" "$work/proxy.toml" > "$work/proxy-base.toml"
  if [ -n "${BASE_THREADS:-}" ]; then
    sed -i -e '/^worker_threads/d' -e "s/^\[tls\]/worker_threads = $BASE_THREADS\n[tls]/" "$work/proxy-base.toml"
  fi
  RUST_LOG=warn "$BASE_PROXY" --config "$work/proxy-base.toml" >"$work/proxy-base.log" 2>&1 &
  pids+=($!)
  PWB_PID=$!
fi

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
pool_mode = transaction
max_prepared_statements = 200
max_client_conn = 2000
default_pool_size = 60
server_idle_timeout = 1
client_tls_sslmode = allow
client_tls_cert_file = $work/server.crt
client_tls_key_file = $work/server.key
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
INI
[ "$(id -u)" = 0 ] && chown -R "$RUN_AS" "$work"
as_node sh -c 'ulimit -n "$(ulimit -Hn)" && exec "$1" -q "$2"' sh "$PGBOUNCER" "$work/pgbouncer.ini" &
pids+=($!)

for port in $PW_POOL $PGB_PORT $PWB_POOL; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
for _ in $(seq 50); do [ -s "$work/pgbouncer.pid" ] && break; sleep 0.1; done
PGB_PID=$(cat "$work/pgbouncer.pid")
HZ=$(getconf CLK_TCK)
pid_of() { case $1 in pgwarden) echo "$PW_PID" ;; pgwarden-base) echo "$PWB_PID" ;; pgbouncer) echo "$PGB_PID" ;; esac; }
ticks() { local pid; pid=$(pid_of "$1"); [ -n "$pid" ] && awk '{print $14 + $15}' "/proc/$pid/stat" || true; }
declare -A port_of=([direct]=$PG_PORT [pgwarden]=$PW_POOL [pgbouncer]=$PGB_PORT [pgwarden-base]=$PWB_POOL)
ulimit -n "$(ulimit -Hn)"

# name|sslmode|pgbench processes|arguments of each. The storm's clients are separate processes,
# as an application's workers are: the threads of one pgbench spend a quarter of its CPU on
# OpenSSL 3.0's internal locks, each SCRAM iteration taking them (perf, benches/RESULTS.md).
all_workloads=(
  "TLS reconnect storm (-C), 8 clients|require|8|-S -C -c 1 -j 1"
  "1000 clients, select-only|disable|1|-S -c 1000 -j 4"
  "16 clients, -M prepared, tpcb-like|disable|1|-M prepared -c 16 -j 4"
)
workloads=()
for w in "${all_workloads[@]}"; do
  if [[ -z "${WORKLOADS:-}" || "${w%%|*}" =~ $WORKLOADS ]]; then workloads+=("$w"); fi
done
names=${TARGETS:-direct pgwarden ${BASE_PROXY:+pgwarden-base }pgbouncer}

: > "$work/runs.tsv"
for round in $(seq "$ROUNDS"); do
  for w in "${workloads[@]}"; do
    IFS='|' read -r wname sslmode procs wargs <<<"$w"
    # Each round starts one target further on, so that no target always follows the same one
    # (say, a tpcb-like run whose writes leave the node checkpointing and vacuuming).
    read -r -a order <<<"$names"
    shift_by=$(( (round - 1) % ${#order[@]} ))
    for name in "${order[@]:shift_by}" "${order[@]:0:shift_by}"; do
      if [ "$name" = direct ] && [[ "$wargs" == *"-c 1000"* ]]; then
        printf '%s\t%s\t%s\t-\t-\t-\t-\t-\t-\n' "$wname" "$name" "$round" >> "$work/runs.tsv"
        continue # max_connections 80: PostgreSQL refuses most of them
      fi
      rm -f "$work"/txlog*
      sleep 3 # the previous target's idle server connections close
      before=$(ticks "$name")
      # Every process's output in out.N; the client's own CPU (all pgbench processes, user +
      # system) from the subshell's `times`.
      client_cpu=$(cd "$work" && export PGSSLMODE=$sslmode && {
        for i in $(seq "$procs"); do
          "$PGBIN/pgbench" $wargs -T "$DURATION" -n -l --log-prefix=txlog \
            -h 127.0.0.1 -p "${port_of[$name]}" -U bench bench >"out.$i" 2>&1 &
        done
        wait
        times > times.txt # not in a pipe: a subshell would report its own children
        tail -n1 times.txt
      }) || true
      after=$(ticks "$name")
      for i in $(seq "$procs"); do
        grep -q '^tps = ' "$work/out.$i" || {
          echo "pgbench failed for $name/$wname:" >&2; tail -5 "$work/out.$i" >&2; exit 1; }
      done
      sum() { cat "$work"/out.* | sed -n "s/$1/\1/p" | python3 -c 'import sys; print(sum(float(l) for l in sys.stdin))'; }
      txs=$(sum '^number of transactions actually processed: \([0-9]*\).*')
      failed=$(sum '^number of failed transactions: \([0-9]*\).*')
      [ "${failed%.*}" = 0 ] || { echo "$name/$wname: $failed failed transactions" >&2; exit 1; }
      tps=$(sum '^tps = \([0-9.]*\).*')
      rm -f "$work"/out.*
      cpu=-
      [ -n "$before" ] && cpu=$(python3 -c "print(round(($after - $before) * 1000 / $HZ / ($txs / 1000), 3))")
      # `times`: "0m1.500s 0m0.250s" (children's user, system).
      client=$(python3 -c "
import re, sys
m = re.findall(r'(\d+)m([\d.]+)s', sys.argv[1])
print(round(sum(int(a) * 60 + float(b) for a, b in m) * 1000 / ($txs / 1000), 3))" "$client_cpu")
      # p50/p99 of the steady state: transactions that ended after the first 2 s (the pool
      # fills, 1000 clients finish logging in); p99 of the whole run too.
      read -r p50 p99 p99all < <(cat "$work"/txlog* | python3 -c '
import sys
rows = [l.split() for l in sys.stdin if l.strip()]
ends = [int(r[4]) + int(r[5]) / 1e6 for r in rows]
start = min(ends)
pct = lambda xs, q: xs[min(len(xs) - 1, len(xs) * q // 100)] / 1000
whole = sorted(int(r[2]) for r in rows)
steady = sorted(int(r[2]) for r, end in zip(rows, ends) if end - start >= 2) or whole
print(f"{pct(steady, 50):.2f} {pct(steady, 99):.2f} {pct(whole, 99):.2f}")')
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wname" "$name" "$round" "$tps" "$p50" "$p99" "$cpu" "$client" "$p99all" >> "$work/runs.tsv"
      echo "round $round: $wname | $name: tps=$tps p50=${p50}ms p99=${p99}ms p99_whole=${p99all}ms cpu=${cpu}ms/1000tx pgbench=${client}ms/1000tx" >&2
    done
  done
done

python3 - "$work/runs.tsv" <<'PY'
import os, sys, collections, statistics
CORES = os.cpu_count()
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = collections.defaultdict(list)
for w, name, rnd, tps, p50, p99, cpu, client, p99all in rows:
    by[(w, name)].append((tps, p50, p99, cpu, client, p99all))
workloads = list(dict.fromkeys(r[0] for r in rows))
names = list(dict.fromkeys(r[1] for r in rows))
mean = lambda xs: statistics.mean(float(x) for x in xs) if xs and xs[0] != "-" else None
for w in workloads:
    print(f"\n{w}\n")
    print("| target | TPS | vs direct | vs PgBouncer | p50 (ms) | p99 (ms) | p99, whole run (ms) | pooler CPU (ms / 1000 tx) | pgbench CPU (ms / 1000 tx) | bound: pgbench alone (TPS, vs direct) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tps = {n: mean([r[0] for r in by[(w, n)]]) for n in names}
    for n in names:
        runs = by[(w, n)]
        t = tps[n]
        if t is None:
            print(f"| {n} | refused (max_connections 80) | | | | | | | | |")
            continue
        d = f"{t / tps['direct']:.2f}x" if tps.get("direct") else "-"
        b = f"{t / tps['pgbouncer']:.2f}x" if tps.get("pgbouncer") else "-"
        p50, p99 = mean([r[1] for r in runs]), mean([r[2] for r in runs])
        cpu = mean([r[3] for r in runs]) if runs[0][3] != "-" else None
        client, p99all = mean([r[4] for r in runs]), mean([r[5] for r in runs])
        # The most this target could serve if the pooler and PostgreSQL cost nothing: every
        # core busy with pgbench alone, at its measured CPU per transaction.
        bound = CORES * 1e6 / client
        vs = f", {bound / tps['direct']:.2f}x" if tps.get("direct") else ""
        print(f"| {n} | {t:.0f} | {d} | {b} | {p50:.2f} | {p99:.2f} | {p99all:.2f} | {'-' if cpu is None else f'{cpu:.2f}'} | {client:.2f} | {bound:.0f}{vs} |")
PY
