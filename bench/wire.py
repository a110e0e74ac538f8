"""The prediction routes' wire formats, each against GET /predict?hours=4 in the same round:
POST /predict and /v2 inference of one value, the same on a kept version, the same with a 90%
interval (`coverage`: conformal, and gaussian on GET), 1,000 values a
request (values/s), 100,000 values from one client (JSON, and the binary tensor data extension),
GET /predict's p99 beside that client, and other inference servers (bench/peers.py) on the
one-value /v2 request.

The service runs with SGD_MAX_PREDICT_BATCH=100000 and serves version 2, fitted on 1,000 noisy
rows of y = 2x + 1 with half of them held out (so it has both intervals); version 1, the
tutorial's, is kept. The 100,000-value runs (one client each, and GET /predict beside one) take
every other round only (the first, the third, ...), to keep the section near 10 minutes at the
defaults. The peers are started once, before the rounds, and run through all of them: their
idle CPU shows in `others_cpu_fraction`.
"""

import contextlib
import os
import random
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import heavy
import httpx
import load
import orjson
import serving

INFER = "/v2/models/sgd/infer"
INFER_V1 = "/v2/models/sgd/versions/1/infer"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
ONE_V2 = b'{"inputs":[{"name":"hours","datatype":"FP64","shape":[1],"data":[4]}]}'
ONE_V2_COVERAGE = ONE_V2[:-1] + b',"parameters":{"coverage":0.9}}'
BATCH = 1_000
BIG = 100_000
BIG_TIMEOUT = 60.0  # wrk's per-request timeout for the 100,000-value runs (its default: 2 s)
SERVICE_ENV = {"SGD_MAX_PREDICT_BATCH": str(BIG)}  # SGD_MAX_BODY_BYTES' 64 MiB default holds it
# bench/peers.py's names, for the rows when it cannot be imported
PEERS = ("mlserver-default", "mlserver-fastest", "kserve")
TIMEOUT = 120.0

# goals: (b), (c) against (a); (d) against its own unversioned route; values/s of (e), (f); (g)
GOALS = {
    "rps_ratio": 0.5,
    "p99_ratio": 2.0,
    "version_rps_ratio": 0.9,
    "coverage_rps_ratio": 0.9,
    "batch_values_per_s": 2e6,
    "big_json_values_per_s": 1e7,
    "big_binary_values_per_s": 1e8,
    "beside_p99_ratio": 1.5,
}


@dataclass
class Target:
    """One load run's request, and how many values each carries."""

    path: str
    body: bytes | None = None
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    values: int = 1
    connections: int = load.CONNECTIONS
    big: bool = False  # a 100,000-value run: every other round only, wrk's timeout BIG_TIMEOUT

    def describe(self) -> dict[str, Any]:
        return {
            "method": "GET" if self.body is None else "POST",
            "path": self.path,
            "content_type": None if self.body is None else self.content_type,
            "headers": self.headers,
            "body_bytes": 0 if self.body is None else len(self.body),
            "values": self.values,
            "connections": self.connections,
        }


def numbers(n: int) -> list[float]:
    """`n` hours uniform in [0, 10], seeded, each with all its digits (dearest as JSON)."""
    rng = random.Random(n)
    return [rng.uniform(0, 10) for _ in range(n)]


def v2_json(hours: list[float]) -> bytes:
    tensor = {"name": "hours", "datatype": "FP64", "shape": [len(hours)], "data": hours}
    return orjson.dumps({"inputs": [tensor]})


def v2_binary(hours: list[float]) -> tuple[bytes, bytes]:
    """The binary tensor data extension's request (Triton's): the JSON header, FP64 in and out,
    and the body, that header followed by the hours as little-endian float64."""
    n = len(hours)
    tensor = {
        "name": "hours",
        "datatype": "FP64",
        "shape": [n],
        "parameters": {"binary_data_size": 8 * n},
    }
    score = {"name": "score", "parameters": {"binary_data": True}}
    header = orjson.dumps({"inputs": [tensor], "outputs": [score]})
    return header, header + struct.pack(f"<{n}d", *hours)


def targets() -> dict[str, Target]:
    batch, big = numbers(BATCH), numbers(BIG)
    header, binary = v2_binary(big)
    return {
        "get": Target("/predict?hours=4"),
        "v2": Target(INFER, ONE_V2),
        "post": Target("/predict", b'{"hours":[4]}'),
        "get_version": Target("/predict?hours=4&version=1"),
        "v2_version": Target(INFER_V1, ONE_V2),
        "post_version": Target("/predict", b'{"hours":[4],"version":1}'),
        "get_coverage": Target("/predict?hours=4&coverage=0.9"),
        "get_gaussian": Target("/predict?hours=4&coverage=0.9&method=gaussian"),
        "v2_coverage": Target(INFER, ONE_V2_COVERAGE),
        "post_coverage": Target("/predict", b'{"hours":[4],"coverage":0.9}'),
        "v2_batch": Target(INFER, v2_json(batch), values=BATCH),
        "post_batch": Target("/predict", orjson.dumps({"hours": batch}), values=BATCH),
        "v2_big": Target(INFER, v2_json(big), values=BIG, connections=1, big=True),
        "v2_big_binary": Target(
            INFER,
            binary,
            BINARY_TYPE,
            {HEADER_LENGTH: str(len(header))},
            values=BIG,
            connections=1,
            big=True,
        ),
    }


# -- statistics ---------------------------------------------------------------------------------


def spread(values: list[float], higher_is_better: bool) -> dict[str, float]:
    """The median, the best and the worst of a figure's runs."""
    best, worst = (max, min) if higher_is_better else (min, max)
    return {"median": statistics.median(values), "best": best(values), "worst": worst(values)}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": len(runs),
        "rps": spread([r["rps"] for r in runs], True),
        "values_per_s": spread([r["values_per_s"] for r in runs], True),
        "p50_ms": spread([r["p50_ms"] for r in runs], False),
        "p99_ms": spread([r["p99_ms"] for r in runs], False),
        "requests": sum(r["requests"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
    }


def ratio(
    rounds: list[dict[str, dict[str, Any]]], name: str, base: str, key: str, higher: bool
) -> dict[str, Any]:
    """`name`'s figure over `base`'s, per round (the rounds that ran both), their median, best
    and worst; and `of_best`, the best run's figure over the baseline's best run's."""
    pairs = [(r[name][key], r[base][key]) for r in rounds if name in r and base in r]
    per_round = [x / y for x, y in pairs]
    best = max if higher else min
    out = spread(per_round, higher)
    return {
        **out,
        "per_round": per_round,
        "of_best": best(x for x, _ in pairs) / best(y for _, y in pairs),
    }


# -- measuring ----------------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """VmRSS summed over a server and its descendants, in bytes."""
    total = 0
    for p in load.process_tree(pid):
        with contextlib.suppress(OSError, RuntimeError):  # gone meanwhile, or a zombie
            total += load.rss_bytes(p)
    return total


def hammer(wrk: str | None, server: load.Server, target: Target, seconds: float) -> dict[str, Any]:
    """load.hammer on one target, with values/s and the share of the machine other processes
    (neither this one, wrk, nor the server with its children) used meanwhile."""
    pid = server.pid
    t0, busy0, ours0 = time.monotonic(), heavy._machine_busy(), heavy._ours(pid)
    try:
        run = load.hammer(
            wrk,
            server.url + target.path,
            seconds,
            target.body,
            target.content_type,
            target.headers or None,
            target.connections,
            BIG_TIMEOUT if target.big else None,
        )
    except subprocess.CalledProcessError as exc:
        died = server.proc.poll()
        why = "" if died is None else f"; the server exited {died}: {_tail(server.log_path)}"
        raise RuntimeError(
            f"wrk on {target.path} exited {exc.returncode}: {exc.stderr}{exc.stdout}{why}"
        ) from exc
    elapsed = time.monotonic() - t0
    busy, ours = heavy._machine_busy() - busy0, heavy._ours(pid) - ours0
    run["others_cpu_fraction"] = max(0.0, busy - ours) / (elapsed * (os.cpu_count() or 1))
    run["values_per_s"] = run["rps"] * target.values
    return run


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError as exc:
        return f"({exc})"


def check(url: str, target: Target) -> dict[str, Any]:
    """One request with httpx before any load: a 200 carrying as many scores as values sent
    (binary after its JSON header when the request asked for binary output)."""
    headers = {"content-type": target.content_type, **target.headers}
    method = "GET" if target.body is None else "POST"
    response = httpx.request(
        method, url + target.path, content=target.body, headers=headers, timeout=TIMEOUT
    )
    out: dict[str, Any] = {"status": response.status_code, "ok": response.status_code == 200}
    if not out["ok"]:
        out["detail"] = response.text[:300]
        return out
    if target.content_type == BINARY_TYPE:
        length = response.headers.get(HEADER_LENGTH)
        expected = None if length is None else int(length) + 8 * target.values
        out["ok"] = expected == len(response.content)
        out["detail"] = f"{HEADER_LENGTH}: {length}, {len(response.content)} bytes"
        return out
    try:
        answer = response.json()
        if "outputs" in answer:
            count = len(answer["outputs"][0]["data"])
        else:
            count = len(answer["scores"]) if "scores" in answer else 1
    except (ValueError, LookupError, TypeError) as exc:
        out.update(ok=False, detail=f"{type(exc).__name__}: {exc}; {response.text[:300]}")
        return out
    out["ok"] = count == target.values
    if b"coverage" in (target.body or target.path.encode()):  # and the interval asked for
        bounds = [o["name"] for o in answer.get("outputs", [])][1:]
        out["ok"] &= "interval" in answer or "lower" in answer or len(bounds) == 2
    out["detail"] = f"{count} scores, model_version {answer.get('model_version')}"
    return out


def big_client(url: str, target: Target) -> heavy.Loop:
    """One client posting a 100,000-value request back to back, in a thread of this process."""
    headers = {"content-type": target.content_type, **target.headers}

    def send(client: httpx.Client) -> int:
        return client.post(target.path, content=target.body, headers=headers).status_code

    return heavy.Loop("big-client", url, send)


# -- the peers ----------------------------------------------------------------------------------


def prepare_peers(log: Callable[[str], None]) -> tuple[ModuleType | None, dict[str, str]]:
    """bench/peers.py, and each peer it cannot run, with why; (None, all of them) without it."""
    try:
        import peers  # type: ignore[import-not-found, unused-ignore]
    except Exception as exc:
        reason = f"bench/peers.py did not import ({type(exc).__name__}: {exc})"
        return None, dict.fromkeys(PEERS, reason)
    try:
        unavailable = dict(peers.prepare(log))
    except Exception as exc:
        reason = f"peers.prepare failed ({type(exc).__name__}: {exc})"
        return None, dict.fromkeys(peers.PEERS, reason)
    return peers, unavailable


def start_peers(
    log: Callable[[str], None],
    module: ModuleType | None,
    unavailable: dict[str, str],
    log_dir: Path,
    started: dict[str, load.Server],
) -> dict[str, dict[str, Any]]:
    """Every available peer, started (into `started`, for the caller to stop) and checked; each
    peer's record: whether it is available, why not, its version, its check."""
    records: dict[str, dict[str, Any]] = {}
    names = PEERS if module is None else tuple(module.PEERS)
    for name in names:
        record: dict[str, Any] = {"available": False, "reason": unavailable.get(name)}
        records[name] = record
        if module is None or name in unavailable:
            continue
        try:
            log(f"wire: starting peer {name} ...")
            server = module.start(name, log_dir)
        except Exception as exc:
            record["reason"] = f"did not start ({type(exc).__name__}: {exc})"
            continue
        started[name] = server
        record.update(available=True, url=server.url)
        try:
            record["version"] = str(module.version(name))
            body = bytes(module.infer_body(name))
        except Exception as exc:
            record.update(available=False, reason=f"{type(exc).__name__}: {exc}")
            continue
        record["target"] = Target(INFER, body)
        try:
            record["check"] = check(server.url, record["target"])
        except httpx.HTTPError as exc:
            record["check"] = {"status": None, "ok": False, "detail": f"{type(exc).__name__}"}
    return records


# -- the rounds ---------------------------------------------------------------------------------


def load_rounds(
    log: Callable[[str], None],
    wrk: str | None,
    srv: load.Server,
    peers: dict[str, load.Server],
    peer_targets: dict[str, Target],
    seconds: float,
    rounds: int,
) -> tuple[list[dict[str, dict[str, Any]]], dict[str, list[int]]]:
    """Back to back in each round: GET /predict, GET /predict beside the 100,000-value client
    (every other round), each other route, then each peer. The RSS of each server after its
    load (the service's after its one-value /v2 run)."""
    ts = targets()
    for target in ts.values():  # warm: imports, caches, the first connections
        hammer(wrk, srv, target, 1)
    for name, target in peer_targets.items():
        hammer(wrk, peers[name], target, 1)
    out: list[dict[str, dict[str, Any]]] = []
    rss: dict[str, list[int]] = {"service": [], **{name: [] for name in peer_targets}}
    for r in range(rounds):
        big = r % 2 == 0
        log(f"wire: round {r + 1}/{rounds}" + (" (with the 100,000-value runs)" if big else ""))
        runs: dict[str, dict[str, Any]] = {"get": hammer(wrk, srv, ts["get"], seconds)}
        if big:
            client = big_client(srv.url, ts["v2_big"])
            client.start()
            if not client.began.wait(60):
                raise RuntimeError("the 100,000-value client did not start")
            runs["get_beside_big"] = hammer(wrk, srv, ts["get"], seconds)
            runs["get_beside_big"]["client"] = client.stop()
        for name, target in ts.items():
            if name == "get" or (target.big and not big):
                continue
            runs[name] = hammer(wrk, srv, target, seconds)
            if name == "v2":
                rss["service"].append(tree_rss(srv.pid))
        for name, target in peer_targets.items():
            runs[f"peer:{name}"] = hammer(wrk, peers[name], target, seconds)
            rss[name].append(tree_rss(peers[name].pid))
        out.append(runs)
    return out, rss


def run_all(
    log: Callable[[str], None],
    wrk: str | None,
    log_dir: Path,
    seconds: float,
    rounds: int,
    service_env: dict[str, str] | None = None,
    with_peers: bool = True,
) -> dict[str, Any]:
    """The section; with_peers False leaves bench/peers.py alone (each peer row: unavailable)."""
    results: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "seconds_per_run": seconds,
        "rounds": rounds,
        "big_rounds": (rounds + 1) // 2,
        "goals": GOALS,
        "values": "hours uniform in [0, 10], seeded, full-precision JSON numbers",
    }
    module: ModuleType | None = None
    unavailable = dict.fromkeys(PEERS, "left out (--no-peers)")
    if with_peers:
        log("wire: preparing the peers (bench/peers.py) ...")
        module, unavailable = prepare_peers(log)
    env = {**(service_env or {}), **SERVICE_ENV}
    results["service_env"] = env
    (log_dir / "service").mkdir()
    srv = load.start_service(log_dir / "service", env)
    peers: dict[str, load.Server] = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            # version 1, kept; version 2, served, with both intervals
            serving.wait_job(client, serving.submit(client, 100, 1, serving.TUTORIAL))
            fit = {**serving.NOISY, "validation_fraction": 0.5, "learning_rate": 0.001}
            serving.wait_job(client, client.post("/fit", json=fit).json()["id"])
            intervals = client.get("/model").json()["intervals"]
            served = client.get("/model").json()["version"]
            kept = client.get("/v2/models/sgd").json()["versions"]
        if served != 2 or "1" not in kept:
            raise RuntimeError(f"served version {served}, kept {kept}: not 2 and 1")
        if intervals["methods"] != ["conformal", "gaussian"]:
            raise RuntimeError(f"version 2 answers intervals by {intervals['methods']}")
        ts = targets()
        results["targets"] = {name: t.describe() for name, t in ts.items()}
        results["checks"] = {name: check(srv.url, t) for name, t in ts.items()}
        (log_dir / "peers").mkdir()
        records = start_peers(log, module, unavailable, log_dir / "peers", peers)
        peer_targets = {
            n: r.pop("target") for n, r in records.items() if n in peers and "target" in r
        }
        rounds_runs, rss = load_rounds(log, wrk, srv, peers, peer_targets, seconds, rounds)
    finally:
        srv.stop()
        for server in peers.values():
            server.stop()
    results["runs"] = rounds_runs
    names = {name for runs in rounds_runs for name in runs}
    results["figures"] = {
        name: summary([r[name] for r in rounds_runs if name in r]) for name in sorted(names)
    }
    results["ratios"] = {
        name: {
            "baseline": base,
            "rps": ratio(rounds_runs, name, base, "rps", True),
            "p99_ms": ratio(rounds_runs, name, base, "p99_ms", False),
        }
        for name, base in (
            ("v2", "get"),
            ("post", "get"),
            ("get_version", "get"),
            ("v2_version", "v2"),
            ("post_version", "post"),
            ("get_coverage", "get"),
            ("get_gaussian", "get"),
            ("v2_coverage", "v2"),
            ("post_coverage", "post"),
            ("get_beside_big", "get"),
        )
        if name in names
    }
    clients = [r["get_beside_big"]["client"] for r in rounds_runs if "get_beside_big" in r]
    results["big_client"] = {
        "requests": sum(c["requests"] for c in clients),
        "errors": sum(c["errors"] for c in clients),
        "error_statuses": sorted({s for c in clients for s in c["error_statuses"]}),
        "median_seconds": statistics.median(c["median_seconds"] for c in clients),
    }
    results["rss_bytes"] = {
        name: spread([float(v) for v in values], False) for name, values in rss.items() if values
    }
    for name in peer_targets:
        records[name].update(
            rss_bytes=results["rss_bytes"].get(name),
            ratio=ratio(rounds_runs, "v2", f"peer:{name}", "rps", True),
        )
    results["peers"] = records
    others = [run["others_cpu_fraction"] for r in rounds_runs for run in r.values()]
    results["others_cpu_fraction"] = {"median": statistics.median(others), "max": max(others)}
    results["failed_requests"] = sum(f["failed"] for f in results["figures"].values())
    results["load_average_at_end"] = os.getloadavg()
    return results
