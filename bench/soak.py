"""A memory soak: the server's RSS under mixed prediction load over every prediction route.

The service is started as deployed (load.start_service), fits the tutorial model, then takes
SOAK_SECONDS (600 by default; SGD_BENCH_SOAK_SECONDS overrides it) of load on all three
prediction routes at once, five kinds of request side by side, each from its own wrk (or the
asyncio fallback):

- GET /predict?hours=4
- POST /predict {"hours": [...]} with 1 value, and with 1,000 values
- POST /v2/models/sgd/infer, JSON, with 1 value, and with 1,000 values

The load runs in windows of SAMPLE_SECONDS; the server's RSS (VmRSS of its pid, /proc) is read
after the first window (the warm-up) and after each window after it, the last one at the end.
Its growth after the warm-up is the figure, against a goal of at most 5 MB. Every answer must be
2xx: a failed request is counted and reported.
"""

import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import load

SOAK_SECONDS = 600.0
SAMPLE_SECONDS = 30.0  # the warm-up, and the time between two readings of the RSS
GOAL_MB = 5.0
CONNECTIONS = 6  # per kind of request: 30 in all, about the 32 of the other load runs
TIMEOUT = 120.0


def soak_seconds(env: dict[str, str] | None = None) -> float:
    value = (env or {}).get("SGD_BENCH_SOAK_SECONDS") or os.environ.get("SGD_BENCH_SOAK_SECONDS")
    return float(value) if value else SOAK_SECONDS


def requests_mix() -> dict[str, tuple[str, bytes | None]]:
    """Each kind of request: its path and its body (None: a GET)."""
    rng = random.Random(0)
    many = [round(rng.uniform(0, 24), 3) for _ in range(1000)]

    def infer(values: list[float]) -> bytes:
        tensor = {"name": "hours", "shape": [len(values)], "datatype": "FP64", "data": values}
        return json.dumps({"inputs": [tensor]}).encode()

    return {
        "get_predict": ("/predict?hours=4", None),
        "post_predict_1": ("/predict", json.dumps({"hours": [4.0]}).encode()),
        "post_predict_1000": ("/predict", json.dumps({"hours": many}).encode()),
        "v2_infer_1": ("/v2/models/sgd/infer", infer([4.0])),
        "v2_infer_1000": ("/v2/models/sgd/infer", infer(many)),
    }


def check_answers(url: str, mix: dict[str, tuple[str, bytes | None]]) -> None:
    """Every kind of request answers 2xx before the soak starts (a typo is not a soak)."""
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for name, (path, body) in mix.items():
            if body is None:
                response = client.get(path)
            else:
                response = client.post(
                    path, content=body, headers={"Content-Type": "application/json"}
                )
            if not response.is_success:
                raise RuntimeError(f"{name}: {response.status_code} {response.text[:300]}")


def window(
    wrk: str | None, url: str, mix: dict[str, tuple[str, bytes | None]], seconds: float
) -> dict[str, dict[str, Any]]:
    """Every kind of request at once for `seconds`, each from its own load generator."""
    out: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def run(name: str, path: str, body: bytes | None) -> None:
        try:
            out[name] = load.hammer(wrk, url + path, seconds, body=body, connections=CONNECTIONS)
        except BaseException as exc:  # reported below, from the caller's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(name, path, body), name=f"soak-{name}")
        for name, (path, body) in mix.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def run_all(
    log: Callable[[str], None],
    wrk: str | None,
    log_dir: Path,
    seconds: float,
    rounds: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The soak; `seconds` and `rounds` (the other load runs' settings) are not used: its
    length is SOAK_SECONDS, or SGD_BENCH_SOAK_SECONDS from `env` or the environment."""
    import serving  # the tutorial fit and its wait, as the serving figures do it

    total = soak_seconds(env)
    service_env = {k: v for k, v in (env or {}).items() if k != "SGD_BENCH_SOAK_SECONDS"}
    srv = load.start_service(log_dir, service_env)
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            serving.wait_job(client, serving.submit(client, 100, data=serving.TUTORIAL))
        mix = requests_mix()
        check_answers(srv.url, mix)
        started = time.monotonic()
        rss_start = load.rss_bytes(srv.pid)
        log(f"soak: {total:.0f} s of mixed predict load, RSS {rss_start / 2**20:.1f} MB at start")
        samples: list[dict[str, float]] = []
        windows: list[dict[str, dict[str, Any]]] = []
        while True:
            # whole seconds: wrk takes no fraction of one
            left = int(total - (time.monotonic() - started))
            if left < 1:
                break
            windows.append(window(wrk, srv.url, mix, min(SAMPLE_SECONDS, left)))
            rss = load.rss_bytes(srv.pid)
            samples.append({"seconds": time.monotonic() - started, "rss_mb": rss / 2**20})
            log(f"soak: {samples[-1]['seconds']:.0f} s, RSS {rss / 2**20:.1f} MB")
        if len(samples) < 2:
            raise RuntimeError(f"a soak of {total:.0f} s is too short: no sample after warm-up")
        warm, after = samples[0], samples[1:]
        growth = after[-1]["rss_mb"] - warm["rss_mb"]
        routes = {
            name: {
                "requests": sum(w[name]["requests"] for w in windows),
                "failed": sum(w[name]["failed"] for w in windows),
                "rps": sum(w[name]["requests"] for w in windows) / (samples[-1]["seconds"] or 1.0),
                "p99_ms_worst_window": max(w[name]["p99_ms"] for w in windows),
            }
            for name in mix
        }
        return {
            "seconds": samples[-1]["seconds"],
            "warmup_seconds": warm["seconds"],
            "sample_seconds": SAMPLE_SECONDS,
            "connections_per_route": CONNECTIONS,
            "rss_start_mb": rss_start / 2**20,
            "rss_after_warmup_mb": warm["rss_mb"],
            "rss_end_mb": after[-1]["rss_mb"],
            "rss_max_mb": max(s["rss_mb"] for s in after),
            "rss_growth_mb": growth,
            "rss_max_growth_mb": max(s["rss_mb"] for s in after) - warm["rss_mb"],
            "goal_mb": GOAL_MB,
            "met": growth <= GOAL_MB,
            "samples": samples,
            "routes": routes,
            "requests": sum(r["requests"] for r in routes.values()),
            "failed_requests": sum(r["failed"] for r in routes.values()),
        }
    finally:
        srv.stop()
