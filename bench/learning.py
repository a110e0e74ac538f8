"""Learning from what happened (issue 30): what a canary rollout costs GET /predict, and what
POST /outcomes of 1,000 outcomes a request costs GET /predict's p99.

One server, version 1 served and version 2 kept (`"publish": "never"`), both fitted on 1,000
noisy rows of y = 2x + 1 with half of them held out (so each has a 90% interval to score
outcomes against). Each round measures, back to back, with wrk at 32 connections:

- `plain`: GET /predict?hours=4 with no canary (DELETE /models/2/serve before it);
- `canary`: the same while version 2 runs as a 10% canary (POST /models/2/serve
  {"traffic": 10}, no rule: it is never decided), answered by either version at random;
- `canary_key`: the same with a caller key, GET /predict?hours=4&key=caller-7 (one version);
- `outcomes`: `canary` again while one client (a thread of this process) posts 1,000-outcome
  bodies to POST /outcomes back to back: each outcome is scored against both live versions.

The order alternates: key, plain, canary, outcomes in the first round, outcomes, canary,
plain, key in the next, so that each ratio's two runs are next to each other in every round
and neither always comes first. The ratios are canary / plain and canary_key / plain
(requests/s) and outcomes / canary (p99), each the median of the per-round ratios, with the
best-of-runs ratio (the best run over the best baseline run) beside it: a goal is met when
both are. Before the rounds, the outcomes client runs once alone (`seconds`, canary on): what
the server records with no other load, for reference. About 4 runs of `seconds` a round: about 3
minutes at the defaults.
"""

import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import heavy
import httpx
import load
import orjson
import serving
import wire

PREDICT = "/predict?hours=4"
KEY = "caller-7"
TRAFFIC = 10
OUTCOMES_PER_REQUEST = 1_000
GOALS = {"canary_rps_ratio": 0.9, "outcomes_p99_ratio": 1.5}
JSON = {"content-type": "application/json"}
TIMEOUT = 120.0
# the rounds' two orders: each ratio's runs adjacent, the first of each pair alternating
ORDERS = (
    ("canary_key", "plain", "canary", "outcomes"),
    ("outcomes", "canary", "plain", "canary_key"),
)


def outcomes_body(n: int = OUTCOMES_PER_REQUEST, seed: int = 30) -> bytes:
    """`n` outcomes of y = 2x + 1 with noise, hours in [0, 10], each with all its digits."""
    rng = random.Random(seed)
    hours = [rng.uniform(0, 10) for _ in range(n)]
    return orjson.dumps({"hours": hours, "score": [2 * h + 1 + rng.gauss(0, 1) for h in hours]})


def targets() -> dict[str, wire.Target]:
    return {
        "plain": wire.Target(PREDICT),
        "canary": wire.Target(PREDICT),
        "canary_key": wire.Target(f"{PREDICT}&key={KEY}"),
        "outcomes": wire.Target(PREDICT),
    }


def set_canary(client: httpx.Client, on: bool) -> dict[str, Any]:
    """Version 2 rolled out as a 10% canary, or rolled back; its rollout after."""
    if on:
        response = client.post("/models/2/serve", json={"traffic": TRAFFIC})
    else:
        response = client.delete("/models/2/serve")
    if response.status_code != 200:
        raise RuntimeError(
            f"{'POST' if on else 'DELETE'} /models/2/serve: {response.status_code} "
            f"{response.text[:300]}"
        )
    rollout: dict[str, Any] = response.json().get("rollout") or {}
    state = rollout.get("state")
    if (state == "running") != on:
        raise RuntimeError(f"version 2's rollout is {state!r} after turning the canary {on}")
    return rollout


def check_split(url: str, requests: int = 400) -> dict[str, Any]:
    """With the canary on: which versions answer GET /predict without a key (about 10% the
    canary) and with one (always the same), and whether each answer has its X-Prediction-Id."""
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for name, path in (("random", PREDICT), ("key", f"{PREDICT}&key={KEY}")):
            versions: dict[int, int] = {}
            missing_ids, bad = 0, []
            for _ in range(requests):
                response = client.get(path)
                if response.status_code != 200:
                    bad.append(response.status_code)
                    continue
                version = response.json()["model_version"]
                versions[version] = versions.get(version, 0) + 1
                pid = response.headers.get("x-prediction-id", "")
                if not pid.startswith(f"v{version}-"):
                    missing_ids += 1
            out[name] = {
                "versions": {str(v): n for v, n in sorted(versions.items())},
                "canary_share": versions.get(2, 0) / max(1, sum(versions.values())),
                "without_prediction_id": missing_ids,
                "errors": bad,
            }
    random_share, key_versions = out["random"]["canary_share"], out["key"]["versions"]
    out["ok"] = (
        0.03 <= random_share <= 0.2
        and len(key_versions) == 1
        and not any(out[n]["errors"] or out[n]["without_prediction_id"] for n in ("random", "key"))
    )
    return out


def check_outcomes(client: httpx.Client, body: bytes) -> dict[str, Any]:
    """One POST /outcomes with the canary on: its receipt (1,000 recorded, both versions)."""
    start = time.perf_counter()
    response = client.post("/outcomes", content=body, headers=JSON)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"status": response.status_code, "seconds": seconds}
    if response.status_code != 200:
        out.update(ok=False, detail=response.text[:300])
        return out
    receipt = response.json()
    out["receipt"] = receipt
    out["ok"] = (
        receipt["recorded"] == OUTCOMES_PER_REQUEST
        and receipt["versions"] == [1, 2]
        and receipt["decision"] is None
    )
    return out


def poster(url: str, body: bytes) -> heavy.Loop:
    def send(client: httpx.Client) -> int:
        return client.post("/outcomes", content=body, headers=JSON).status_code

    return heavy.Loop("outcomes-poster", url, send)


def post_alone(url: str, body: bytes, seconds: float) -> dict[str, Any]:
    """The outcomes client alone for `seconds`, with no other load: what the server can record."""
    loop = poster(url, body)
    began = time.monotonic()
    loop.start()
    time.sleep(seconds)
    record = loop.stop()
    elapsed = time.monotonic() - began
    times = sorted(x["seconds"] for x in loop.requests)
    record["outcomes_per_s"] = record["requests"] * OUTCOMES_PER_REQUEST / elapsed
    record["request_ms"] = {
        "median": statistics.median(times) * 1e3,
        "p99": times[int(0.99 * (len(times) - 1))] * 1e3,
    }
    return record


def load_rounds(
    log: Callable[[str], None],
    wrk: str | None,
    srv: load.Server,
    client: httpx.Client,
    seconds: float,
    rounds: int,
) -> list[dict[str, dict[str, Any]]]:
    ts, body = targets(), outcomes_body()
    set_canary(client, True)
    for name in ("canary", "canary_key"):  # warm: imports, caches, the first connections
        wire.hammer(wrk, srv, ts[name], 1)
    set_canary(client, False)
    wire.hammer(wrk, srv, ts["plain"], 1)
    canary_on = False
    out: list[dict[str, dict[str, Any]]] = []
    for r in range(rounds):
        order = ORDERS[r % 2]
        log(f"learning: round {r + 1}/{rounds} ({', '.join(order)})")
        runs: dict[str, dict[str, Any]] = {}
        for name in order:
            want = name != "plain"
            if want != canary_on:
                set_canary(client, want)
                canary_on = want
            if name != "outcomes":
                runs[name] = wire.hammer(wrk, srv, ts[name], seconds)
                continue
            loop = poster(srv.url, body)
            began = time.monotonic()
            loop.start()
            if not loop.began.wait(60):
                raise RuntimeError("the outcomes client did not start")
            run = wire.hammer(wrk, srv, ts[name], seconds)
            client_record = loop.stop()
            elapsed = time.monotonic() - began
            client_record["outcomes_per_s"] = (
                client_record["requests"] * OUTCOMES_PER_REQUEST / elapsed
            )
            client_record["seconds"] = [x["seconds"] for x in loop.requests]
            run["client"] = client_record
            runs[name] = run
        out.append(runs)
    if canary_on:
        set_canary(client, False)
    return out


def run_all(
    log: Callable[[str], None],
    wrk: str | None,
    log_dir: Path,
    seconds: float,
    rounds: int,
    service_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "seconds_per_run": seconds,
        "rounds": rounds,
        "goals": GOALS,
        "traffic": TRAFFIC,
        "key": KEY,
        "outcomes_per_request": OUTCOMES_PER_REQUEST,
    }
    srv = load.start_service(log_dir, service_env)
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            fit = {**serving.NOISY, "validation_fraction": 0.5, "learning_rate": 0.001}
            serving.wait_job(client, client.post("/fit", json={**fit, "seed": 1}).json()["id"])
            kept = {**fit, "seed": 2, "epochs": 50, "publish": "never"}
            serving.wait_job(client, client.post("/fit", json=kept).json()["id"])
            served = client.get("/model").json()["version"]
            if served != 1:
                raise RuntimeError(f"served version {served}, not 1")
            set_canary(client, True)
            results["check_split"] = check_split(srv.url)
            results["check_outcomes"] = check_outcomes(client, outcomes_body())
            log("learning: the outcomes client alone, with the canary on ...")
            results["outcomes_alone"] = post_alone(srv.url, outcomes_body(), seconds)
            set_canary(client, False)
            rounds_runs = load_rounds(log, wrk, srv, client, seconds, rounds)
            version_2 = client.get("/models/2").json()
            results["version_2_after"] = {
                "quality": version_2.get("quality"),
                "rollout": version_2.get("rollout"),
            }
    finally:
        srv.stop()
    results["runs"] = rounds_runs
    names = {name for runs in rounds_runs for name in runs}
    results["figures"] = {
        name: wire.summary([r[name] for r in rounds_runs if name in r]) for name in sorted(names)
    }
    results["ratios"] = {
        "canary_rps": wire.ratio(rounds_runs, "canary", "plain", "rps", True),
        "canary_key_rps": wire.ratio(rounds_runs, "canary_key", "plain", "rps", True),
        "canary_p99": wire.ratio(rounds_runs, "canary", "plain", "p99_ms", False),
        "canary_key_p99": wire.ratio(rounds_runs, "canary_key", "plain", "p99_ms", False),
        "outcomes_p99": wire.ratio(rounds_runs, "outcomes", "canary", "p99_ms", False),
        "outcomes_rps": wire.ratio(rounds_runs, "outcomes", "canary", "rps", True),
    }
    clients = [r["outcomes"]["client"] for r in rounds_runs]
    request_seconds = [s for c in clients for s in c["seconds"]]
    results["outcomes_client"] = {
        "requests": sum(c["requests"] for c in clients),
        "errors": sum(c["errors"] for c in clients),
        "error_statuses": sorted({s for c in clients for s in c["error_statuses"]}),
        "outcomes_per_s": wire.spread([c["outcomes_per_s"] for c in clients], True),
        "request_ms": {
            "median": statistics.median(request_seconds) * 1e3,
            "p99": sorted(request_seconds)[int(0.99 * (len(request_seconds) - 1))] * 1e3,
            "max": max(request_seconds) * 1e3,
        },
    }
    for c in clients:  # kept summarised above: the raw list is long
        del c["seconds"]
    others = [run["others_cpu_fraction"] for r in rounds_runs for run in r.values()]
    results["others_cpu_fraction"] = {"median": statistics.median(others), "max": max(others)}
    results["failed_requests"] = sum(f["failed"] for f in results["figures"].values())
    results["load_average_at_end"] = os.getloadavg()
    return results
