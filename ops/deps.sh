#!/usr/bin/env bash
# Make Postgres and NATS (with JetStream) available for local development.
#
# Idempotent. For each service: reuse it when it already answers; otherwise,
# when it is meant to run on this machine, start it (installing the Debian
# packages first when they are missing). Then create the database named in
# DATABASE_URL, and check the tools the test suite and benchmarks need:
# `nats-server` (integration tests spawn their own on random ports) and
# `pgbench`.
#
# This is a LOCAL DEVELOPMENT setup, not a deployment: a Postgres cluster this
# script installs or starts is configured for password-less logins from
# localhost (see ensure_pg_login).
#
# Settings (all optional):
#   DATABASE_URL             postgres://postgres@127.0.0.1:5432/overfly
#   NATS_URL                 nats://127.0.0.1:4222
#   OVERFLY_DEPS_TIMEOUT     seconds to wait for each service (default 60)
#   OVERFLY_PG_CLUSTER       name for a Postgres cluster this script has to
#                            create when none serves the port (default main)
#   OVERFLY_NATS_STORE_DIR   JetStream store dir for a NATS server this script
#                            starts (default /var/lib/nats-server, or
#                            /var/lib/nats-server-<port> for another port)
#   OVERFLY_NATS_LOG         its log file (default /var/log/nats-server.log,
#                            or /var/log/nats-server-<port>.log)
set -euo pipefail
# shellcheck source=ops/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WAIT_S="${OVERFLY_DEPS_TIMEOUT:-60}"
PG_CLUSTER="${OVERFLY_PG_CLUSTER:-main}"

pg_parts="$(pg_url_parts "$DATABASE_URL")"
read -r PG_USER PG_HOST PG_PORT PG_DB <<<"$pg_parts"
nats_parts="$(nats_url_parts "$NATS_URL")"
read -r NATS_HOST NATS_PORT <<<"$nats_parts"

if [ "$NATS_PORT" = 4222 ]; then
  NATS_STORE_DIR="${OVERFLY_NATS_STORE_DIR:-/var/lib/nats-server}"
  NATS_LOG="${OVERFLY_NATS_LOG:-/var/log/nats-server.log}"
else
  NATS_STORE_DIR="${OVERFLY_NATS_STORE_DIR:-/var/lib/nats-server-$NATS_PORT}"
  NATS_LOG="${OVERFLY_NATS_LOG:-/var/log/nats-server-$NATS_PORT.log}"
fi

# Names end up inside SQL identifiers; keep them simple.
valid_ident() { [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_-]*$ ]]; }
valid_ident "$PG_DB" || die "database name '$PG_DB' in DATABASE_URL: use letters, digits, _ and -"
valid_ident "$PG_USER" || die "user name '$PG_USER' in DATABASE_URL: use letters, digits, _ and -"

# Same URL, but connected to the maintenance database `postgres`.
admin_url() {
  local base query rest
  base="${DATABASE_URL%%\?*}"
  query="${DATABASE_URL#"$base"}"
  rest="${base#*://}"
  if [ "${rest#*/}" != "$rest" ]; then
    printf '%s/postgres%s\n' "${base%/*}" "$query"
  else
    printf '%s/postgres%s\n' "$base" "$query"
  fi
}
ADMIN_URL="$(admin_url)"

# What this run did, for the summary and for ensure_pg_login.
PG_ACTION="reused"
NATS_ACTION="reused"
# "ver name" of the local cluster serving PG_PORT, once known.
PG_CLUSTER_ID=""

# ------------------------------------------------------------------ probes
pg_up() {
  if have pg_isready && pg_isready -h "$PG_HOST" -p "$PG_PORT" -t 3 -q >/dev/null 2>&1; then
    return 0
  fi
  # pg_isready may be missing (fresh machine): fall back to a plain TCP check
  # only when it is absent, since it also tells "starting up" apart.
  ! have pg_isready && tcp_open "$PG_HOST" "$PG_PORT"
}

systemd_running() { [ -d /run/systemd/system ] && have systemctl; }

# Up means: something accepts the connection AND greets like a NATS server
# (a bare TCP connect is not enough behind transparent proxies).
nats_up() {
  # shellcheck disable=SC2016 # $0/$1 expand in the inner bash.
  timeout 4 bash -c 'exec 3<>"/dev/tcp/$0/$1" && IFS= read -r -t 3 line <&3 && [[ "$line" == INFO* ]]' \
    "$NATS_HOST" "$NATS_PORT" 2>/dev/null
}

pg_server_installed() {
  have pg_ctlcluster && have pg_lsclusters &&
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

nats_server_bin() {
  if have nats-server; then
    command -v nats-server
  elif [ -x /usr/sbin/nats-server ]; then
    echo /usr/sbin/nats-server
  else
    return 1
  fi
}

pgbench_ok() { have pgbench && pgbench --version >/dev/null 2>&1; }

# Does the NATS server answer JetStream API requests? Speaks the NATS text
# protocol over bash's /dev/tcp, so it needs neither curl nor the nats CLI.
# 0: JetStream enabled; 1: not enabled; 2/3: could not tell.
nats_jetstream() (
  exec 3<>"/dev/tcp/$NATS_HOST/$NATS_PORT" 2>/dev/null || exit 2
  # shellcheck disable=SC2016 # $JS is a NATS subject, not a variable.
  printf 'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\nSUB _INBOX.overfly.deps 1\r\nPUB $JS.API.INFO _INBOX.overfly.deps 0\r\n\r\nPING\r\n' >&3
  deadline=$((SECONDS + 5))
  while [ "$SECONDS" -lt "$deadline" ] && IFS= read -r -t 5 line <&3; do
    line="${line%$'\r'}"
    case "$line" in
      *'"type":"io.nats.jetstream.api.v1.account_info_response"'*'"error":'*) exit 1 ;;
      *'"type":"io.nats.jetstream.api.v1.account_info_response"'*) exit 0 ;;
      'NATS/1.0 503'*) exit 1 ;; # no responders: nobody serves the JetStream API
      -ERR*) printf '    nats: %s\n' "$line" >&2; exit 3 ;;
    esac
  done
  exit 3
)

# Wait until "$@" succeeds, at most WAIT_S seconds.
wait_for() {
  local what="$1" deadline=$((SECONDS + WAIT_S))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
  note "$what answers"
}

# --------------------------------------------------------------- packages
install_packages() {
  [ "$#" -gt 0 ] || return 0
  step "installing Debian packages: $*"
  have apt-get || die "apt-get not found: install $* yourself (this script knows Debian/Ubuntu only)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null ||
    die "apt-get update failed (network? mirrors?)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null ||
    die "apt-get install $* failed"
  ok "installed $*"
}

plan_packages() {
  local -a pkgs=()
  if ! pg_up && is_local_host "$PG_HOST" && ! pg_server_installed; then
    pkgs+=(postgresql postgresql-contrib)
    PG_ACTION="installed"
  fi
  if ! have psql; then pkgs+=(postgresql-client); fi
  if ! pgbench_ok; then pkgs+=(postgresql-contrib); fi
  if ! nats_server_bin >/dev/null; then
    pkgs+=(nats-server)
    nats_up || NATS_ACTION="installed"
  fi
  # The demo talks to the HTTP API with curl.
  if ! have curl; then pkgs+=(curl); fi
  [ "${#pkgs[@]}" -gt 0 ] || return 0
  # de-duplicate, keep order
  local -a uniq=()
  local p q seen
  for p in "${pkgs[@]}"; do
    seen=0
    for q in "${uniq[@]+"${uniq[@]}"}"; do [ "$p" = "$q" ] && seen=1; done
    [ "$seen" = 1 ] || uniq+=("$p")
  done
  install_packages "${uniq[@]}"
}

# --------------------------------------------------------------- Postgres
# Print "ver name status" of the local cluster on PG_PORT, if any.
pg_cluster_on_port() {
  pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2, $4; exit }'
}

pg_start_local() {
  local found ver name status
  found="$(pg_cluster_on_port)"
  if [ -n "$found" ]; then
    read -r ver name status <<<"$found"
    PG_CLUSTER_ID="$ver $name"
    if [ "$status" != online ]; then
      note "starting cluster $ver/$name"
      pg_ctl_cluster "$ver" "$name" start ||
        die "could not start Postgres cluster $ver/$name (see /var/log/postgresql/postgresql-$ver-$name.log)"
      [ "$PG_ACTION" = installed ] || PG_ACTION="started"
    fi
    return 0
  fi
  # No cluster serves this port: create one.
  if pg_lsclusters -h 2>/dev/null | awk -v n="$PG_CLUSTER" '$2 == n { f = 1 } END { exit !f }'; then
    die "no Postgres cluster on port $PG_PORT, and a cluster named '$PG_CLUSTER' already exists on another port:
$(pg_lsclusters)
Point DATABASE_URL at its port, or set OVERFLY_PG_CLUSTER to a new name."
  fi
  ver="$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sed 's#^/usr/lib/postgresql/##; s#/.*##' | sort -V | tail -n 1)"
  note "creating cluster $ver/$PG_CLUSTER on port $PG_PORT"
  as_root pg_createcluster "$ver" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null ||
    die "pg_createcluster $ver $PG_CLUSTER failed"
  pg_ctl_cluster "$ver" "$PG_CLUSTER" start ||
    die "could not start Postgres cluster $ver/$PG_CLUSTER"
  PG_CLUSTER_ID="$ver $PG_CLUSTER"
  [ "$PG_ACTION" = installed ] || PG_ACTION="created"
}

# pg_ctlcluster, going through systemd where systemd runs (a fresh Debian VM)
# and straight to pg_ctl where it does not (containers, this kind of dev box).
pg_ctl_cluster() {
  if systemd_running; then
    as_root pg_ctlcluster "$@"
  else
    as_root pg_ctlcluster --skip-systemctl-redirect "$@"
  fi
}

# Run a command as the `postgres` OS user (peer authentication over the
# local socket), from / so that it does not complain about our cwd.
as_postgres() {
  if [ "$(id -un)" = postgres ]; then
    (cd / && "$@")
  elif [ "$(id -u)" -eq 0 ] && have runuser; then
    (cd / && runuser -u postgres -- "$@")
  elif have sudo; then
    (cd / && sudo -n -u postgres -- "$@")
  else
    return 1
  fi
}

# SQL through the URL's own credentials.
psql_url() { PGCONNECT_TIMEOUT=5 psql -w -X -v ON_ERROR_STOP=1 -tAq "$@"; }
# SQL as the postgres superuser over the local socket (local clusters only).
psql_local_super() { as_postgres psql -w -X -p "$PG_PORT" -v ON_ERROR_STOP=1 -tAq "$@"; }

# Prepend password-less localhost rules to the cluster's pg_hba.conf.
# LOCAL DEVELOPMENT ONLY: anyone on this machine may then log in over TCP
# as any role without a password. Applied only to a cluster this script
# installed, created or started, never to one that was already running.
pg_trust_localhost() {
  local ver name hba current header
  read -r ver name <<<"$PG_CLUSTER_ID"
  hba="/etc/postgresql/$ver/$name/pg_hba.conf"
  [ -f "$hba" ] || die "cannot find $hba"
  current="$(as_root cat "$hba")"
  header="# Added by overfly ops/deps.sh: LOCAL DEVELOPMENT ONLY - password-less TCP logins from this machine."
  local -a add=()
  grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' <<<"$current" ||
    add+=("host    all             all             127.0.0.1/32            trust")
  grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+::1/128[[:space:]]+trust' <<<"$current" ||
    add+=("host    all             all             ::1/128                 trust")
  if [ "${#add[@]}" -gt 0 ]; then
    { printf '%s\n' "$header" "${add[@]}" ""; printf '%s\n' "$current"; } | as_root tee "$hba" >/dev/null
    note "added localhost 'trust' rules at the top of $hba (local development setup)"
  fi
  pg_ctl_cluster "$ver" "$name" reload >/dev/null
}

# Make `psql $DATABASE_URL`-style logins work; fix what we may on a cluster
# this script brought up.
ensure_pg_login() {
  local err managed=0 hba=""
  if [ -n "$PG_CLUSTER_ID" ]; then
    hba="/etc/postgresql/${PG_CLUSTER_ID% *}/${PG_CLUSTER_ID#* }/pg_hba.conf"
  fi
  [ "$PG_ACTION" != reused ] && [ -n "$PG_CLUSTER_ID" ] && managed=1
  err="$(psql_url "$ADMIN_URL" -c 'select 1' 2>&1 >/dev/null)" && return 0

  if [ "$managed" = 1 ] && grep -Eqi 'password|pg_hba.conf|authentication' <<<"$err"; then
    pg_trust_localhost
    err="$(psql_url "$ADMIN_URL" -c 'select 1' 2>&1 >/dev/null)" && return 0
  fi
  if is_local_host "$PG_HOST" && grep -q "role \"$PG_USER\" does not exist" <<<"$err"; then
    # Local development: the URL's role gets superuser so that tests can
    # create and drop their own databases.
    psql_local_super -c "CREATE ROLE \"$PG_USER\" LOGIN SUPERUSER" >/dev/null ||
      die "role '$PG_USER' does not exist and could not be created: $err"
    note "created role $PG_USER (superuser, local development)"
    err="$(psql_url "$ADMIN_URL" -c 'select 1' 2>&1 >/dev/null)" && return 0
  fi
  die "Postgres at $PG_HOST:$PG_PORT is up but refuses '$PG_USER' without a password:
    $err
This script does not change a cluster it did not start. For local development,
add these lines at the top of ${hba:-pg_hba.conf} and reload Postgres:
    host all all 127.0.0.1/32 trust
    host all all ::1/128 trust
or put a password into DATABASE_URL."
}

ensure_database() {
  local exists
  exists="$(psql_url "$ADMIN_URL" -c "select 1 from pg_database where datname = '$PG_DB'")" ||
    die "could not query databases at $PG_HOST:$PG_PORT"
  if [ "$exists" = 1 ]; then
    ok "database $PG_DB exists"
    return 0
  fi
  if psql_url "$ADMIN_URL" -c "CREATE DATABASE \"$PG_DB\"" >/dev/null 2>&1; then
    ok "created database $PG_DB"
  elif is_local_host "$PG_HOST" &&
    psql_local_super -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\"" >/dev/null; then
    ok "created database $PG_DB (as the postgres superuser, owner $PG_USER)"
  else
    die "could not create database $PG_DB at $PG_HOST:$PG_PORT as $PG_USER"
  fi
}

# ------------------------------------------------------------------- NATS
# On a systemd machine, Debian's nats-server package runs nats-server.service
# from /etc/nats-server.conf (127.0.0.1:4222) WITHOUT JetStream. We manage
# that unit only for the default port.
NATS_DROPIN_DIR=/etc/systemd/system/nats-server.service.d
NATS_DROPIN="$NATS_DROPIN_DIR/overfly-jetstream.conf"

nats_systemd_unit() {
  [ "$NATS_PORT" = 4222 ] && systemd_running && systemctl cat nats-server.service >/dev/null 2>&1
}

# The unit as Debian ships it: no JetStream in its config, no drop-ins.
nats_unit_is_stock() {
  ! grep -qi jetstream /etc/nats-server.conf 2>/dev/null && [ ! -d "$NATS_DROPIN_DIR" ]
}

# LOCAL DEVELOPMENT: a drop-in that turns JetStream on for the stock unit.
nats_unit_enable_jetstream() {
  as_root mkdir -p "$NATS_DROPIN_DIR"
  printf '%s\n' \
    "# Added by overfly ops/deps.sh (local development): run NATS with JetStream." \
    "[Service]" \
    "StateDirectory=nats-server" \
    "ExecStart=" \
    "ExecStart=/usr/sbin/nats-server -c /etc/nats-server.conf -js -sd /var/lib/nats-server" |
    as_root tee "$NATS_DROPIN" >/dev/null
  as_root systemctl daemon-reload
  note "enabled JetStream for nats-server.service ($NATS_DROPIN)"
}

nats_start_local() {
  local bin pidfile
  bin="$(nats_server_bin)" || die "nats-server is not installed"
  if nats_systemd_unit; then
    if nats_unit_is_stock; then nats_unit_enable_jetstream; fi
    note "starting nats-server.service"
    as_root systemctl restart nats-server.service || die "systemctl restart nats-server failed (journalctl -u nats-server)"
    [ "$NATS_ACTION" = installed ] || NATS_ACTION="started"
    return 0
  fi
  pidfile="/run/overfly-nats-$NATS_PORT.pid"
  as_root mkdir -p "$NATS_STORE_DIR" "$(dirname "$NATS_LOG")"
  note "starting $bin on $NATS_HOST:$NATS_PORT (JetStream store $NATS_STORE_DIR, log $NATS_LOG)"
  if have start-stop-daemon; then
    as_root start-stop-daemon --start --oknodo --background \
      --make-pidfile --pidfile "$pidfile" --exec "$bin" -- \
      -a "$NATS_HOST" -p "$NATS_PORT" -js -sd "$NATS_STORE_DIR" -l "$NATS_LOG" >/dev/null
  else
    as_root setsid nohup "$bin" -a "$NATS_HOST" -p "$NATS_PORT" -js -sd "$NATS_STORE_DIR" \
      -l "$NATS_LOG" </dev/null >/dev/null 2>&1 &
  fi
  [ "$NATS_ACTION" = installed ] || NATS_ACTION="started"
}

# ------------------------------------------------------------------- main
plan_packages

step "Postgres at $PG_HOST:$PG_PORT"
if pg_up; then
  ok "reachable, reusing it"
  # Remember which local cluster it is (harmless when there is none).
  if is_local_host "$PG_HOST" && have pg_lsclusters; then
    PG_CLUSTER_ID="$(pg_cluster_on_port | awk '{ print $1, $2 }')"
  fi
else
  if is_local_host "$PG_HOST"; then
    pg_server_installed || die "Postgres server binaries not found even after installing"
    pg_start_local
  else
    note "not reachable and not on this machine: waiting for it"
  fi
  wait_for "Postgres" pg_up ||
    die "Postgres at $PG_HOST:$PG_PORT did not answer within ${WAIT_S}s${PG_CLUSTER_ID:+ (see /var/log/postgresql/)}"
  ok "up ($PG_ACTION)"
fi
ensure_pg_login
ensure_database

step "NATS at $NATS_HOST:$NATS_PORT"
if nats_up; then
  ok "reachable, reusing it"
else
  if is_local_host "$NATS_HOST"; then
    nats_start_local
  else
    note "not reachable and not on this machine: waiting for it"
  fi
  if ! wait_for "NATS" nats_up; then
    if [ "$NATS_ACTION" != reused ] && [ -r "$NATS_LOG" ]; then tail -n 5 "$NATS_LOG" >&2; fi
    die "NATS at $NATS_HOST:$NATS_PORT did not answer within ${WAIT_S}s"
  fi
  ok "up ($NATS_ACTION)"
fi
js=0
nats_jetstream || js=$?
if [ "$js" = 1 ] && is_local_host "$NATS_HOST" && nats_systemd_unit && nats_unit_is_stock &&
  systemctl is-active -q nats-server.service; then
  # Debian's stock unit, running without JetStream (just installed, typically).
  nats_unit_enable_jetstream
  as_root systemctl restart nats-server.service
  wait_for "NATS" nats_up || die "nats-server.service did not come back (journalctl -u nats-server)"
  js=0
  nats_jetstream || js=$?
fi
case "$js" in
  0) ok "JetStream enabled" ;;
  1) die "NATS at $NATS_HOST:$NATS_PORT runs without JetStream: restart it with -js and a store dir, e.g.
    nats-server -a $NATS_HOST -p $NATS_PORT -js -sd $NATS_STORE_DIR" ;;
  *) warn "could not check JetStream on $NATS_HOST:$NATS_PORT (auth or TLS?); continuing" ;;
esac

step "tools"
nats_bin="$(nats_server_bin)" || die "nats-server binary not found (tests spawn their own); install the Debian package nats-server"
ok "nats-server: $nats_bin ($("$nats_bin" --version 2>&1 | head -n 1))"
case ":$PATH:" in
  *":$(dirname "$nats_bin"):"*) ;;
  *) note "add $(dirname "$nats_bin") to PATH for the tests (make test does)" ;;
esac
pgbench_ok || die "pgbench not available; install the Debian package postgresql-contrib"
ok "pgbench: $(pgbench --version 2>&1 | head -n 1)"

say "deps ready: DATABASE_URL=$DATABASE_URL NATS_URL=$NATS_URL"
