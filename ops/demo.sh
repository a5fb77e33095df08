#!/usr/bin/env bash
# Overfly demo: build the services, migrate, start the command service (with its
# scheduler), the projector, the query service and two executors with simulated
# GPUs, then submit a realistic mix of jobs that run the demo workload
# (overfly-tiles): they complete, fail and retry, time out, get cancelled, or wait
# for GPUs that do not exist, and the read side explains all of it.
#
# Expects Postgres and NATS to be up (`make demo` runs ops/deps.sh first).
# Leaves the service running; `make stop` (ops/stop.sh) stops it.
#
# Idempotency keys are fixed, so running the demo again returns the same jobs
# (that is the point of them). OVERFLY_DEMO_RUN=2 (any new value) submits fresh ones.
#
# OVERFLY_DEMO_BUILD=0 skips the cargo build and uses the binary already in
# ${CARGO_TARGET_DIR:-target}/release.
#
# Every HTTP call is one small function below: when an endpoint's shape
# changes, fix it there.
set -euo pipefail
# shellcheck source=ops/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$OVERFLY_ROOT"

URL="${OVERFLY_COMMAND_URL%/}"
QUERY_URL="${OVERFLY_QUERY_URL:-http://127.0.0.1:8081}"
QUERY_URL="${QUERY_URL%/}"
RUN="${OVERFLY_DEMO_RUN:-1}"
READY_TIMEOUT_S="${OVERFLY_DEMO_READY_TIMEOUT:-60}"
TARGET_DIR="${CARGO_TARGET_DIR:-$OVERFLY_ROOT/target}"
BIN="$TARGET_DIR/release/overfly-command"
PID_FILE="$OVERFLY_STATE_DIR/command.pid"
LOG_FILE="$OVERFLY_STATE_DIR/command.log"

require_rust_toolchain
have curl || die "curl is required (apt-get install curl, or run ops/deps.sh)"

# Count steps whose answer was not what we expected; the demo goes on, and
# exits non-zero at the end if any did.
FAILED=0
fail() { warn "$*"; FAILED=$((FAILED + 1)); }

# ------------------------------------------------------------ HTTP helpers
HEADERS_FILE="$(mktemp)"
trap 'rm -f "$HEADERS_FILE"' EXIT

# api METHOD PATH [JSON_BODY] [IDEMPOTENCY_KEY]
# Every call carries X-Correlation-Id: overfly-demo-<run>, so the demo's events
# are easy to find in the event store.
# Sets HTTP_STATUS, HTTP_CTYPE, HTTP_BODY and HTTP_REPLAYED (the
# Idempotent-Replayed response header, "true" when a stored response was
# replayed). Never fails the script.
api() {
  local method="$1" path="$2" body="${3:-}" key="${4:-}" out
  local -a args=(-sS -X "$method" "$URL$path" -D "$HEADERS_FILE" -w '\n%{http_code} %{content_type}' --max-time 15
    -H "X-Correlation-Id: overfly-demo-$RUN")
  if [ -n "$body" ]; then args+=(-H 'content-type: application/json' --data-binary "$body"); fi
  if [ -n "$key" ]; then args+=(-H "Idempotency-Key: $key"); fi
  HTTP_REPLAYED=""
  if ! out="$(curl "${args[@]}" 2>&1)"; then
    HTTP_STATUS=000 HTTP_CTYPE="" HTTP_BODY="$out"
    return 0
  fi
  HTTP_BODY="${out%$'\n'*}"
  local meta="${out##*$'\n'}"
  HTTP_STATUS="${meta%% *}"
  HTTP_CTYPE="${meta#* }"
  HTTP_REPLAYED="$(tr -d '\r' <"$HEADERS_FILE" | sed -n 's/^[Ii]dempotent-[Rr]eplayed:[[:space:]]*//p' | tail -n 1)"
  if [[ "$HTTP_STATUS" == 2?? ]]; then remember_position; fi
}

# Pretty-print a JSON body with jq when it is installed; raw otherwise.
show_body() {
  if [ -z "$HTTP_BODY" ]; then
    note "(empty body)"
  elif have jq && jq . <<<"$HTTP_BODY" >/dev/null 2>&1; then
    jq . <<<"$HTTP_BODY" | sed 's/^/    /'
  else
    printf '    %s\n' "$HTTP_BODY"
  fi
}

# Remember the newest "position" a command answered with: a query passing it as
# min_position is guaranteed to see every write the demo made.
remember_position() {
  local position
  position="$(sed -n 's/.*"position"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p' <<<"$HTTP_BODY" | head -n 1)"
  if [ -n "$position" ] && [ "$position" -gt "${LAST_POSITION:-0}" ]; then LAST_POSITION="$position"; fi
}

# The "id" field of the last response body (no jq needed).
body_id() {
  sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$HTTP_BODY" | head -n 1
}

is_2xx() { [[ "$HTTP_STATUS" == 2?? ]]; }

# Check the answer to a state change. On a re-run (the submits were replayed)
# the change was already made by an earlier run, so 409 Conflict is expected.
expect_change() { # WHAT
  if is_2xx; then
    return 0
  elif [ "$HTTP_STATUS" = 409 ] && [ "$RERUN" = 1 ]; then
    note "409: already done by an earlier demo run (OVERFLY_DEMO_RUN=<new value> for fresh jobs)"
  else
    fail "$1 answered $HTTP_STATUS"
  fi
}

# -------------------------------------------------------------- endpoints
# submit_job IDEMPOTENCY_KEY JSON -> sets JOB_ID (empty on failure)
submit_job() {
  JOB_ID=""
  api POST /jobs "$2" "$1"
  if is_2xx; then
    JOB_ID="$(body_id)"
    [ -n "$JOB_ID" ] || fail "POST /jobs ($1) answered $HTTP_STATUS without an id: $HTTP_BODY"
  else
    fail "POST /jobs ($1) answered $HTTP_STATUS: $HTTP_BODY"
  fi
}

cancel_job() { # ID BY REASON
  api POST "/jobs/$1/cancel" "{\"by\":\"$2\",\"reason\":\"$3\"}"
}

change_priority() { # ID PRIORITY BY REASON
  api POST "/jobs/$1/priority" "{\"priority\":$2,\"by\":\"$3\",\"reason\":\"$4\"}"
}

register_executor() { # JSON
  api POST /executors "$1"
}

ready() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$URL/readyz" 2>/dev/null)" = 200 ]
}

# ----------------------------------------------------------- build + start
if [ "${OVERFLY_DEMO_BUILD:-1}" = 0 ]; then
  step "using the existing build (OVERFLY_DEMO_BUILD=0)"
else
  step "building the services (release)"
  cargo build --release -p overfly-command-service -p overfly-projector -p overfly-query-service -p overfly-executor
fi
[ -x "$BIN" ] || die "$BIN is missing (build it: cargo build --release -p overfly-command-service)"

step "running migrations"
"$BIN" migrate

mkdir -p "$OVERFLY_STATE_DIR"
step "command service at $URL"
pid="$(cat "$PID_FILE" 2>/dev/null || true)"
if pid_runs "$pid" overfly-command; then
  ok "already running (pid $pid), reusing it; \`make stop\` stops it"
elif ready; then
  ok "something already answers at $URL/readyz (not started by this demo); using it"
else
  rm -f "$PID_FILE"
  printf '\n--- %s: overfly-command serve\n' "$(date -Is)" >>"$LOG_FILE"
  LOG_OFFSET="$(wc -c <"$LOG_FILE")"
  STARTED=1
  # setsid: the service outlives this script and ignores Ctrl-C sent to it.
  # NO_COLOR: plain log lines in the file.
  # The scheduler on; short retry backoffs so the demo shows retries within seconds.
  NO_COLOR=1 OVERFLY_SCHEDULER_ENABLED=true OVERFLY_RETRY_BASE_S=2 \
    setsid "$BIN" serve </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  echo "$pid" >"$PID_FILE"
  note "started pid $pid, log $LOG_FILE"
fi

# The last lines this run's service wrote to its log.
log_tail() {
  tail -c +"$((${LOG_OFFSET:-0} + 1))" "$LOG_FILE" 2>/dev/null | tail -n 20 | sed 's/^/    | /' >&2 || true
}

deadline=$((SECONDS + READY_TIMEOUT_S))
until ready; do
  if [ "${STARTED:-0}" = 1 ] && ! kill -0 "$pid" 2>/dev/null; then
    log_tail
    rm -f "$PID_FILE"
    die "the command service exited during start-up (log above, full log in $LOG_FILE)"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    log_tail
    if [ "${STARTED:-0}" = 1 ]; then
      note "stopping the service this demo started (pid $pid)"
      kill "$pid" 2>/dev/null || true
      rm -f "$PID_FILE"
    fi
    die "$URL/readyz did not return 200 within ${READY_TIMEOUT_S}s (log: $LOG_FILE)"
  fi
  sleep 1
done
ok "ready ($URL/readyz = 200)"

# start_background NAME ARGS...: runs target/release/overfly-NAME ARGS in the background
# unless its pid file names a live process (pid and log in $OVERFLY_STATE_DIR).
start_background() {
  local name="$1" pid_file="$OVERFLY_STATE_DIR/$1.pid" log="$OVERFLY_STATE_DIR/$1.log" pid
  shift
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  if pid_runs "$pid" "overfly-$name"; then
    ok "overfly-$name already running (pid $pid)"
    return
  fi
  printf '\n--- %s: overfly-%s %s\n' "$(date -Is)" "$name" "$*" >>"$log"
  NO_COLOR=1 setsid "$TARGET_DIR/release/overfly-$name" "$@" </dev/null >>"$log" 2>&1 &
  echo "$!" >"$pid_file"
  note "started overfly-$name (pid $!, log $log)"
}

# start_background_as NAME BINARY ARGS...: like start_background, for a second
# instance of one binary (pid and log under NAME).
start_background_as() {
  local name="$1" binary="$2" pid_file="$OVERFLY_STATE_DIR/$1.pid" log="$OVERFLY_STATE_DIR/$1.log" pid
  shift 2
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  if pid_runs "$pid" "overfly-$binary"; then
    ok "$name already running (pid $pid)"
    return
  fi
  printf '\n--- %s: overfly-%s %s\n' "$(date -Is)" "$binary" "$*" >>"$log"
  NO_COLOR=1 setsid "$TARGET_DIR/release/overfly-$binary" "$@" </dev/null >>"$log" 2>&1 &
  echo "$!" >"$pid_file"
  note "started $name (pid $!, log $log)"
}

step "read side: the projections and the query service at $QUERY_URL"
start_background projector run
start_background query serve
deadline=$((SECONDS + READY_TIMEOUT_S))
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$QUERY_URL/readyz" 2>/dev/null)" = 200 ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "$QUERY_URL/readyz did not return 200 within ${READY_TIMEOUT_S}s (log: $OVERFLY_STATE_DIR/query.log)"
  sleep 1
done
ok "ready ($QUERY_URL/readyz = 200)"

step "executors: gpu-host-1 (4 simulated H100 80GB) and gpu-host-2 (4 simulated A100 40GB)"
start_background_as executor-1 executor --executor-id gpu-host-1 --gpus sim:4xH100-80GB --work-dir "$OVERFLY_STATE_DIR/work/gpu-host-1"
start_background_as executor-2 executor --executor-id gpu-host-2 --gpus sim:4xA100-40GB --work-dir "$OVERFLY_STATE_DIR/work/gpu-host-2"
deadline=$((SECONDS + READY_TIMEOUT_S))
until [ "$(curl -s --max-time 2 "$QUERY_URL/executors?state=active" | grep -o '"executor_id"' | wc -l)" -ge 2 ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "the executors did not become active within ${READY_TIMEOUT_S}s (logs: $OVERFLY_STATE_DIR/executor-*.log)"
  sleep 1
done
ok "both executors active"

# ------------------------------------------------------------------- jobs
step "submitting jobs (Idempotency-Key: demo-*-$RUN)"

# short name -> job id. One line per job keeps them easy to scan and edit.
declare -A JOB
declare -A BODY
submit() { # SHORT_NAME JSON
  BODY[$1]="$2"
  submit_job "demo-$1-$RUN" "$2"
  JOB[$1]="$JOB_ID"
  if [ -n "$JOB_ID" ]; then
    local how="HTTP $HTTP_STATUS"
    if [ "$HTTP_REPLAYED" = true ]; then
      how="$how, replayed"
      RERUN=1
    fi
    printf '    %-12s %s  (%s)\n' "$1" "$JOB_ID" "$how" >&2
  fi
}
RERUN=0

TILES="$TARGET_DIR/release/overfly-tiles"
# job NAME ACCOUNT USER PRIORITY GPUS MEMORY_MB MAX_RETRIES TIMEOUT_S LABELS_JSON TILES_ARGS...
job() {
  local name=$1 account=$2 user=$3 priority=$4 gpus=$5 memory=$6 retries=$7 timeout=$8 labels=$9
  shift 9
  local argv="\"$TILES\",\"--region\",\"$name\""
  for arg in "$@"; do argv="$argv,\"$arg\""; done
  printf '{"name":"%s","account":"%s","submitted_by":"%s","priority":%s,"gpus":%s,"gpu_memory_mb":%s,"command":[%s],"env":{"BATCH":"64"},"labels":%s,"max_retries":%s,"timeout_s":%s}' \
    "$name" "$account" "$user" "$priority" "$gpus" "$memory" "$argv" "$labels" "$retries" "$timeout"
}
submit tiles "$(job tiles-eu-west geo-team ana 60 2 40000 2 600 '{"benchmark":"tiles-v1"}' --tiles 60 --ms-per-tile 100)"
submit tiles-us "$(job tiles-us-east geo-team ana 60 2 40000 2 600 '{"benchmark":"tiles-v1"}' --tiles 400 --ms-per-tile 100)"
submit floods "$(job segformer-floods geo-team eli 40 1 24000 2 600 '{"project":"flood-watch"}' --tiles 50 --ms-per-tile 40 --fail-at 20 --exit-code 3)"
submit resnet "$(job resnet50-finetune-crops vision-team bo 50 4 70000 1 600 '{"benchmark":"tiles-v1"}' --tiles 80 --ms-per-tile 100)"
submit clip "$(job clip-embed-backfill vision-team farid 20 8 60000 0 600 '{"kind":"backfill"}' --tiles 10)"
submit llm-eval "$(job llm-eval-mmlu nlp-team chen 70 1 75000 1 600 '{"benchmark":"tiles-v1"}' --tiles 40 --ms-per-tile 80)"
submit sweep-lr-1 "$(job sweep-lora-lr-1e-4 nlp-team dana 30 1 16000 0 600 '{"sweep":"lora-lr"}' --tiles 30 --ms-per-tile 60)"
submit sweep-lr-2 "$(job sweep-lora-lr-3e-4 nlp-team dana 30 1 16000 0 600 '{"sweep":"lora-lr"}' --tiles 45 --ms-per-tile 60)"
submit stuck "$(job stuck-reader ops-team sam 10 1 0 0 4 '{"kind":"canary"}' --tiles 0 --hang)"

step "idempotency: replaying the tiles-eu-west submit with the same Idempotency-Key"
submit_job "demo-tiles-$RUN" "${BODY[tiles]}"
replayed="$JOB_ID"
note "HTTP $HTTP_STATUS"
show_body
if [ -n "$replayed" ] && [ "$replayed" = "${JOB[tiles]:-}" ]; then
  ok "same id back ($replayed${HTTP_REPLAYED:+, Idempotent-Replayed: $HTTP_REPLAYED}): no second job"
elif [ -n "$replayed" ]; then
  fail "replay returned a different id: ${JOB[tiles]:-?} then $replayed"
fi

step "validation: a job with priority 300 is rejected"
api POST /jobs '{"name":"too-important","account":"nlp-team","submitted_by":"chen","priority":300,"gpus":1,"gpu_memory_mb":16000,"command":["python","eval.py","--suite","gsm8k"],"timeout_s":600}' "demo-bad-$RUN"
note "HTTP $HTTP_STATUS $HTTP_CTYPE"
show_body
if [ "$HTTP_STATUS" != 422 ]; then
  fail "expected 422 application/problem+json, got $HTTP_STATUS $HTTP_CTYPE"
elif [[ "$HTTP_CTYPE" != application/problem+json* ]]; then
  fail "expected content-type application/problem+json, got '$HTTP_CTYPE'"
fi

if [ -n "${JOB[tiles-us]:-}" ]; then
  sleep 3
  step "cancel: ana cancels tiles-us-east while it runs (wrong region): its executor stops the process"
  cancel_job "${JOB[tiles-us]}" ana "wrong region"
  note "HTTP $HTTP_STATUS"
  show_body
  expect_change "cancel"
fi

if [ -n "${JOB[llm-eval]:-}" ]; then
  step "priority: lead raises llm-eval-mmlu to 90 (deadline)"
  change_priority "${JOB[llm-eval]}" 90 lead "deadline"
  note "HTTP $HTTP_STATUS"
  show_body
  expect_change "priority change"
fi

step "waiting for the work to play out (retries, a timeout, successes; about 20 s)"
deadline=$((SECONDS + 90))
while :; do
  active="$(curl -s --max-time 2 "$QUERY_URL/jobs?limit=500&with_total=true&state=running" | sed -n 's/.*"total":\([0-9]*\).*/\1/p')"
  assigned="$(curl -s --max-time 2 "$QUERY_URL/jobs?limit=500&with_total=true&state=assigned" | sed -n 's/.*"total":\([0-9]*\).*/\1/p')"
  queued="$(curl -s --max-time 2 "$QUERY_URL/jobs?limit=500&with_total=true&state=queued" | sed -n 's/.*"total":\([0-9]*\).*/\1/p')"
  note "running ${active:-?}, assigned ${assigned:-?}, queued ${queued:-?} (the 8-GPU job can never fit)"
  if [ "${active:-1}" = 0 ] && [ "${assigned:-1}" = 0 ] && [ "${queued:-9}" -le 1 ]; then break; fi
  [ "$SECONDS" -lt "$deadline" ] || { warn "still busy after 90 s; showing what there is"; break; }
  sleep 3
done

# ---------------------------------------------------------- live feeds (SSE)
if [ -n "${JOB[tiles]:-}" ]; then
  step "log feed: the last 4 lines of tiles-eu-west, then its end (GET /jobs/{id}/logs?tail=4&follow=true)"
  out="$(curl -sSN --max-time 10 "$QUERY_URL/jobs/${JOB[tiles]}/logs?tail=4&follow=true" 2>&1)" || true
  printf '%s\n' "$out" | while IFS= read -r sse; do
    case "$sse" in
      id:* | event:*) printf '    %s\n' "$sse" ;;
      data:*)
        if have jq; then
          printf '%s\n' "${sse#data: }" | jq -r 'if .lines then .lines[] | "      \(.n) \(.stream): \(.line)" else "      \(.)" end' 2>/dev/null
        else printf '      %s\n' "${sse#data: }"; fi ;;
    esac
  done | head -n 24
  if printf '%s\n' "$out" | grep -q '^event: *end'; then ok "the feed ended with event: end (the job is finished)"; else fail "no end event in the log feed"; fi
fi
step "telemetry feed: gpu-host-1's GPUs live for 2 s (GET /executors/gpu-host-1/telemetry)"
samples="$(curl -sSN --max-time 2 "$QUERY_URL/executors/gpu-host-1/telemetry" 2>/dev/null | grep -c '^event: *sample' || true)"
if [ "${samples:-0}" -gt 0 ]; then ok "$samples samples in 2 s"; else fail "no telemetry samples from gpu-host-1"; fi

# ---------------------------------------------------------- where to look
step "the last events in the event store"
if have psql; then
  psql -X -P pager=off "$DATABASE_URL" -c "select global_position, aggregate_type, aggregate_id, sequence, event_type, recorded_at from events order by global_position desc limit 15" ||
    fail "could not read the events table"
else
  note "(psql not installed)"
fi

step "JetStream stream"
"$BIN" stream-info || fail "overfly-command stream-info failed"

step "read side: the newest jobs, as the projection sees them"
query() { # PATH
  local out
  out="$(curl -sS --max-time 5 "$QUERY_URL$1" 2>&1)" || { fail "GET $1 failed: $out"; return; }
  if have jq; then printf '%s\n' "$out" | jq . 2>/dev/null || printf '%s\n' "$out"; else printf '%s\n' "$out"; fi
}
query "/jobs?limit=3&with_total=true&min_position=${LAST_POSITION:-1}"
for state in succeeded failed cancelled queued; do
  step "jobs $state"
  curl -sS --max-time 5 "$QUERY_URL/jobs?state=$state&limit=20" | grep -o '"name":"[^"]*"' | sed 's/^/    /' || true
done
if [ -n "${JOB[clip]:-}" ]; then
  step "why is clip-embed-backfill (8 GPUs, 60 GB each) still pending?"
  query "/jobs/${JOB[clip]}/explain"
fi
step "runs ranked by the accuracy they reported (label benchmark=tiles-v1)"
query "/leaderboards/accuracy?label=benchmark=tiles-v1&limit=5"
step "accounts ranked by GPU-hours, then by efficiency (GPU time busy / sampled, least efficient first)"
query "/usage/leaderboard?by=gpu_hours"
query "/usage/leaderboard?by=efficiency&order=asc"
step "GPUs and who holds them; projections' health"
query "/gpus"
query "/projections"
if [ -n "${JOB[floods]:-}" ]; then
  step "audit: segformer-floods failed, was retried with backoff, and failed for good"
  curl -sS --max-time 5 "$QUERY_URL/jobs/${JOB[floods]}/history" | grep -o '"event_type":"[^"]*"' | sed 's/^/    /' || true
fi
if [ -n "${JOB[llm-eval]:-}" ]; then
  step "audit: the history of llm-eval-mmlu (who, when, why, trace)"
  query "/jobs/${JOB[llm-eval]}/history"
fi

say ""
say "Where to look next:"
say "  command API docs       $URL/docs"
say "  query API docs         $QUERY_URL/docs   (GET /jobs, /jobs/{id}?as_of=…, /jobs/{id}/explain, /jobs/{id}/history, leaderboards)"
say "  executor logs          $OVERFLY_STATE_DIR/executor-1.log, executor-2.log (run dirs in $OVERFLY_STATE_DIR/work)"
say "  live events (SSE)      curl -N $QUERY_URL/stream   (or /jobs/<id>/events; add -H 'Last-Event-ID: <id>' to resume)"
say "  live logs, telemetry   curl -N '$QUERY_URL/jobs/<id>/logs?follow=true&tail=20'   curl -N $QUERY_URL/gpus/stream"
say "  OpenAPI document       $URL/openapi.json"
say "  service log            $LOG_FILE"
say "  events                 psql \"$DATABASE_URL\" -c 'select * from events order by global_position desc limit 15'"
say "  stream                 $BIN stream-info"
say "  stop the services      make stop   (Postgres and NATS keep running)"

if [ "$FAILED" -gt 0 ]; then
  die "$FAILED demo step(s) did not answer as expected (see warnings above)"
fi
say "demo done."
