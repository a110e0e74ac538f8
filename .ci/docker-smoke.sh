#!/usr/bin/env bash
# Smoke test of the running container; ../shared/docker-ci/verify.sh runs it after
# `docker compose up --wait`, with BASE_URL and DOCKER_CI_COMPOSE (a compose command prefix).
#   1. the tutorial end to end: fit, poll the job, predict, history
#   2. inside the container: every process runs as a non-root user, the server is PID 1,
#      torch is the CPU build, the root filesystem is read-only and /tmp is writable
#   3. `docker compose stop` in the middle of a fit: /readyz 503 and fits refused while draining,
#      an in-flight request completes, the fit ends `cancelled`, exit code 0 inside the grace period
#   0 (first): the deployment: the healthcheck asks the port SGD_PORT names, probes write no info
#      access lines, a Host other than loopback's is refused, the page sends its security headers,
#      the pins went in, and a server process that exits is restarted by the restart policy
# Last, since step 3 stops the service.
#   4. the scaled profile: .ci/docker-smoke-scaled.sh
set -euo pipefail

: "${BASE_URL:?set by verify.sh}"
: "${DOCKER_CI_COMPOSE:?set by verify.sh under compose: this test checks the compose service}"
SERVICE=sgd-service          # the service name in docker-compose.yml
GRACE_SECONDS=40             # its stop_grace_period
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { printf 'smoke: %s\n' "$*"; }
fail() { printf 'smoke: FAILED: %s\n' "$*" >&2; exit 1; }
compose() { $DOCKER_CI_COMPOSE "$@"; }   # the prefix is a command and its arguments: split it
now() { date +%s.%N; }
elapsed() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.2f}")' "$1" "$2"; }
# field FILE EXPR: a value out of a JSON file; EXPR is Python applied to `d` (the parsed JSON)
field() { python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

# request METHOD PATH [JSON]: the body goes to $WORK/body, the status code to stdout
request() {
  local args=(--silent --show-error --max-time 10 -o "$WORK/body" -w '%{http_code}' -X "$1")
  [ $# -lt 3 ] || args+=(-H 'Content-Type: application/json' --data "$3")
  curl "${args[@]}" "$BASE_URL$2"
}

expect() {  # expect CODE METHOD PATH [JSON]
  local want=$1 got; shift
  got=$(request "$@") || fail "$1 $2: no answer"
  [ "$got" = "$want" ] || fail "$1 $2: HTTP $got, expected $want: $(cat "$WORK/body")"
}

# poll_job ID DEADLINE_SECONDS STATUS...: until the job has one of the statuses; prints it
poll_job() {
  local id=$1 deadline=$(($(date +%s) + $2)) status; shift 2
  while :; do
    expect 200 GET "/jobs/$id"
    status=$(field "$WORK/body" 'd["status"]')
    for want in "$@"; do [ "$status" = "$want" ] && { echo "$status"; return 0; }; done
    [ "$(date +%s)" -lt "$deadline" ] || fail "job $id is '$status' after the deadline, expected one of: $*"
    sleep 0.1
  done
}

in_container() { compose exec -T "$SERVICE" "$@"; }

# -- 0. the deployment ----------------------------------------------------------------------
health_test=$(compose config --format json | python3 -c '
import json, sys
test = json.load(sys.stdin)["services"][sys.argv[1]]["healthcheck"]["test"]
assert test[0] == "CMD", test
print(json.dumps(test[1:]))
' "$SERVICE")
# run_health_test [ENV=VALUE]: the compose healthcheck's own command, in the container
run_health_test() {
  local env=(); [ $# -eq 0 ] || env=(-e "$1")
  python3 -c 'import json, sys; print("\0".join(json.loads(sys.argv[1])), end="")' "$health_test" \
    | xargs -0 $DOCKER_CI_COMPOSE exec -T "${env[@]}" "$SERVICE" >/dev/null 2>&1
}
run_health_test || fail "the compose healthcheck fails in the running container"
! run_health_test SGD_PORT=1 || fail "the compose healthcheck ignores SGD_PORT (it passed against port 1)"
log "the compose healthcheck asks the port SGD_PORT names"

probes=$(compose logs --no-color "$SERVICE" | grep -c '"path": "/healthz"' || true)
[ "$probes" = 0 ] || fail "the healthcheck's probes wrote $probes access log lines at info"
log "the healthcheck's probes write no access log lines at info"

got=$(curl --silent --show-error --max-time 10 -o "$WORK/body" -w '%{http_code}' -H 'Host: rebound.example' "$BASE_URL/model")
[ "$got" = 400 ] && [ "$(field "$WORK/body" 'd["type"]')" = host-not-allowed ] \
  || fail "Host: rebound.example got HTTP $got, not 400 host-not-allowed: $(cat "$WORK/body")"
curl --silent --show-error --max-time 10 -D "$WORK/headers" -o /dev/null "$BASE_URL/"
for header in "content-security-policy: default-src 'self'" 'x-frame-options: DENY' \
  'x-content-type-options: nosniff' 'referrer-policy: no-referrer'; do
  grep -qiF "$header" "$WORK/headers" || fail "the page is served without '$header'"
done
log "a Host other than loopback's gets 400 host-not-allowed; the page sends CSP and its friends"

in_container python -c '
import importlib.metadata as m
pins = [line.split("==") for line in open("/app/constraints.txt") if "==" in line and not line.startswith("#")]
wrong = [f"{name} {m.version(name)} (pinned {version.strip()})" for name, version in pins
         if m.version(name).split("+")[0] != version.strip()]
raise SystemExit(f"installed versions differ from .ci/constraints.txt: {wrong}" if wrong else 0)
' || fail "the image does not hold the pinned versions"
log "every package of .ci/constraints.txt is installed at its pinned version"

# Docker restarts a container whose process exits (it never restarts an unhealthy one): the
# server exits by itself when it cannot recover. Here it is stopped from inside the container.
started_before=$(in_container python -c 'print(open("/proc/1/stat").read().split()[21])')
in_container python -c 'import os, signal; os.kill(1, signal.SIGTERM)' || true
deadline=$(($(date +%s) + 60))
until started=$(in_container python -c 'print(open("/proc/1/stat").read().split()[21])' 2>/dev/null) \
  && [ "$started" != "$started_before" ] && [ "$(request GET /readyz)" = 200 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the server exited and the restart policy did not bring it back"
  sleep 0.5
done
log "the server process exited and restart: $(compose config --format json | python3 -c 'import json, sys; print(json.load(sys.stdin)["services"][sys.argv[1]]["restart"])' "$SERVICE") brought it back"

# -- 1. the tutorial ------------------------------------------------------------------------
expect 202 POST /fit '{"x": [1, 2, 3], "y": [2, 4, 6]}'
job=$(field "$WORK/body" 'd["id"]')
log "POST /fit -> job $job"
status=$(poll_job "$job" 120 succeeded failed cancelled)
[ "$status" = succeeded ] || fail "the tutorial fit ended '$status': $(cat "$WORK/body")"
log "job $job succeeded: w=$(field "$WORK/body" 'd["result"]["w"]')"

expect 200 GET '/predict?hours=4'
score=$(field "$WORK/body" 'd["score"]')
field "$WORK/body" 'abs(d["score"] - 8) <= 0.01' | grep -qx True || fail "predict(4) = $score, not within 0.01 of 8"
log "GET /predict?hours=4 -> $score"

expect 200 GET "/history?job_id=$job"
epochs=$(field "$WORK/body" 'd["total_epochs"]')
[ "$epochs" = 100 ] || fail "/history has total_epochs=$epochs, expected 100"
log "GET /history -> total_epochs=$epochs"

# -- 2. inside the container ----------------------------------------------------------------
# Every process (the server, its training worker, multiprocessing's resource tracker) with
# its real, effective, saved and filesystem uid.
in_container python -c '
import os, sys
procs = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = open(f"/proc/{pid}/status").read()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except OSError:
        continue  # ended meanwhile
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    procs[int(pid)] = (uids, cmd)
for pid, (uids, cmd) in sorted(procs.items()):
    print(f"  pid {pid} uids", "/".join(uids), " ".join(cmd.split())[:90])
root = [pid for pid, (uids, _) in procs.items() if "0" in uids]
sys.exit(f"processes running as root: {root}" if root else 0)
' || fail "a process in the container runs as root"
pid1=$(in_container cat /proc/1/cmdline | tr '\0' ' ')
[[ $pid1 == "python -m service"* ]] || fail "PID 1 is '$pid1', not the server (exec-form CMD)"
log "every process runs as non-root (uid $(in_container id -u)); PID 1 is '$pid1'"

torch=$(in_container python -c 'import torch; print(torch.__version__, torch.version.cuda)')
[[ $torch == *"+cpu None" ]] || fail "torch in the container is '$torch', not a CPU build"
log "torch (version, cuda): $torch"

# The training worker is background work even with every capability dropped: nice 19, SCHED_IDLE.
worker=$(in_container python -c '
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        name = open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        continue  # ended meanwhile
    if name == "sgd-worker":  # forked by sgd-forkserver, which names it
        p = int(pid)
        print(os.getpriority(os.PRIO_PROCESS, p), os.sched_getscheduler(p) == os.SCHED_IDLE)
')
[ "$worker" = "19 True" ] || fail "the training worker runs at '$worker' (nice, SCHED_IDLE), not '19 True'"
log "the training worker runs at nice 19 under SCHED_IDLE"

root_opts=$(in_container python -c 'print([m.split()[3] for m in open("/proc/mounts") if m.split()[1] == "/"][-1])')
[[ ,$root_opts, == *,ro,* ]] || fail "the root filesystem is mounted '$root_opts', not read-only"
in_container sh -c 'touch /tmp/x && rm /tmp/x' || fail "/tmp is not writable"
log "root filesystem read-only, /tmp writable"

# -- 3. docker compose stop during a fit ----------------------------------------------------
# A fit that runs for minutes whatever the engine: every one of its 100,000 epochs draws a
# batch of 100,000 samples with replacement, 1e10 samples in all (the default
# SGD_MAX_SAMPLE_STEPS, the most one fit may ask for).
python3 -c 'import json; n = 100_000; print(json.dumps({"x": [1.0] * n, "y": [2.0] * n, "batch_size": n, "epochs": 100_000}))' >"$WORK/long.json"
got=$(curl --silent --show-error --max-time 30 -H 'Content-Type: application/json' \
  --data @"$WORK/long.json" -o "$WORK/body" -w '%{http_code}' "$BASE_URL/fit")
[ "$got" = 202 ] || fail "POST /fit (long fit): HTTP $got: $(cat "$WORK/body")"
long=$(field "$WORK/body" 'd["id"]')
poll_job "$long" 60 running >/dev/null
log "job $long running; starting a slow request, then docker compose stop"

# In flight across the stop: a POST /predict whose body is uploaded at 2 KB/s (about 5 s).
python3 -c 'import json; print(json.dumps({"hours": [4.0] * 2000}))' >"$WORK/slow.json"
curl --silent --show-error --max-time 60 --limit-rate 2k -H 'Content-Type: application/json' \
  --data @"$WORK/slow.json" -o "$WORK/slow.out" -w '%{http_code}' "$BASE_URL/predict" \
  >"$WORK/slow.code" 2>"$WORK/slow.err" &
slow_pid=$!
sleep 0.5

t0=$(now)
compose stop "$SERVICE" >"$WORK/stop.log" 2>&1 &
stop_pid=$!

deadline=$(($(date +%s) + 10))
until [ "$(request GET /readyz)" = 503 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "/readyz never answered 503 after docker compose stop"
  sleep 0.05
done
log "/readyz 503 after $(elapsed "$t0" "$(now)") s: $(field "$WORK/body" 'd["detail"]')"

expect 503 POST /fit '{"x": [1, 2, 3], "y": [2, 4, 6]}'
[ "$(field "$WORK/body" 'd["type"]')" = shutting-down ] || fail "fit refused with $(cat "$WORK/body")"
log "POST /fit while draining -> 503 shutting-down"

poll_job "$long" 10 cancelled >/dev/null
cancelled_after=$(elapsed "$t0" "$(now)")
epoch=$(field "$WORK/body" 'd["progress"]["epoch"]')
[ "$(request GET /readyz)" = 503 ] || fail "/readyz no longer 503 once the job was cancelled"
log "job $long cancelled at epoch $epoch after $cancelled_after s, still draining"

wait "$stop_pid" || fail "docker compose stop failed: $(cat "$WORK/stop.log")"
t1=$(now)
compose ps -a --format json "$SERVICE" >"$WORK/ps.json"
exit_code=$(python3 -c '
import json, sys
text = open(sys.argv[1]).read().strip()
rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
print(rows[0]["State"], rows[0]["ExitCode"])
' "$WORK/ps.json")
stop_seconds=$(elapsed "$t0" "$t1")
[ "$exit_code" = "exited 0" ] || fail "after docker compose stop the service is '$exit_code', expected 'exited 0'"
python3 -c 'import sys; sys.exit(float(sys.argv[1]) >= float(sys.argv[2]))' "$stop_seconds" "$GRACE_SECONDS" \
  || fail "docker compose stop took ${stop_seconds}s, the grace period is ${GRACE_SECONDS}s"
log "docker compose stop during a running fit: exited 0 after ${stop_seconds}s (grace period ${GRACE_SECONDS}s)"

wait "$slow_pid" || fail "the in-flight request failed: $(cat "$WORK/slow.err")"
[ "$(cat "$WORK/slow.code")" = 200 ] || fail "the in-flight request got HTTP $(cat "$WORK/slow.code"): $(cat "$WORK/slow.out")"
field "$WORK/slow.out" "d['scores'] == [$score] * 2000" | grep -qx True \
  || fail "the in-flight request got wrong scores: $(head -c 300 "$WORK/slow.out")"
log "the request in flight during the stop completed: 200, 2000 scores of $score"

compose logs --no-color --tail 12 "$SERVICE" | sed 's/^/  | /'
log "passed"

# -- 4. the scaled stack (Redis, two replicas, a standalone worker) ---------------------------
bash "$(dirname "${BASH_SOURCE[0]}")/docker-smoke-scaled.sh"
