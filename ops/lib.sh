# shellcheck shell=bash
# Shared helpers for the ops/ scripts. Source it, do not run it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# It sets the configuration defaults every Overfly tool agrees on (see
# docs/DESIGN "Configuration defaults"), exports them, and provides small
# logging / parsing helpers. It changes nothing on the machine by itself.

# Repository root: the parent of ops/.
OVERFLY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OVERFLY_ROOT

# Configuration defaults (honour whatever the caller already set).
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/overfly}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
export OVERFLY_COMMAND_ADDR="${OVERFLY_COMMAND_ADDR:-127.0.0.1:8080}"
export OVERFLY_COMMAND_URL="${OVERFLY_COMMAND_URL:-http://127.0.0.1:8080}"

# Where ops scripts keep run-time state (pid files, logs). Git-ignored.
OVERFLY_STATE_DIR="${OVERFLY_STATE_DIR:-$OVERFLY_ROOT/.overfly}"
export OVERFLY_STATE_DIR

# Debian installs daemons (nats-server) into /usr/sbin, which is not on a
# non-root user's PATH.
case ":$PATH:" in
  *:/usr/sbin:*) ;;
  *) PATH="$PATH:/usr/sbin:/sbin" ;;
esac
export PATH

# ---------------------------------------------------------------- logging
# Status lines go to stderr so that functions can return values on stdout.
say()  { printf '%s\n' "$*" >&2; }
step() { printf '==> %s\n' "$*" >&2; }
ok()   { printf '    ok: %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die()  { printf 'error: %s\n' "$*" >&2; exit 1; }

have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif have sudo; then
    # Never wait for a password prompt nobody can answer (CI, no stdin).
    if [ -t 0 ]; then sudo -- "$@"; else sudo -n -- "$@"; fi
  else
    die "need root for: $* (run as root, or install sudo)"
  fi
}

# ------------------------------------------------------------ toolchain
# Fail clearly when there is no usable Rust toolchain.
OVERFLY_MIN_RUST_MINOR=90
require_rust_toolchain() {
  if ! have cargo && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
    export PATH
  fi
  have cargo || die "cargo not found: a Rust toolchain >= 1.${OVERFLY_MIN_RUST_MINOR} is required (install it with rustup: https://rustup.rs)"
  local version minor
  version="$(rustc --version 2>/dev/null | awk '{print $2}')" || true
  minor="$(printf '%s' "$version" | cut -d. -f2)"
  case "$minor" in
    '' | *[!0-9]*) warn "could not read the rustc version ('$version'); need >= 1.${OVERFLY_MIN_RUST_MINOR}" ;;
    *)
      if [ "$(printf '%s' "$version" | cut -d. -f1)" = 1 ] && [ "$minor" -lt "$OVERFLY_MIN_RUST_MINOR" ]; then
        die "rustc $version is too old: a Rust toolchain >= 1.${OVERFLY_MIN_RUST_MINOR} is required (rustup update)"
      fi
      ;;
  esac
}

# ------------------------------------------------------------- URL parsing
# These understand the simple URL forms our defaults use:
#   postgres://user[:password]@host[:port]/dbname[?params]
#   nats://[user:password@]host[:port][,more servers]

# Print "user host port dbname" for a postgres URL.
pg_url_parts() {
  local url="$1" rest userinfo hostport host port db user
  case "$url" in
    postgres://* | postgresql://*) ;;
    *) die "DATABASE_URL must look like postgres://user@host:port/dbname (got '$url')" ;;
  esac
  rest="${url#*://}"
  rest="${rest%%\?*}"
  if [ "${rest#*@}" != "$rest" ]; then
    userinfo="${rest%%@*}"
    rest="${rest#*@}"
  else
    userinfo=""
  fi
  user="${userinfo%%:*}"
  hostport="${rest%%/*}"
  if [ "${rest#*/}" != "$rest" ]; then db="${rest#*/}"; else db=""; fi
  case "$hostport" in
    \[*\]:*) host="${hostport%%]:*}"; host="${host#[}"; port="${hostport##*]:}" ;;
    \[*\]) host="${hostport#[}"; host="${host%]}"; port="" ;;
    *:*) host="${hostport%%:*}"; port="${hostport##*:}" ;;
    *) host="$hostport"; port="" ;;
  esac
  printf '%s %s %s %s\n' "${user:-postgres}" "${host:-127.0.0.1}" "${port:-5432}" "${db:-postgres}"
}

# Print "host port" of the first server of a NATS URL.
nats_url_parts() {
  local url="$1" rest host port
  rest="${url%%,*}"
  rest="${rest#*://}"
  rest="${rest##*@}"
  rest="${rest%%/*}"
  case "$rest" in
    \[*\]:*) host="${rest%%]:*}"; host="${host#[}"; port="${rest##*]:}" ;;
    *:*) host="${rest%%:*}"; port="${rest##*:}" ;;
    *) host="$rest"; port="" ;;
  esac
  printf '%s %s\n' "${host:-127.0.0.1}" "${port:-4222}"
}

# True when the host is this machine (so we may install / start things).
is_local_host() {
  case "$1" in
    127.0.0.1 | localhost | ::1 | "") return 0 ;;
    *) return 1 ;;
  esac
}

# True when something accepts TCP connections on host:port (no curl needed).
tcp_open() {
  # shellcheck disable=SC2016 # $0/$1 expand in the inner bash.
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# Is a process with this pid alive and running the given program name?
pid_runs() {
  local pid="$1" name="$2"
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then return 1; fi
  [ -r "/proc/$pid/cmdline" ] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"
}
