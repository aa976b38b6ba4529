# Shared by the benchmark scripts (sourced): the node user, free ports, test certificates and the
# one PostgreSQL 15 node every target talks to. Expects PGBIN and RUN_AS.

as_node() { if [ "$(id -u)" = 0 ]; then runuser -u "$RUN_AS" -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One CA and one server certificate for 127.0.0.1/localhost in $1, used by every TLS server.
make_certs() {
  local dir=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$dir/san.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/san.ext" -out "$dir/server.crt" 2>/dev/null
  chmod 600 "$dir/server.key"
}

# A node in $1/data on port $2 with max_connections $3 and TLS, role and database `bench`
# (password $PASSWORD), pgbench tables at scale 10; sets SCRAM to the role's verifier.
start_node() {
  local dir=$1 port=$2 max=$3
  [ "$(id -u)" = 0 ] && chown -R "$RUN_AS" "$dir"
  echo "$PASSWORD" > "$dir/pw"; [ "$(id -u)" = 0 ] && chown "$RUN_AS" "$dir/pw"
  as_node "$PGBIN/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$dir/pw" --no-sync >/dev/null
  cat >> "$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = $max
shared_buffers = 256MB
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
CONF
  as_node "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w start >/dev/null
  psql_su() { as_node "$PGBIN/psql" -X -q -h "$dir" -p "$port" -U postgres "$@"; }
  psql_su -c "CREATE ROLE bench LOGIN PASSWORD '$PASSWORD'" -c "CREATE DATABASE bench OWNER bench"
  PGPASSWORD=$PASSWORD "$PGBIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$port" -U bench bench >/dev/null 2>&1
  SCRAM=$(psql_su -At -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'bench'")
}
