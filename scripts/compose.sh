#!/usr/bin/env bash
# docker-compose.yml on this machine, with no image registry (see the README):
#   scripts/compose.sh up      set up what is missing (Docker engine, docker-compose,
#                              debootstrap), build the binaries and the images, start the
#                              platform, wait for the database, print its environment
#   scripts/compose.sh env     print the database's DATABASE_URL and DATABASE_POOL_URL
#   scripts/compose.sh test    from a clean start: load through the proxies' virtual IP, kill
#                              (SIGKILL) the container of the primary's host, check that writes
#                              resume and that every acknowledged write is in the table
#   scripts/compose.sh down    stop everything and remove the volumes
# Rerunnable: each step does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

project="${PGWARDEN_COMPOSE_PROJECT:-pgwarden}"
net="${PGWARDEN_NET:-172.28.5}"
export PGWARDEN_NET="$net"

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -p "$project" "$@"
  else
    docker-compose -p "$project" "$@"
  fi
}

build() {
  scripts/setup.sh --docker
  cargo build --release --locked -p pgwarden-control -p pgwarden-proxy --bins
  docker/base.sh
  docker build -q -t pgwarden:dev . >/dev/null
}

# The one-shot `provision` service's state: running, or exited with its code.
provisioned() {
  local id
  id="$(compose ps -q provision)"
  [ -n "$id" ] && docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id"
}

up() {
  build
  # `up` returns once provision has ended (loadgen depends on it); a failure says why.
  if ! compose up -d; then
    compose logs --tail 30 provision cp1 cp2 >&2 || true
    exit 1
  fi
  [ "$(provisioned)" = "exited 0" ] || { compose logs --tail 30 provision >&2; exit 1; }
  print_env
}

print_env() {
  compose run --rm -T --no-deps --entrypoint cat loadgen /shared/app.env
}

# Runs a bash script in a fresh container of the load generator's service (its volumes,
# the network, the secrets as the control planes' data dir).
in_loadgen() {
  compose run --rm -T --no-deps -v "${project}_secrets:/secrets:ro" --entrypoint bash loadgen -c "$1"
}

acked_count() {
  docker exec "$(compose ps -q loadgen)" sh -c 'wc -l </shared/acked 2>/dev/null || echo 0'
}

test_failover() {
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  PGWARDEN_LOAD_SECONDS=300 up >/dev/null
  echo "compose test: platform up, database provisioned"
  for _ in $(seq 60); do [ "$(acked_count)" -ge 100 ] && break; sleep 1; done
  [ "$(acked_count)" -ge 100 ] || { echo "compose test: no load acknowledged" >&2; exit 1; }

  # The primary's host, as the leading control plane reports it.
  primary="$(in_loadgen "for plane in $net.31 $net.32; do
      list=\"\$(pgwarden --api http://\$plane:9180 --data-dir /secrets/cp --output json list)\" || continue
      jq -r '.[0].nodes[] | select(.role == \"primary\") | .host' <<<\"\$list\"
      break
    done 2>/dev/null")"
  case "$primary" in
    "$net.21") host=db1 ;; "$net.22") host=db2 ;; "$net.23") host=db3 ;;
    *) echo "compose test: no primary found ($primary)" >&2; exit 1 ;;
  esac
  before="$(acked_count)"
  echo "compose test: $before writes acknowledged; killing $host (the primary's host, $primary)"
  container="$(compose ps -q "$host")"
  killed_at="$(date +%s.%N)"
  docker kill -s KILL "$container" >/dev/null
  # The first write another node acknowledged after the kill (each ack: id, node, time).
  resumed=""
  for _ in $(seq 300); do
    resumed="$(docker exec "$(compose ps -q loadgen)" awk -v old="$primary" -v t="$killed_at" \
      '$2 != old && $3 > t { printf "%.2f", $3 - t; exit }' /shared/acked)"
    [ -n "$resumed" ] && break
    sleep 0.2
  done
  if [ -z "$resumed" ]; then
    compose logs --tail 30 cp1 cp2 loadgen >&2
    echo "compose test: writes did not resume on another node within 60 s" >&2
    exit 1
  fi
  echo "compose test: writes resumed on another node $resumed s after the kill"
  sleep 5
  compose stop -t 1 loadgen >/dev/null
  # Every acknowledged id must be in the table.
  result="$(in_loadgen '
    url="$(sed -n "s/^DATABASE_URL=//p" /shared/app.env)"
    userinfo="${url#*://}"; userinfo="${userinfo%%@*}"
    export PGPASSWORD="${userinfo#*:}" PGCONNECT_TIMEOUT=5
    url="${url/:$PGPASSWORD@/@}"
    psql -X -Atq "$url" -c "select id from pgwarden_load" | sort -n >/tmp/stored
    cut -d " " -f 1 /shared/acked | sort -n >/tmp/acked
    echo "$(wc -l </tmp/acked) $(comm -23 /tmp/acked /tmp/stored | wc -l)"')"
  read -r acked lost <<<"$result"
  echo "compose test: $acked writes acknowledged, $lost of them missing from the table"
  [ "$acked" -gt "$before" ] && [ "$lost" = 0 ] || exit 1
  # The killed host comes back and its node rejoins: a standby again, commits synchronous.
  compose start "$host" >/dev/null
  want="synchronous replica/running"
  state=""
  for _ in $(seq 60); do
    state="$(in_loadgen "for plane in $net.31 $net.32; do
        list=\"\$(pgwarden --api http://\$plane:9180 --data-dir /secrets/cp --output json list)\" || continue
        jq -r '.[0] | .replication + \" \" + ([.nodes[] | select(.host == \"$primary\") | .role + \"/\" + .status] | join(\",\"))' <<<\"\$list\"
        break
      done 2>/dev/null")" || true
    [ "$state" = "$want" ] && break
    sleep 2
  done
  if [ "$state" != "$want" ]; then
    compose logs --tail 30 cp1 cp2 "$host" >&2
    echo "compose test: $host's node did not rejoin as a synchronous standby: $state" >&2
    exit 1
  fi
  echo "compose test: $host's node rejoined as a standby, commits synchronous again"
  echo "compose test: passed"
  [ "${PGWARDEN_KEEP:-0}" = 1 ] || compose down -v --remove-orphans >/dev/null 2>&1
}

case "${1:-}" in
  up) up ;;
  env) print_env ;;
  test) test_failover ;;
  down) compose down -v --remove-orphans ;;
  *) echo "usage: scripts/compose.sh up|env|test|down" >&2; exit 2 ;;
esac
