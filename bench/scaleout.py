"""Figures of Redis mode (scale-out), each against its baseline in the same run: /predict on a
Redis-mode replica against a memory-mode one, the lag before a version published through one
replica is served by another, /predict on an API-only replica while a standalone worker fits,
and the tutorial fit's turnaround in both modes.

The bench starts its own redis-server (Debian's package, installed when missing and we are
root) on a free port with its data in a temporary directory and persistence off, every replica
in a process group of its own (an embedded training worker is in its replica's group), and
stops each process by its id when done.
"""

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import load
import serving

REDIS_SERVER = "/usr/bin/redis-server"
PREDICT = "/predict?hours=4"
FIT_EPOCHS = 2_000_000
# Fits per mode for the tutorial fit's turnaround, and versions for the propagation lag.
TUTORIAL_FITS = 30
PROPAGATION_FITS = 30
# Settings every process here shares: fits of FIT_EPOCHS, and no drain pause on stop (it only
# delays the bench). Training workers keep the production priority (SGD_WORKER_NICE=19,
# SCHED_IDLE): nothing here overrides it.
COMMON_ENV = {"SGD_HOST": "127.0.0.1", "SGD_MAX_EPOCHS": str(FIT_EPOCHS), "SGD_DRAIN_SECONDS": "0"}
# Variables of the caller's environment that would change the mode of a process here.
MODE_VARIABLES = ("SGD_REDIS_URL", "SGD_REDIS_PREFIX", "SGD_WORKERS", "SGD_PORT", "SGD_HOST")

Log = Callable[[str], None]


def ensure_redis(log: Log) -> str | None:
    """redis-server's path, installing Debian's package when it is missing and we are root."""
    found = shutil.which("redis-server") or (REDIS_SERVER if os.path.exists(REDIS_SERVER) else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    log("installing redis-server from Debian's packages (apt-get) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "install", "-y", "-qq", "redis-server"],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "redis-server"],
    ):
        subprocess.run(cmd, env=env, capture_output=True, check=False, timeout=600)
        if shutil.which("redis-server"):
            break
    # The package may start a system redis on 6379; nothing here uses it (as `make redis-deps`).
    for stop in (["systemctl", "disable", "--now", "redis-server"], ["service", "redis-server"]):
        if shutil.which(stop[0]):
            cmd = stop if stop[0] == "systemctl" else [*stop, "stop"]
            subprocess.run(cmd, capture_output=True, check=False, timeout=60)
            break
    return shutil.which("redis-server")


class RedisServer:
    """A redis-server of the bench's own: a free port, a temporary directory, no persistence."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.port = load.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory)]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)
        self._prefixes = 0
        deadline = time.monotonic() + 20
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def prefix(self, name: str) -> str:
        """A fresh key namespace: an empty store of its own on this server."""
        self._prefixes += 1
        return f"bench{self._prefixes}-{name}:"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Proc:
    """A service process (`python -m service` or its `worker`) in a process group of its own."""

    proc: subprocess.Popen[bytes]
    name: str
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM (a replica stops its embedded workers, a worker hands its fit back), then
        SIGKILL to whatever of the group is left: an embedded worker never outlives the bench."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group led by the process we started


def _spawn(
    args: list[str], name: str, log_dir: Path, env: dict[str, str], port: int | None
) -> Proc:
    base = {k: v for k, v in os.environ.items() if k not in MODE_VARIABLES}
    full = {**base, **COMMON_ENV, **env}
    if port is not None:
        full["SGD_PORT"] = str(port)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        # cwd outside the repo, as load.start: a PYTHONPATH given for an experiment wins
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full,
            cwd=log_dir,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}" if port is not None else ""
    return Proc(proc, name, log_path, url)


def start_replica(log_dir: Path, name: str, env: dict[str, str]) -> Proc:
    """`python -m service` (serve), once /readyz answers 200."""
    srv = _spawn([], name, log_dir, env, load.free_port())
    try:
        deadline = time.monotonic() + 120
        while True:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {srv.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                    return srv
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready within 120 s")
            time.sleep(0.05)
    except BaseException:
        srv.stop()
        raise


def start_worker(log_dir: Path, name: str, env: dict[str, str]) -> Proc:
    """A standalone `python -m service worker`, once it says it is ready."""
    worker = _spawn(["worker"], name, log_dir, env, None)
    try:
        deadline = time.monotonic() + 120
        while "training worker ready" not in worker.log_path.read_text(errors="replace"):
            if worker.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {worker.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready within 120 s")
            time.sleep(0.05)
        return worker
    except BaseException:
        worker.stop()
        raise


# -- CPU accounting: what a run cost the replica, and how busy others kept the machine -------

TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> tuple[float, int]:
    """(utime + stime of all its threads in seconds, its process group), or (0, 0) if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0
    return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[2])


def _groups_cpu(pgids: set[int]) -> float:
    """CPU seconds used so far by the live processes of these process groups."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cpu, group = _process_cpu(int(entry))
            if group in pgids:
                total += cpu
    return total


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICKS


class Accounting:
    """Around a load run: the serving process's CPU per request (an intrinsic cost, which a
    busy machine does not move, unlike requests/s and p99) and the share of the machine that
    processes other than the bench's own used meanwhile (how far to trust the run)."""

    def __init__(self) -> None:
        self.pgids: set[int] = set()  # the groups of every process started here

    def add(self, pid: int) -> None:
        """Count a process started in a group of its own (start_new_session), with its children."""
        self.pgids.add(pid)

    def hammer(self, wrk: str | None, srv: "Proc", seconds: float) -> dict[str, Any]:
        t0, busy0, ours0 = time.monotonic(), _machine_busy(), self._ours()
        server0, _ = _process_cpu(srv.pid)
        run = load.hammer(wrk, srv.url + PREDICT, seconds)
        server1, _ = _process_cpu(srv.pid)
        elapsed, busy, ours = time.monotonic() - t0, _machine_busy() - busy0, self._ours() - ours0
        run["server_cpu_us_per_request"] = (server1 - server0) / max(1, run["requests"]) * 1e6
        run["others_cpu_fraction"] = max(0.0, busy - ours) / (elapsed * (os.cpu_count() or 1))
        return run

    def _ours(self) -> float:
        """This process (its threads, and the children it has waited for: wrk) and the groups."""
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + _groups_cpu(self.pgids)


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _fit_tutorial(client: httpx.Client, seed: int) -> dict[str, Any]:
    return serving.wait_job(client, serving.submit(client, 100, seed, serving.TUTORIAL))


def _median_best(values: list[float], higher_is_better: bool) -> dict[str, Any]:
    """The median, the best and the worst of per-round (or per-fit) figures, and all of them."""
    best, worst = (max, min) if higher_is_better else (min, max)
    return {
        "median": statistics.median(values),
        "best": best(values),
        "worst": worst(values),
        "all": values,
    }


def _pct(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank: the p99 of 30 values is their largest."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# -- 1 and 4: one replica in Redis mode against one in memory mode --------------------------


def predict_vs_memory(
    wrk: str | None, acct: Accounting, mem: Proc, red: Proc, log: Log, seconds: float, rounds: int
) -> dict[str, Any]:
    """/predict on each, back to back in every round; the order alternates by round, so a
    drift of the machine does not favour either. Both serve (and the other idles) as deployed:
    the memory replica with its worker process, the Redis replica with its store watcher and
    its embedded worker polling the queue."""
    for srv in (mem, red):
        load.hammer(wrk, srv.url + PREDICT, 2)  # warm: imports, caches, the first connections
    runs: dict[str, list[dict[str, Any]]] = {"memory": [], "redis": []}
    for r in range(rounds):
        log(f"redis: /predict, Redis vs memory mode, round {r + 1}/{rounds}")
        order = [("memory", mem), ("redis", red)]
        for mode, srv in order if r % 2 == 0 else order[::-1]:
            runs[mode].append(acct.hammer(wrk, srv, seconds))
    rps = [x["rps"] / y["rps"] for x, y in zip(runs["redis"], runs["memory"], strict=True)]
    p99 = [x["p99_ms"] / y["p99_ms"] for x, y in zip(runs["redis"], runs["memory"], strict=True)]
    return {
        "seconds_per_run": seconds,
        "connections": load.CONNECTIONS,
        "runs": runs,
        "rps": {m: _median_best([x["rps"] for x in runs[m]], higher_is_better=True) for m in runs},
        "p99_ms": {
            m: _median_best([x["p99_ms"] for x in runs[m]], higher_is_better=False) for m in runs
        },
        "rps_ratio": _median_best(rps, higher_is_better=True),
        "p99_ratio": _median_best(p99, higher_is_better=False),
        "failed_requests": sum(x["failed"] for group in runs.values() for x in group),
        "server_cpu_us_per_request": {
            m: _median_best(
                [x["server_cpu_us_per_request"] for x in runs[m]], higher_is_better=False
            )
            for m in runs
        },
    }


def tutorial_turnaround(mem: Proc, red: Proc, log: Log, fits: int) -> dict[str, Any]:
    """The tutorial fit from `POST /fit` until `GET /jobs/{id}` reads succeeded, polled with no
    pause, on each replica in turn. The job's own stamps split it: queued (created_at to
    started_at: in Redis mode, until a worker's poll of the queue picks it up) and run."""
    log(f"redis: {fits} tutorial fits in each mode ...")
    out: dict[str, dict[str, list[float]]] = {}
    for mode in ("memory", "redis"):
        out[mode] = {"seconds": [], "queued_seconds": [], "stamped_seconds": []}
    clients = {
        "memory": httpx.Client(base_url=mem.url, timeout=serving.TIMEOUT),
        "redis": httpx.Client(base_url=red.url, timeout=serving.TIMEOUT),
    }
    try:
        for client in clients.values():
            _fit_tutorial(client, 1)  # warm
        for i in range(fits):
            for mode, client in clients.items():
                # a fit that finds the service idle: a Redis-mode worker's poll of the queue has
                # backed off by now (Dramatiq: 5, 10, 20, ... ms between polls, at most 100)
                time.sleep(0.2)
                start = time.perf_counter()
                response = client.post("/fit", json={**serving.TUTORIAL, "epochs": 100, "seed": i})
                response.raise_for_status()
                job_id = response.json()["id"]
                while True:
                    job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
                    if job["status"] in ("succeeded", "failed", "cancelled"):
                        break
                elapsed = time.perf_counter() - start
                if job["status"] != "succeeded":
                    raise RuntimeError(f"tutorial fit {job_id} ended {job['status']}")
                created, ended = _seconds(job["created_at"]), _seconds(job["finished_at"])
                out[mode]["seconds"].append(elapsed)
                out[mode]["queued_seconds"].append(_seconds(job["started_at"]) - created)
                out[mode]["stamped_seconds"].append(ended - created)
    finally:
        for client in clients.values():
            client.close()
    return {
        mode: {key: _median_best(values, higher_is_better=False) for key, values in figures.items()}
        for mode, figures in out.items()
    }


# -- 2: a version published through replica 1, served by replica 2 --------------------------


class VersionPoller(threading.Thread):
    """GET /predict on a replica in a tight loop (one keep-alive connection), noting for each
    model version it sees the send time of the last request answered with an older version and
    the receive time of the first one answered with it: the replica began serving that version
    between the two (wall clock, the clock the worker stamps `finished_at` with)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="version-poller", daemon=True)
        self.client = httpx.Client(base_url=url, timeout=serving.TIMEOUT)
        self.stopping = threading.Event()
        self.changed = threading.Condition()
        self.seen: dict[int, tuple[float, float]] = {}  # version -> (last older sent, received)
        self.version = -1
        self.requests = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        previous_sent = time.time()
        try:
            while not self.stopping.is_set():
                sent = time.time()
                response = self.client.get(PREDICT)
                received = time.time()
                self.requests += 1
                version = response.json()["model_version"] if response.status_code == 200 else 0
                if version != self.version:
                    with self.changed:
                        if self.version >= 0:
                            self.seen[version] = (previous_sent, received)
                        self.version = version
                        self.changed.notify_all()
                previous_sent = sent
        except BaseException as exc:  # reported by wait_for
            self.error = exc
            with self.changed:
                self.changed.notify_all()

    def wait_for(self, version: int, timeout: float) -> tuple[float, float]:
        with self.changed:
            if not self.changed.wait_for(
                lambda: version in self.seen or self.error is not None, timeout
            ):
                raise RuntimeError(f"replica 2 did not serve version {version} in {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"the poller failed: {self.error!r}")
        return self.seen[version]

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        self.client.close()


def propagation(one: Proc, two: Proc, log: Log, fits: int) -> dict[str, Any]:
    """Lag from publication (the job's `finished_at`, stamped by the worker just before its
    Redis transaction publishes the version) until replica 2 answers /predict with it. The
    upper bound (the receive time of replica 2's first answer with the version) is the figure;
    the lower bound (the send time of its last answer with the older one) shows the poll's
    resolution. The fits go through replica 1, whose embedded worker runs them; this thread
    blocks meanwhile, so that the poller has the bench's GIL to itself."""
    log(f"redis: version propagation over {fits} fits ...")
    poller = VersionPoller(two.url)
    client = httpx.Client(base_url=one.url, timeout=serving.TIMEOUT)
    upper: list[float] = []
    lower: list[float] = []
    try:
        _fit_tutorial(client, 0)  # warm: the first version, and both replicas' paths
        poller.start()
        for i in range(fits):
            # replica 2 serves every earlier version by now (waited for below): this fit's is next
            with poller.changed:
                if not poller.changed.wait_for(lambda: poller.version > 0, 10):
                    raise RuntimeError("replica 2 serves no model")
                expected = poller.version + 1
            job_id = serving.submit(client, 100, 1000 + i, serving.TUTORIAL)
            sent, received = poller.wait_for(expected, 30)
            job = serving.wait_job(client, job_id)
            if job["result"]["model_version"] != expected:
                raise RuntimeError(f"job {job_id} published {job['result']} not {expected}")
            published = _seconds(job["finished_at"])
            upper.append(received - published)
            lower.append(max(0.0, sent - published))
            time.sleep(0.05)
    finally:
        poller.stop()
        client.close()
    return {
        "fits": fits,
        "poller_requests": poller.requests,
        "lag_seconds": upper,
        "lag_lower_bound_seconds": lower,
        "p50": statistics.median(upper),
        "p99": _pct(upper, 0.99),
        "max": max(upper),
        "best": min(upper),
        "p50_lower_bound": statistics.median(lower),
    }


# -- 3: an API-only replica while a standalone worker fits ----------------------------------


# A busy loop at the training worker's priority (niceness 19, SCHED_IDLE): what any background
# CPU work costs /predict on this machine, however low its priority. The floor for the row below.
SPIN = (
    "import os\n"
    "os.setpriority(os.PRIO_PROCESS, 0, 19)\n"
    "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "while True:\n"
    "    pass\n"
)


@contextlib.contextmanager
def spinning(acct: "Accounting") -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", SPIN], start_new_session=True)
    acct.add(proc.pid)  # the bench's own load, not others'
    try:
        time.sleep(0.2)  # started and lowered
        yield
    finally:
        proc.kill()
        proc.wait(10)


def predict_beside_worker(
    wrk: str | None, acct: Accounting, api: Proc, log: Log, seconds: float, rounds: int
) -> dict[str, Any]:
    """/predict on a replica with SGD_WORKERS=0, idle and then while the standalone worker
    (production priority) runs FIT_EPOCHS-epoch fits back to back, submitted through it; and,
    as the floor, beside a busy loop at the same priority."""
    load.hammer(wrk, api.url + PREDICT, 2)
    runs: dict[str, list[dict[str, Any]]] = {"idle": [], "spinning": [], "fitting": []}
    fits: list[dict[str, Any]] = []
    for r in range(rounds):
        log(f"redis: /predict beside a standalone worker, round {r + 1}/{rounds}")
        runs["idle"].append(acct.hammer(wrk, api, seconds))
        with spinning(acct):
            runs["spinning"].append(acct.hammer(wrk, api, seconds))
        feeder = serving.FitFeeder(api.url, FIT_EPOCHS)
        feeder.start()
        if not feeder.running.wait(120):
            raise RuntimeError("no fit started on the standalone worker")
        window_start = time.time()
        runs["fitting"].append(acct.hammer(wrk, api, seconds))
        window_end = time.time()
        jobs = feeder.stop()
        busy = sum(serving._overlap(job, window_start, window_end) for job in jobs)
        runs["fitting"][-1]["fit_busy_fraction"] = busy / (window_end - window_start)
        runs["fitting"][-1]["fits"] = len(jobs)
        fits.extend(jobs)
    idle = runs["idle"]
    ratio = [x["p99_ms"] / y["p99_ms"] for x, y in zip(runs["fitting"], idle, strict=True)]
    floor = [x["p99_ms"] / y["p99_ms"] for x, y in zip(runs["spinning"], idle, strict=True)]
    rps = [x["rps"] / y["rps"] for x, y in zip(runs["fitting"], runs["idle"], strict=True)]
    return {
        "seconds_per_run": seconds,
        "runs": runs,
        "p99_ms": {
            m: _median_best([x["p99_ms"] for x in runs[m]], higher_is_better=False) for m in runs
        },
        "p99_ratio": _median_best(ratio, higher_is_better=False),
        "p99_ratio_spinning": _median_best(floor, higher_is_better=False),
        "rps_ratio": _median_best(rps, higher_is_better=True),
        "failed_requests": sum(x["failed"] for group in runs.values() for x in group),
        "fit_busy_fraction": statistics.median(x["fit_busy_fraction"] for x in runs["fitting"]),
        "fits": len(fits),
        "fit_seconds": statistics.median(serving.fit_seconds(j) for j in fits) if fits else 0.0,
        "server_cpu_us_per_request": {
            m: _median_best(
                [x["server_cpu_us_per_request"] for x in runs[m]], higher_is_better=False
            )
            for m in runs
        },
    }


# -- all of it ------------------------------------------------------------------------------


def run_all(
    log: Log,
    wrk: str | None,
    log_dir: Path,
    seconds: float,
    rounds: int,
    service_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    binary = ensure_redis(log)
    if binary is None:
        raise RuntimeError("redis-server is missing and cannot be installed (apt-get, as root)")
    extra = service_env or {}
    redis_dir = log_dir / "redis"
    redis_dir.mkdir()
    redis = RedisServer(binary, redis_dir)
    started: list[Proc] = []
    acct = Accounting()
    acct.add(redis.proc.pid)

    def replica(name: str, **env: str) -> Proc:
        srv = start_replica(log_dir, name, {**extra, **env})
        started.append(srv)
        acct.add(srv.pid)
        return srv

    def on_redis(name: str, workers: int) -> dict[str, str]:
        prefix = redis.prefix(name)
        return {"SGD_REDIS_URL": redis.url, "SGD_REDIS_PREFIX": prefix, "SGD_WORKERS": str(workers)}

    def stop_all() -> None:
        while started:
            started.pop().stop()

    results: dict[str, Any] = {"redis_server": subprocess.getoutput(f"{binary} --version")}
    try:
        log("redis: a memory-mode replica and a Redis-mode one (1 embedded worker) ...")
        mem = replica("memory")
        red = replica("redis", **on_redis("single", 1))
        for srv in (mem, red):
            with httpx.Client(base_url=srv.url, timeout=serving.TIMEOUT) as client:
                _fit_tutorial(client, 0)  # a model to serve
        results["predict"] = predict_vs_memory(wrk, acct, mem, red, log, seconds, rounds)
        results["tutorial_fit"] = tutorial_turnaround(mem, red, log, TUTORIAL_FITS)
        stop_all()

        log("redis: replica 1 (1 embedded worker) and replica 2 (SGD_WORKERS=0) ...")
        shared = on_redis("pair", 1)
        one = replica("replica1", **shared)
        two = replica("replica2", **{**shared, "SGD_WORKERS": "0"})
        results["propagation"] = propagation(one, two, log, PROPAGATION_FITS)
        stop_all()

        log("redis: an API-only replica and a standalone worker ...")
        alone = on_redis("standalone", 0)
        api = replica("api", **alone)
        worker = start_worker(log_dir, "worker", {**extra, **alone})
        started.append(worker)
        acct.add(worker.pid)
        with httpx.Client(base_url=api.url, timeout=serving.TIMEOUT) as client:
            _fit_tutorial(client, 0)
        results["beside_worker"] = predict_beside_worker(wrk, acct, api, log, seconds, rounds)
        stop_all()
        runs = [*results["predict"]["runs"].values(), *results["beside_worker"]["runs"].values()]
        others = [run["others_cpu_fraction"] for group in runs for run in group]
        results["others_cpu_fraction"] = {"median": statistics.median(others), "max": max(others)}
    finally:
        stop_all()
        redis.stop()
    return results
