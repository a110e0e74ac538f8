"""Hostile callers beside /predict (issue 26): what 1,000 event-stream subscribers, one client
looping 10,000-value /v2 inferences and one client looping a /fit body of 1,000,000 nulls cost
/predict's p99, each against /predict idle in the same round.

The server has a token (SGD_API_TOKEN), as a deployment open to hostile callers would: the
subscribers send none, since reading a job's events needs none; the client posting nulls sends
it, so that its body is read and validated (the worst case: without it, it is a 401 before the
body is read).
"""

import asyncio
import os
import random
import resource
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import heavy
import httpx
import load
import orjson
import serving

SUBSCRIBERS = 1_000
# The subscribers are spread over one running fit and the fits queued behind it: 15 leaves one
# place of SGD_MAX_QUEUED_JOBS' default 16. Spread this thin, a cap per job refuses as few as it
# can, and a cap on all streams is the one tested.
QUEUED_JOBS = 15
# The running fit: 1,000,000 updates of 10,000 samples each (1e10 sample steps, the default
# SGD_MAX_SAMPLE_STEPS) hold the worker for minutes, far longer than a round; it is cancelled at
# the end of its round. (An update of one sample costs ~0.1 us: such a fit would end at once.)
# Its 1,000 progress events come a few a second.
LONG_FIT_SAMPLES = 1_000
LONG_FIT_BATCH = 10_000
LONG_FIT_EPOCHS = 1_000_000
INFER_VALUES = 10_000  # SGD_MAX_PREDICT_BATCH's default
NULLS = 1_000_000  # half in x, half in y: within 2 x SGD_MAX_SAMPLES, so the body is parsed
MAX_BODY_BYTES = 64 * 2**20  # SGD_MAX_BODY_BYTES' default
INFER_PATH = "/v2/models/sgd/infer"
OPENING_AT_ONCE = 100  # connections being opened at a time
ANSWER_TIMEOUT = 60.0  # for each subscription's status line
FDS = 8192  # this process holds 1,000 sockets, and the server it starts inherits the limit
AUTH = {"authorization": f"Bearer {heavy.TOKEN}"}
PROGRESS = b"event: progress"


def raise_fd_limit(wanted: int = FDS) -> tuple[int, int]:
    """Raise this process's soft limit on open files towards `wanted` (the hard limit caps it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def infer_body(values: int = INFER_VALUES) -> bytes:
    """An inference request of `values` FP64 hours, each with all its digits (dearest to parse)."""
    rng = random.Random(0)
    data = [rng.uniform(0, 10) for _ in range(values)]
    hours = {"name": "hours", "shape": [values], "datatype": "FP64", "data": data}
    return orjson.dumps({"inputs": [hours]})


def nulls_body(nulls: int = NULLS) -> bytes:
    body = orjson.dumps({"x": [None] * (nulls // 2), "y": [None] * (nulls - nulls // 2)})
    if len(body) >= MAX_BODY_BYTES:
        raise RuntimeError(f"{len(body)} bytes of nulls: a 413, not the 422 to measure")
    return body


def long_fit_body() -> bytes:
    rng = random.Random(1)
    x = [round(rng.uniform(0, 10), 3) for _ in range(LONG_FIT_SAMPLES)]
    y = [round(2 * v + 1 + rng.gauss(0, 1), 3) for v in x]
    body = {"x": x, "y": y, "epochs": LONG_FIT_EPOCHS, "batch_size": LONG_FIT_BATCH}
    return orjson.dumps({**body, "learning_rate": 0.001, "seed": 1, "publish": "never"})


def post(path: str, body: bytes, headers: dict[str, str]) -> Callable[[httpx.Client], int]:
    def send(client: httpx.Client) -> int:
        return client.post(path, content=body, headers={**heavy.JSON, **headers}).status_code

    return send


# -- the fits the subscribers watch ---------------------------------------------------------


def start_jobs(client: httpx.Client, long_fit: bytes) -> list[str]:
    """A long fit, running once this returns, and QUEUED_JOBS tutorial fits queued behind it."""
    response = client.post("/fit", content=long_fit, headers={**heavy.JSON, **AUTH})
    response.raise_for_status()
    running: str = response.json()["id"]
    end = time.monotonic() + 60
    while client.get(f"/jobs/{running}").json()["status"] == "queued":
        if time.monotonic() > end:
            raise RuntimeError("the long fit did not start within 60 s")
        time.sleep(0.02)
    queued: list[str] = []
    for seed in range(QUEUED_JOBS):
        fit = {**serving.TUTORIAL, "epochs": 100, "seed": seed, "publish": "never"}
        response = client.post("/fit", json=fit, headers=AUTH)
        response.raise_for_status()
        queued.append(response.json()["id"])
    if not still_waiting(client, [running, *queued]):
        raise RuntimeError("the fits were not one running and the rest queued")
    return [running, *queued]


def still_waiting(client: httpx.Client, job_ids: list[str]) -> bool:
    """Whether the first fit is running and the others queued, as the subscribers found them."""
    statuses = [client.get(f"/jobs/{job_id}").json()["status"] for job_id in job_ids]
    return statuses == ["running"] + ["queued"] * (len(job_ids) - 1)


def cancel_jobs(client: httpx.Client, job_ids: list[str]) -> None:
    """The queued fits first, so that the worker takes none of them when the running one stops."""
    for job_id in reversed(job_ids):
        response = client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
        if response.status_code == 409:  # it had ended already
            continue
        if response.status_code != 200 or response.json()["status"] in ("queued", "running"):
            raise RuntimeError(f"cancel {job_id}: {response.status_code} {response.text[:300]}")


# -- the subscribers ------------------------------------------------------------------------


@dataclass
class Stream:
    path: str
    status: int | str | None = None  # the answer's status, or why there was none
    answer_seconds: float = float("nan")
    bytes: int = 0
    progress_events: int = 0
    closed_by_server: bool = False
    error: str | None = None  # a stream that broke after its 200


class Subscribers(threading.Thread):
    """Event streams opened from one asyncio loop, each read as it comes until stopped."""

    def __init__(self, url: str, paths: list[str]) -> None:
        super().__init__(name="subscribers", daemon=True)
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.streams = [Stream(path) for path in paths]
        self.answered = threading.Event()  # set once every subscription has its answer (or none)
        self._ready = threading.Event()
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        gate = asyncio.Semaphore(OPENING_AT_ONCE)
        tasks = [asyncio.create_task(self._hold(stream, gate)) for stream in self.streams]
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _answer(self, stream: Stream, status: int | str) -> None:
        stream.status = status
        self._count += 1
        if self._count == len(self.streams):
            self.answered.set()

    async def _hold(self, stream: Stream, gate: asyncio.Semaphore) -> None:
        request = (
            f"GET {stream.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        writer = None
        try:
            async with gate:
                start = time.perf_counter()
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                stream.answer_seconds = time.perf_counter() - start
                self._answer(stream, int(head.split(b" ", 2)[1]))
            if stream.status != 200:
                return  # refused: its body is not read, the connection closed
            tail = b""
            while chunk := await reader.read(65536):
                stream.bytes += len(chunk)
                stream.progress_events += (tail + chunk).count(PROGRESS)
                tail = chunk[1 - len(PROGRESS) :]  # a marker cut in two is counted once
            stream.closed_by_server = True
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            if stream.status is None:
                self._answer(stream, type(exc).__name__)
            else:
                stream.error = type(exc).__name__
        finally:
            if writer is not None:
                writer.close()

    def stop(self) -> dict[str, Any]:
        """Close every stream; what they got."""
        self._ready.wait(60)
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(heavy.TIMEOUT)
        statuses = Counter(str(s.status) for s in self.streams)
        accepted = [s for s in self.streams if s.status == 200]
        answers = [s.answer_seconds for s in self.streams if s.status is not None]
        answers = [a for a in answers if a == a]  # not NaN: answered
        return {
            "subscriptions": len(self.streams),
            "statuses": dict(statuses),
            "accepted": len(accepted),
            "refused": sum(n for status, n in statuses.items() if status in ("429", "503")),
            "closed_by_server": sum(s.closed_by_server for s in accepted),
            "broken": sum(s.error is not None for s in accepted),
            "bytes": sum(s.bytes for s in accepted),
            "progress_events": sum(s.progress_events for s in accepted),
            "with_progress": sum(s.progress_events > 0 for s in accepted),
            "answer_seconds": heavy._median_best_worst(answers) if answers else None,
        }


def hammer_beside_streams(
    wrk: str | None, srv: load.Server, seconds: float, job_ids: list[str]
) -> dict[str, Any]:
    """/predict loaded while SUBSCRIBERS streams, spread evenly over the jobs, are read."""
    paths = [f"/jobs/{job_ids[i % len(job_ids)]}/events" for i in range(SUBSCRIBERS)]
    subscribers = Subscribers(srv.url, paths)
    start = time.perf_counter()
    subscribers.start()
    all_answered = subscribers.answered.wait(ANSWER_TIMEOUT + 30)
    opened_seconds = time.perf_counter() - start
    run = heavy.hammer(wrk, srv, seconds)
    run["subscribers"] = {
        **subscribers.stop(),
        "all_answered_before_the_load": all_answered,
        "opening_seconds": opened_seconds,
    }
    return run


def _statuses(loop: heavy.Loop) -> dict[str, int]:
    return dict(Counter(str(r["status"]) for r in loop.requests))


def hammer_beside_loop(
    wrk: str | None, srv: load.Server, seconds: float, loop: heavy.Loop
) -> dict[str, Any]:
    """heavy.hammer_beside with one looping client, and the count of each status it got."""
    run = heavy.hammer_beside(wrk, srv, seconds, [loop])
    run["statuses"] = _statuses(loop)
    return run


# -- the figures --------------------------------------------------------------------------------


def _summary(runs: list[dict[str, Any]], idle: list[float], key: str) -> dict[str, Any]:
    p99 = [run["p99_ms"] for run in runs]
    ratios = [x / y for x, y in zip(p99, idle, strict=True)]
    return {
        "p99_ms": heavy._median_best_worst(p99),
        "ratios": ratios,
        "ratio": heavy._median_best_worst(ratios),
        "ratio_of_best": min(p99) / min(idle),
        "wrk_failed": sum(run["failed"] for run in runs),
        "key": key,
    }


def _client_totals(runs: list[dict[str, Any]], expected: str) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    for run in runs:
        statuses.update(run["statuses"])
    seconds = [record["median_seconds"] for run in runs for record in run["heavy"].values()]
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "expected_status": expected,
        "unexpected": sum(n for status, n in statuses.items() if status != expected),
        "median_seconds": statistics.median(seconds),
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    idle = [run["p99_ms"] for run in runs["idle"]]
    out: dict[str, Any] = {"idle_p99_ms": heavy._median_best_worst(idle)}
    for key in ("fit", "streams", "infer", "nulls"):
        out[key] = _summary(runs[key], idle, key)
    fit = [run["p99_ms"] for run in runs["fit"]]
    streams = [run["p99_ms"] for run in runs["streams"]]
    # the streams' own share: against the same fits running with no one watching them
    own = [x / y for x, y in zip(streams, fit, strict=True)]
    out["streams"]["ratios_to_fit"] = own
    out["streams"]["ratio_to_fit"] = heavy._median_best_worst(own)
    out["streams"]["ratio_of_best_to_fit"] = min(streams) / min(fit)
    subs = [run["subscribers"] for run in runs["streams"]]
    per_round = {k: [s[k] for s in subs] for k in ("accepted", "refused", "closed_by_server")}
    w = [s["with_progress"] for s in subs]  # the running fit's watchers, if all is well
    statuses: Counter[str] = Counter()
    for s in subs:
        statuses.update(s["statuses"])
    out["streams"]["subscriptions"] = {
        **{k: {"min": min(v), "max": max(v)} for k, v in per_round.items()},
        "statuses": dict(statuses),
        "broken": sum(s["broken"] for s in subs),
        "progress_events": sum(s["progress_events"] for s in subs),
        "with_progress": {"min": min(w), "max": max(w)},
        "all_answered_before_the_load": all(s["all_answered_before_the_load"] for s in subs),
        # the long fit still running, the others queued, when the load ended: else the row
        # measured something else
        "fits_still_waiting": all(run["fits_still_waiting"] for run in runs["streams"]),
        "opening_seconds": heavy._median_best_worst([s["opening_seconds"] for s in subs]),
    }
    out["infer"]["client"] = _client_totals(runs["infer"], "200")
    out["nulls"]["client"] = _client_totals(runs["nulls"], "422")
    others = [run["others_cpu_fraction"] for group in runs.values() for run in group]
    out["others_cpu_fraction"] = {"median": statistics.median(others), "max": max(others)}
    return out


def run_all(
    log: Callable[[str], None],
    wrk: str | None,
    log_dir: Path,
    seconds: float,
    rounds: int,
    service_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """In each round, back to back: /predict idle; beside a long fit running with 15 queued
    behind it; beside the same fits with 1,000 subscribers; beside the /v2 client; beside the
    nulls client."""
    fds = raise_fd_limit()
    infer, nulls, long_fit = infer_body(), nulls_body(), long_fit_body()
    results: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "open_files_limit": list(fds),
        "subscribers": SUBSCRIBERS,
        "jobs_watched": 1 + QUEUED_JOBS,
        "long_fit": {
            "samples": LONG_FIT_SAMPLES,
            "batch_size": LONG_FIT_BATCH,
            "epochs": LONG_FIT_EPOCHS,
            "bytes": len(long_fit),
        },
        "infer_body": {"values": INFER_VALUES, "bytes": len(infer)},
        "nulls_body": {"nulls": NULLS, "bytes": len(nulls)},
        "seconds_per_run": seconds,
        "connections": load.CONNECTIONS,
    }
    env = {**(service_env or {}), "SGD_API_TOKEN": heavy.TOKEN}
    (log_dir / "hostile").mkdir()
    srv = load.start_service(log_dir / "hostile", env)
    runs: dict[str, list[dict[str, Any]]] = {
        key: [] for key in ("idle", "fit", "streams", "infer", "nulls")
    }
    try:
        with httpx.Client(base_url=srv.url, timeout=heavy.TIMEOUT) as client:
            fit = {**serving.TUTORIAL, "epochs": 100, "seed": 1}
            response = client.post("/fit", json=fit, headers=AUTH)
            response.raise_for_status()
            serving.wait_job(client, response.json()["id"])  # a served model for /predict, /v2
            load.hammer(wrk, srv.url + heavy.PREDICT, 2)  # warm: the first connections, caches
            for r in range(rounds):
                log(f"hostile: round {r + 1}/{rounds}")
                runs["idle"].append(heavy.hammer(wrk, srv, seconds))
                job_ids = start_jobs(client, long_fit)
                try:
                    runs["fit"].append(heavy.hammer(wrk, srv, seconds))
                    streams = hammer_beside_streams(wrk, srv, seconds, job_ids)
                    streams["fits_still_waiting"] = still_waiting(client, job_ids)
                    runs["streams"].append(streams)
                finally:
                    cancel_jobs(client, job_ids)
                v2 = heavy.Loop("infer-10k", srv.url, post(INFER_PATH, infer, {}))
                runs["infer"].append(hammer_beside_loop(wrk, srv, seconds, v2))
                fits = heavy.Loop("fit-nulls", srv.url, post("/fit", nulls, AUTH))
                runs["nulls"].append(hammer_beside_loop(wrk, srv, seconds, fits))
    finally:
        srv.stop()
    results["runs"] = runs
    results.update(summarise(runs))
    results["load_average_at_end"] = os.getloadavg()
    return results
