#!/usr/bin/env bash
# Smoke test of the scaled stack (`--profile scaled`: Redis, two API replicas, one standalone
# worker), run by .ci/docker-smoke.sh after the single service's checks; .ci/run makes the kit
# start the profile (COMPOSE_PROFILES=scaled). The kit runs everything on the host network, so the
# replicas listen on their own ports, 8001 and 8002.
#   1. a fit through replica 1; replica 2 serves the new version within 1 s
#   2. `docker kill` of the worker in the middle of a fit; once a worker is back the job is run
#      again and succeeds (attempts 2)
#   3. `docker compose restart` of the whole stack: both replicas serve the same model again
set -euo pipefail

: "${DOCKER_CI_COMPOSE:?set by verify.sh under compose}"
R1=http://127.0.0.1:8001
R2=http://127.0.0.1:8002
SCALED=(redis sgd-service-replica-1 sgd-service-replica-2 sgd-service-worker)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { printf 'smoke (scaled): %s\n' "$*"; }
fail() {
  printf 'smoke (scaled): FAILED: %s\n' "$*" >&2
  $DOCKER_CI_COMPOSE logs --no-color --tail 20 "${SCALED[@]}" | sed 's/^/  | /' >&2 || true
  exit 1
}
compose() { $DOCKER_CI_COMPOSE "$@"; }
field() { python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

# get URL: the body to $WORK/body, the status code to stdout ("000" when nothing answers)
get() { curl --silent --max-time 5 -o "$WORK/body" -w '%{http_code}' "$1" || true; }
post() {
  curl --silent --show-error --max-time 30 -H 'Content-Type: application/json' --data "$2" \
    -o "$WORK/body" -w '%{http_code}' "$1"
}
# until URL CHECK SECONDS WHAT: poll URL until the Python CHECK on its JSON `d` holds
until_json() {
  local deadline=$(($(date +%s) + $3))
  while :; do
    if [ "$(get "$1")" = 200 ] && [ "$(field "$WORK/body" "$2")" = True ]; then return 0; fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "$4: not within $3 s (last: $(head -c 300 "$WORK/body"))"
    sleep 0.05
  done
}

running=$(compose ps --status running --services)
for svc in "${SCALED[@]}"; do
  grep -qx "$svc" <<<"$running" || fail "$svc is not running: is COMPOSE_PROFILES=scaled set (.ci/run)?"
done
until_json "$R1/readyz" 'd["status"] == "ready"' 60 "replica 1 ready"
until_json "$R2/readyz" 'd["status"] == "ready"' 60 "replica 2 ready"

# -- 1. one service: a fit through replica 1, served by replica 2 --------------------------
# One Python process posts the fit to replica 1 and polls replica 2's /predict in a tight loop,
# so that the lag (first answer with the new version minus the job's finished_at, the worker's
# stamp on the same clock) is measured to the millisecond, not to a shell loop's step.
out=$(python3 - "$R1" "$R2" <<'PY'
import json, sys, time, urllib.request
from datetime import datetime

r1, r2 = sys.argv[1], sys.argv[2]

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)

before = get(f"{r2}/predict?hours=4").get("model_version", 0)
body = json.dumps({"x": [1, 2, 3], "y": [2, 4, 6], "seed": 42}).encode()
req = urllib.request.Request(f"{r1}/fit", body, {"Content-Type": "application/json"})
job = json.load(urllib.request.urlopen(req, timeout=30))
deadline = time.time() + 120
while time.time() < deadline:
    version = get(f"{r2}/predict?hours=4").get("model_version", 0)
    if version > before:
        seen = time.time()
        break
else:
    sys.exit(f"replica 2 never served a version newer than {before}")
done = get(f"{r1}/jobs/{job['id']}")
lag = seen - datetime.fromisoformat(done["finished_at"]).timestamp()
print(job["id"], done["result"]["model_version"], version, f"{lag:.3f}")
PY
) || fail "the fit through replica 1: $out"
read -r job published served lag <<<"$out"
[ "$published" = "$served" ] || fail "replica 2 served version $served, the fit published $published"
python3 -c 'import sys; sys.exit(float(sys.argv[1]) > 1.0)' "$lag" || fail "replica 2 served version $served ${lag}s after it was published (more than 1 s)"
log "fit through replica 1 (job $job, version $published); replica 2 served it ${lag}s after its publication"

# -- 2. the worker killed mid-fit ------------------------------------------------------------
# About 5-10 s of work: 300,000 epochs of 1,000 samples each.
python3 -c 'import json; n = 1000; print(json.dumps({"x": [float(i % 10) for i in range(n)], "y": [2.0 * (i % 10) for i in range(n)], "batch_size": n, "epochs": 300_000, "learning_rate": 0.001}))' >"$WORK/fit.json"
[ "$(post "$R1/fit" @"$WORK/fit.json")" = 202 ] || fail "POST /fit (killed fit): $(cat "$WORK/body")"
job=$(field "$WORK/body" 'd["id"]')
until_json "$R2/jobs/$job" 'd["status"] == "running" and d["progress"]["epoch"] > 0' 60 "the fit running"
compose kill sgd-service-worker >/dev/null 2>&1
log "job $job running at epoch $(field "$WORK/body" 'd["progress"]["epoch"]'); docker kill of the worker"
sleep 1
compose start sgd-service-worker >/dev/null 2>&1
t0=$(date +%s)
until_json "$R1/jobs/$job" 'd["status"] in ("succeeded", "failed", "cancelled")' 120 "the killed fit ending"
[ "$(field "$WORK/body" 'd["status"], d["attempts"]')" = "('succeeded', 2)" ] \
  || fail "after the worker's kill the job is $(field "$WORK/body" 'd["status"], d["attempts"]'), expected succeeded in 2 attempts"
log "the killed fit ran again and succeeded (attempts 2), $(($(date +%s) - t0)) s after the worker was back"

# -- 3. restart of everything ----------------------------------------------------------------
until_json "$R2/model" 'True' 5 "the model before the restart"
before=$(field "$WORK/body" '(d["version"], d["w"], d["b"], d["job_id"])')
compose restart "${SCALED[@]}" >/dev/null 2>&1
until_json "$R1/readyz" 'd["status"] == "ready"' 120 "replica 1 ready after the restart"
until_json "$R2/readyz" 'd["status"] == "ready"' 120 "replica 2 ready after the restart"
for url in "$R1" "$R2"; do
  [ "$(get "$url/model")" = 200 ] || fail "$url/model after the restart: $(cat "$WORK/body")"
  after=$(field "$WORK/body" '(d["version"], d["w"], d["b"], d["job_id"])')
  [ "$after" = "$before" ] || fail "$url serves $after after the restart, $before before"
done
[ "$(get "$R2/jobs/$job")" = 200 ] || fail "job $job is gone after the restart"
log "after docker compose restart of the stack both replicas serve $before"
log "passed"
