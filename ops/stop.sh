#!/usr/bin/env bash
# Stop what ops/demo.sh started: every service with a pid file in .overfly/
# (command.pid, and any <name>.pid later demos add). Postgres and NATS keep
# running; they are shared with the tests and other work.
set -euo pipefail
# shellcheck source=ops/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STOP_TIMEOUT_S="${OVERFLY_STOP_TIMEOUT:-15}"

shopt -s nullglob
# Executors first: they drain through the command service, so it must still be up.
pid_files=("$OVERFLY_STATE_DIR"/executor*.pid)
for f in "$OVERFLY_STATE_DIR"/*.pid; do
  case "$(basename "$f")" in executor*) ;; *) pid_files+=("$f") ;; esac
done
if [ "${#pid_files[@]}" -eq 0 ]; then
  say "nothing to stop (no pid files in $OVERFLY_STATE_DIR)"
  exit 0
fi

# Alive and not a zombie (a reparented child may linger unreaped as one).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

for f in "${pid_files[@]}"; do
  name="$(basename "$f" .pid)"
  pid="$(tr -dc '0-9' <"$f" || true)"
  # Only signal a live process that is still an Overfly binary: a stale pid
  # file may name a pid the system has since given to something else.
  if ! pid_runs "$pid" overfly-; then
    note "$name: not running (stale pid file removed)"
    rm -f "$f"
    continue
  fi
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT_S))
  while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.2
  done
  if alive "$pid"; then
    warn "$name (pid $pid) still running after ${STOP_TIMEOUT_S}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
  ok "stopped $name (pid $pid)"
done
say "Postgres and NATS are still running (they are shared; stop them yourself if you must)."
