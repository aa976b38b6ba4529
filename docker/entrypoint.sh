#!/usr/bin/env bash
# The entrypoint of every container of docker-compose.yml; its first argument is the role.
# Addresses are fixed on the compose network ($PGWARDEN_NET.x, see docker-compose.yml):
# etcd .11-.13, agents .21-.23, control planes .31-.32, proxies .41-.42, the proxies'
# virtual IP .100 (held by the active proxy). Secrets live in the `secrets` volume (0600,
# root), made once by the `init` role; nothing secret is put on a command line or in a log.
set -euo pipefail

role="${1:?role: init, etcd, agent, plane, proxy, provision or loadgen}"
net="${PGWARDEN_NET:?PGWARDEN_NET, the network prefix such as 172.28.5}"
addr="${PGWARDEN_ADDR:-}"
vip="$net.100"
etcd_urls="http://$net.11:2379,http://$net.12:2379,http://$net.13:2379"
planes=("$net.31" "$net.32")
secrets=/secrets/cp
umask 077

case "$role" in
init)
  # The control planes' shared secrets (API token, proxies' token, secret key, CA), each
  # agent's certificate and the proxies' certificate for the virtual IP; kept when present.
  pgwarden --data-dir "$secrets" init
  for host in 21 22 23; do
    out="/secrets/agent-$net.$host"
    [ -s "$out/agent.crt" ] || pgwarden --data-dir "$secrets" agent-cert --address "$net.$host" --out "$out"
  done
  [ -s /secrets/proxy/agent.crt ] ||
    pgwarden --data-dir "$secrets" agent-cert --address "$vip" --address localhost --out /secrets/proxy
  ;;
etcd)
  cluster="e1=http://$net.11:2380,e2=http://$net.12:2380,e3=http://$net.13:2380"
  exec etcd --name "${PGWARDEN_NAME:?}" --data-dir /data \
    --listen-client-urls "http://$addr:2379" --advertise-client-urls "http://$addr:2379" \
    --listen-peer-urls "http://$addr:2380" --initial-advertise-peer-urls "http://$addr:2380" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token pgwarden
  ;;
agent)
  exec pgwarden agent --listen "$addr:9190" --advertise "$addr:9190" \
    --tls-dir "/secrets/agent-$addr" --etcd "$etcd_urls"
  ;;
plane)
  # Each plane has its own data dir and the shared secrets, copied once; backups and the WAL
  # archive go to the volume both planes mount (a new leader has its predecessor's).
  mkdir -p /data
  for file in token proxy-token secret.key ca; do
    [ -e "/data/$file" ] || cp -a "$secrets/$file" "/data/$file"
  done
  args=()
  for host in 21 22 23; do args+=(--agent "$net.$host:9190"); done
  for host in 41 42; do args+=(--proxy-admin "$net.$host:9181"); done
  exec pgwarden --data-dir /data serve --listen "$addr:9180" --advertise "$addr:9180" \
    --etcd "$etcd_urls" "${args[@]}" --proxy-token-file /data/proxy-token --backup-dir /backups \
    --client-addr "$vip:6432" --client-pool-addr "$vip:6433"
  ;;
proxy)
  # The active proxy of the pair (elected through etcd) holds the virtual IP: on_active adds
  # it and announces it (gratuitous ARP), on_standby removes it.
  config=/run/pgwarden-proxy.toml
  cat >"$config" <<TOML
listen = "$vip:6432"
pool_listen = "$vip:6433"
admin_listen = "$addr:9181"
admin_token_file = "$secrets/proxy-token"
[tls]
cert = "/secrets/proxy/agent.crt"
key = "/secrets/proxy/agent.key"
[etcd]
endpoints = ["http://$net.11:2379", "http://$net.12:2379", "http://$net.13:2379"]
[ha]
etcd_pair = "main"
on_active = "ip addr add $vip/24 dev eth0 && (arping -q -U -c 2 -I eth0 $vip || true)"
on_standby = "ip addr del $vip/24 dev eth0 || true"
TOML
  exec pgwarden-proxy --config "$config"
  ;;
provision)
  # Creates the database "$PGWARDEN_DATABASE" once (through whichever plane leads), then
  # writes its environment to /shared/app.env (0600) for the load generator and the operator.
  name="${PGWARDEN_DATABASE:-app}"
  plan="${PGWARDEN_PLAN:-postgresql-business-512}"
  for _ in $(seq 120); do
    for plane in "${planes[@]}"; do
      cli=(pgwarden --api "http://$plane:9180" --data-dir "$secrets")
      list="$("${cli[@]}" --output json list 2>/dev/null)" || continue
      # The platform gives the database an id of the name and a suffix: app-1234.
      mine='[.[] | select(.id | startswith($n + "-"))][0]'
      id="$(jq -r --arg n "$name" "$mine.id // empty" <<<"$list")"
      if [ -z "$id" ]; then
        echo "provision: creating $name ($plan) through $plane"
        "${cli[@]}" create "$name" --plan "$plan" || continue
        continue
      fi
      status="$(jq -r --arg n "$name" "$mine.status" <<<"$list")"
      if [ "$status" = running ]; then
        "${cli[@]}" env "$id" >/shared/app.env.part && mv /shared/app.env.part /shared/app.env
        echo "provision: $name ($id) is running; its DATABASE_URL is in /shared/app.env" \
          "(scripts/compose.sh env prints it)"
        exit 0
      fi
      echo "provision: $name is $status"
    done
    sleep 2
  done
  echo "provision: $name did not start running" >&2
  exit 1
  ;;
loadgen)
  # Inserts a row per connection through DATABASE_URL and records each acknowledged one in
  # /shared/acked (id, the node's address, when): a check then finds every id in the table. Bounded: stops after
  # $PGWARDEN_LOAD_SECONDS (600 by default).
  until [ -s /shared/app.env ]; do sleep 1; done
  url="$(sed -n 's/^DATABASE_URL=//p' /shared/app.env)"
  # The password goes to libpq through the environment, not on psql's command line.
  userinfo="${url#*://}"
  userinfo="${userinfo%%@*}"
  export PGPASSWORD="${userinfo#*:}"
  url="${url/:$PGPASSWORD@/@}"
  export PGCONNECT_TIMEOUT=5
  until timeout 15 psql -X -q "$url" -c \
    'create table if not exists pgwarden_load (id bigint primary key, at timestamptz not null default now())'; do
    sleep 1
  done
  last="$( (tail -n 1 /shared/acked 2>/dev/null || true) | cut -d ' ' -f 1)"
  i=$((${last:-0} + 1000))
  end=$((SECONDS + ${PGWARDEN_LOAD_SECONDS:-600}))
  echo "loadgen: writing from id $i"
  while [ "$SECONDS" -lt "$end" ]; do
    i=$((i + 1))
    insert="insert into pgwarden_load (id) values ($i) returning inet_server_addr()"
    if server="$(timeout 10 psql -X -Atq "$url" -c "$insert" 2>/tmp/err)"; then
      echo "$i $server $(date +%s.%N)" >>/shared/acked
    else
      echo "loadgen: $(date -u +%T.%N | cut -c1-12) insert $i failed: $(head -c 200 /tmp/err)"
    fi
    sleep 0.05
  done
  echo "loadgen: done"
  ;;
*)
  echo "unknown role $role" >&2
  exit 2
  ;;
esac
