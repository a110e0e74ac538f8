"""Heavy requests beside /predict (issue 13): what a 1,000,000-sample fit, the full history of a
1,000,000-epoch fit, the plot and a 64 MiB body cost the server, and what they cost /predict.

Every figure has its baseline measured in the same run: /predict's p99 idle in the same round,
`orjson.loads` of the same body, `orjson.dumps` of the same columns, the server's RSS just before.
"""

import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import load
import orjson
import serving

FIT_SAMPLES = 1_000_000
HISTORY_EPOCHS = 1_000_000
# The 1,000,000-sample fits that are posted train for a few epochs only: what is measured is
# their acceptance (receive, parse, validate, enqueue), and the queue must never fill up.
FIT_EPOCHS = 10
MEMORY_BODY_BYTES = round(62.9 * 2**20)  # under SGD_MAX_BODY_BYTES' default of 64 MiB
PLOT_CLIENTS = 2
PREDICT = "/predict?hours=4"
JSON = {"content-type": "application/json"}
TOKEN = "bench-token"  # a throwaway token, for servers of the bench's own
TIMEOUT = 300.0
TICKS = os.sysconf("SC_CLK_TCK")


def fit_body(samples: int = FIT_SAMPLES) -> bytes:
    """A fit of `samples` noisy points as a client would post it, encoded once."""
    rng = random.Random(0)
    x = [round(rng.uniform(0, 10), 3) for _ in range(samples)]
    y = [round(2 * v + 1 + rng.gauss(0, 1), 3) for v in x]
    body = {"x": x, "y": y, "epochs": FIT_EPOCHS, "seed": 1, "publish": "never"}
    return orjson.dumps(body)


def zeros_body(keys: tuple[str, ...], size: int = MEMORY_BODY_BYTES) -> bytes:
    """`{"key":[0,0,...],...}` of exactly `size` bytes, the zeros shared out between the keys."""
    skeleton = orjson.dumps({key: [] for key in keys})
    zeros = (size - len(skeleton) + len(keys)) // 2  # "0," per zero, the last of a list "0"
    parts, left = [], zeros
    for i, key in enumerate(keys):
        n = left // (len(keys) - i)
        left -= n
        parts.append(f'"{key}":[' + ("0," * n)[:-1] + "]")
    body = ("{" + ",".join(parts) + "}").encode()
    return body + b" " * (size - len(body))  # JSON allows trailing whitespace


def _median_best_worst(values: list[float]) -> dict[str, float]:
    """Of times, or of ratios to a baseline: lower is better."""
    return {"median": statistics.median(values), "best": min(values), "worst": max(values)}


# -- one client sending a heavy request back to back ----------------------------------------


class Loop(threading.Thread):
    """A client that sends one heavy request back to back until stopped, recording each."""

    def __init__(self, name: str, url: str, send: Callable[[httpx.Client], int]) -> None:
        super().__init__(name=name, daemon=True)
        self.url, self.send = url, send
        self.stopping = threading.Event()
        self.began = threading.Event()
        self.requests: list[dict[str, Any]] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=TIMEOUT) as client:
            while not self.stopping.is_set():
                self.began.set()
                start = time.perf_counter()
                outcome: int | str
                try:
                    outcome = self.send(client)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.requests.append({"seconds": time.perf_counter() - start, "status": outcome})

    def stop(self) -> dict[str, Any]:
        self.stopping.set()
        self.join(TIMEOUT)
        statuses = [r["status"] for r in self.requests]
        errors = [s for s in statuses if not (isinstance(s, int) and 200 <= s < 300)]
        seconds = [r["seconds"] for r in self.requests]
        return {
            "requests": len(self.requests),
            "errors": len(errors),
            "error_statuses": sorted({str(s) for s in errors}),
            "median_seconds": statistics.median(seconds) if seconds else float("nan"),
        }


def post_fit(body: bytes) -> Callable[[httpx.Client], int]:
    def send(client: httpx.Client) -> int:
        return client.post("/fit", content=body, headers=JSON).status_code

    return send


def read_all(path: str) -> Callable[[httpx.Client], int]:
    """GET `path`, reading the whole answer as it comes and keeping none of it."""

    def send(client: httpx.Client) -> int:
        with client.stream("GET", path) as response:
            for _ in response.iter_raw():
                pass
            return response.status_code

    return send


# -- CPU accounting: how far to trust a load run ---------------------------------------------


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICKS


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, every thread) these processes have used so far."""
    fields = [f for f in map(load.proc_stat, pids) if f is not None]
    return sum(int(f[11]) + int(f[12]) for f in fields) / TICKS


def _ours(server_pid: int) -> float:
    """This process (its threads, and wrk once waited for) and the server with its worker."""
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    return ours + _cpu(load.process_tree(server_pid))


def hammer(wrk: str | None, srv: load.Server, seconds: float) -> dict[str, Any]:
    """load.hammer on /predict, with the share of the machine other processes used meanwhile."""
    t0, busy0, ours0 = time.monotonic(), _machine_busy(), _ours(srv.pid)
    run = load.hammer(wrk, srv.url + PREDICT, seconds)
    elapsed = time.monotonic() - t0
    busy, ours = _machine_busy() - busy0, _ours(srv.pid) - ours0
    run["others_cpu_fraction"] = max(0.0, busy - ours) / (elapsed * (os.cpu_count() or 1))
    return run


def hammer_beside(
    wrk: str | None, srv: load.Server, seconds: float, loops: list[Loop]
) -> dict[str, Any]:
    """/predict loaded while the loops send their heavy requests; each loop's record beside."""
    for loop in loops:
        loop.start()
    for loop in loops:
        if not loop.began.wait(60):
            raise RuntimeError(f"{loop.name} did not start")
    run = hammer(wrk, srv, seconds)
    run["heavy"] = {loop.name: loop.stop() for loop in loops}
    _wait_no_jobs(srv.url)  # the next run starts on a server with no fit left to run
    return run


def _wait_no_jobs(url: str, deadline: float = 120.0) -> None:
    end = time.monotonic() + deadline
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        while time.monotonic() < end:
            jobs = client.get("/jobs", params={"limit": 100}).json()["jobs"]
            if all(job["status"] not in ("queued", "running") for job in jobs):
                return
            time.sleep(0.05)
    raise RuntimeError(f"fits still queued or running after {deadline} s")


# -- the figures --------------------------------------------------------------------------------


def accept_cost(client: httpx.Client, pid: int, body: bytes, rounds: int) -> dict[str, Any]:
    """POST /fit of a pre-encoded 1,000,000-sample body until its 202, against orjson.loads of
    the same body in this process, one after the other in each round; and the CPU time that
    the server (pid) and its child processes used meanwhile: a busy machine moves it less."""
    posts, cpu, cpu_server, loads = [], [], [], []
    for _ in range(rounds):
        tree = load.process_tree(pid)
        before, before_server, start = _cpu(tree), _cpu([pid]), time.perf_counter()
        response = client.post("/fit", content=body, headers=JSON)
        posts.append(time.perf_counter() - start)
        cpu_server.append(_cpu([pid]) - before_server)
        cpu.append(_cpu(tree) + _cpu([p for p in load.process_tree(pid) if p not in tree]) - before)
        if response.status_code != 202:
            raise RuntimeError(f"POST /fit answered {response.status_code}: {response.text[:500]}")
        # the fit runs alone, so that the worker's share of the body is not on the next round
        serving.wait_job(client, response.json()["id"])
        start = time.perf_counter()
        orjson.loads(body)
        loads.append(time.perf_counter() - start)
    ratios = [p / q for p, q in zip(posts, loads, strict=True)]
    return {
        "body_bytes": len(body),
        "samples": FIT_SAMPLES,
        "post_seconds": _median_best_worst(posts),
        "server_cpu_seconds": _median_best_worst(cpu),  # with its child processes
        "server_process_cpu_seconds": _median_best_worst(cpu_server),
        "orjson_loads_seconds": _median_best_worst(loads),
        "ratios": ratios,
        "ratio": _median_best_worst(ratios),
        "ratio_of_best": min(posts) / min(loads),
    }


def full_history(client: httpx.Client, job_id: str, rounds: int) -> dict[str, Any]:
    """GET /history of every epoch, streamed: time to the first byte of the body and to the last;
    then orjson.dumps of the same columns, built from that answer."""
    path = f"/history?job_id={job_id}&max_points={HISTORY_EPOCHS}"
    headers, first, last, dumps, size = [], [], [], [], 0
    for _ in range(rounds):
        chunks: list[bytes] = []
        start = time.perf_counter()
        with client.stream("GET", path) as response:
            headers.append(time.perf_counter() - start)
            response.raise_for_status()
            for chunk in response.iter_raw():
                if not chunks:
                    first.append(time.perf_counter() - start)
                chunks.append(chunk)
            last.append(time.perf_counter() - start)
            encoding = response.headers.get("content-encoding")
        if encoding:
            raise RuntimeError(f"/history came {encoding}-encoded: its JSON is not comparable")
        body = b"".join(chunks)
        size = len(body)
        answer = orjson.loads(body)
        if answer["count"] != HISTORY_EPOCHS:
            raise RuntimeError(f"/history gave {answer['count']} epochs, not {HISTORY_EPOCHS}")
        start = time.perf_counter()
        orjson.dumps(answer)  # the same keys and columns: epoch ints, w and loss floats
        dumps.append(time.perf_counter() - start)
    ratios = [x / y for x, y in zip(last, dumps, strict=True)]
    return {
        "epochs": HISTORY_EPOCHS,
        "bytes": size,
        "headers_seconds": _median_best_worst(headers),
        "first_byte_seconds": _median_best_worst(first),
        "last_byte_seconds": _median_best_worst(last),
        "orjson_dumps_seconds": _median_best_worst(dumps),
        "ratios": ratios,
        "ratio": _median_best_worst(ratios),
        "ratio_of_best": min(last) / min(dumps),
    }


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (its peak RSS) of a process, in bytes; zeros once it is gone."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key = line.split(":", 1)[0]
        if key in out:
            out[key] = int(line.split()[1]) * 1024
    return out


def _reset_peak(pid: int) -> bool:
    """Set a process's VmHWM to its RSS now (Linux's clear_refs 5), so that the peak read
    afterwards is the body's, not one of start-up; False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def body_memory(
    log_dir: Path, env: dict[str, str], path: str, body: bytes, token: bool
) -> dict[str, Any]:
    """A fresh server's peak RSS over its RSS before, for one POST of `body` (no token sent).

    The server process's own figure, and the sum of its child processes' (a helper that parses
    bodies, the training worker): each one's peak over its RSS before, the peaks reset just
    before, a process started meanwhile counting its whole peak. The sum is an upper bound: the
    peaks need not coincide.
    """
    name = f"{path.strip('/')}{'-token' if token else ''}"
    (log_dir / name).mkdir()
    srv = load.start_service(log_dir / name, {**env, **({"SGD_API_TOKEN": TOKEN} if token else {})})
    try:
        # a served model, so that /predict answers what the body deserves, not "no model yet"
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            serving.wait_job(client, _submit_tutorial(client))
        time.sleep(0.5)  # let start-up's garbage go
        reset = all(_reset_peak(pid) for pid in load.process_tree(srv.pid))
        before = {pid: _memory(pid) for pid in load.process_tree(srv.pid)}
        start = time.perf_counter()
        outcome: int | str
        try:
            response = httpx.post(srv.url + path, content=body, headers=JSON, timeout=TIMEOUT)
            outcome = response.status_code
        except httpx.HTTPError as exc:  # an answer before the whole body was read may end here
            outcome = type(exc).__name__
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # anything the server still does with the body
        after = {pid: _memory(pid) for pid in {*before, *load.process_tree(srv.pid)}}
    finally:
        srv.stop()
    growth = {
        pid: max(0, peak["VmHWM"] - before.get(pid, {"VmRSS": 0})["VmRSS"])
        for pid, peak in after.items()
    }
    server = growth.pop(srv.pid)
    children = sum(growth.values())
    return {
        "path": path,
        "token_set": token,
        "body_bytes": len(body),
        "status": outcome,
        "answer_seconds": seconds,
        "rss_before_bytes": before[srv.pid]["VmRSS"],
        "hwm_before_bytes": before[srv.pid]["VmHWM"],
        "hwm_after_bytes": after[srv.pid]["VmHWM"],
        "peaks_reset_before": reset,
        "server_peak_growth_bytes": server,
        "children_peak_growth_bytes": children,
        "children": len(growth),
        "peak_growth_bytes": server + children,
        "peak_growth_ratio": (server + children) / len(body),
    }


def _submit_tutorial(client: httpx.Client) -> str:
    headers = {"authorization": f"Bearer {TOKEN}"}
    body = {**serving.TUTORIAL, "epochs": 100, "seed": 1}
    response = client.post("/fit", json=body, headers=headers)
    response.raise_for_status()
    job_id: str = response.json()["id"]
    return job_id


def load_rounds(
    wrk: str | None,
    srv: load.Server,
    fit: bytes,
    job_id: str,
    log: Callable[[str], None],
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """Back to back in each round: /predict idle, beside the heavy clients, beside the plots."""
    load.hammer(wrk, srv.url + PREDICT, 2)  # warm: the first connections, caches
    history = f"/history?job_id={job_id}&max_points={HISTORY_EPOCHS}"
    plot = f"/history/plot?job_id={job_id}"
    runs: dict[str, list[dict[str, Any]]] = {"idle": [], "heavy": [], "plot": []}
    for r in range(rounds):
        log(f"heavy: load round {r + 1}/{rounds}")
        runs["idle"].append(hammer(wrk, srv, seconds))
        heavy = [
            Loop("fit-poster", srv.url, post_fit(fit)),
            Loop("history", srv.url, read_all(history)),
        ]
        runs["heavy"].append(hammer_beside(wrk, srv, seconds, heavy))
        plots = [Loop(f"plot-{i + 1}", srv.url, read_all(plot)) for i in range(PLOT_CLIENTS)]
        runs["plot"].append(hammer_beside(wrk, srv, seconds, plots))
    out: dict[str, Any] = {
        "seconds_per_run": seconds,
        "connections": load.CONNECTIONS,
        "runs": runs,
    }
    idle_p99 = [run["p99_ms"] for run in runs["idle"]]
    out["idle_p99_ms"] = _median_best_worst(idle_p99)
    for key in ("heavy", "plot"):
        p99 = [run["p99_ms"] for run in runs[key]]
        ratios = [x / y for x, y in zip(p99, idle_p99, strict=True)]
        clients: dict[str, dict[str, Any]] = {}
        for run in runs[key]:
            for name, record in run["heavy"].items():
                total = clients.setdefault(name, {"requests": 0, "errors": 0, "statuses": set()})
                total["requests"] += record["requests"]
                total["errors"] += record["errors"]
                total["statuses"].update(record["error_statuses"])
        out[key] = {
            "p99_ms": _median_best_worst(p99),
            "ratios": ratios,
            "ratio": _median_best_worst(ratios),
            "ratio_of_best": min(p99) / min(idle_p99),
            "wrk_failed": sum(run["failed"] for run in runs[key]),
            "clients": {
                name: {**c, "statuses": sorted(c["statuses"])} for name, c in clients.items()
            },
        }
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
    env = service_env or {}
    log("heavy: encoding a 1,000,000-sample fit ...")
    fit = fit_body()
    results: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "fit_body": {
            "samples": FIT_SAMPLES,
            "epochs": FIT_EPOCHS,
            "bytes": len(fit),
            "values": "x uniform in [0, 10], y = 2x + 1 + N(0, 1), 3 decimals; publish never",
        },
    }
    (log_dir / "load").mkdir()
    srv = load.start_service(log_dir / "load", env)
    try:
        client = httpx.Client(base_url=srv.url, timeout=TIMEOUT)
        serving.wait_job(client, serving.submit(client, 100, data=serving.TUTORIAL))
        log("heavy: a 1,000,000-epoch fit, whose history is read ...")
        job = serving.wait_job(client, serving.submit(client, HISTORY_EPOCHS, seed=7))
        log("heavy: accepting a 1,000,000-sample fit, against orjson.loads ...")
        results["accept"] = accept_cost(client, srv.pid, fit, rounds)
        log("heavy: the full history of the 1,000,000-epoch fit, against orjson.dumps ...")
        results["history"] = full_history(client, job["id"], rounds)
        client.close()
        results["load"] = load_rounds(wrk, srv, fit, job["id"], log, seconds, rounds)
    finally:
        srv.stop()
    log("heavy: peak memory of a 62.9 MiB body, a fresh server each ...")
    bodies = {"/predict": zeros_body(("hours",)), "/fit": zeros_body(("x", "y"))}
    results["memory"] = [
        body_memory(log_dir, env, path, body, token)
        for token in (False, True)
        for path, body in bodies.items()
    ]
    results["load_average_at_end"] = os.getloadavg()
    return results
