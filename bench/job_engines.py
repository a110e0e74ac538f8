"""RQ 3.0 against Dramatiq 2.2 as the fit job queue, on a private redis-server.

    .venv/bin/python -m bench.job_engines [--runs 20]

Each library gets the same task body (fit_task): one fit with the service's engine, a cancel
check (a Redis key) between blocks, a start and an end entry in Redis with wall-clock times.
Workers are subprocesses that import torch and prepare the engine once, as service/runner/worker.py
does, so they can be killed with SIGKILL. Recovery uses only each library's own mechanisms,
tuned by the knobs below (the numbers come from reading their worker and broker sources):

- RQ: a forking Worker sees its work horse die (wait4) and retries the job at once if it was
  enqueued with Retry. A job whose main worker died is "abandoned": StartedJobRegistry.cleanup,
  run by a live worker's maintenance, requeues it (Retry again) once its execution entry
  expires; the entry's TTL is get_heartbeat_ttl(), hard-coded as interval + 60 s (SimpleWorker:
  job timeout + 60 s, it cannot heartbeat while it runs the job), so we override it.
- Dramatiq: each broker call heartbeats the worker; maintenance (maintenance_chance per
  million calls) requeues the unacked messages of workers silent for heartbeat_timeout ms.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "bench"
TUTORIAL_EPOCHS, LONG_EPOCHS = 100, 30_000_000  # long: ~5 s, one idle core
IDLE_SECONDS = 1.0  # between latency runs: the worker is idle when a job arrives
# RQ: maintenance (registry cleanup) every second; BLMOVE wakes up every worker_ttl-15 = 1 s
# for it; the horse monitor heartbeats every second; an execution is abandoned 2 s after its
# last heartbeat; SimpleWorker jobs get a 20 s timeout, the floor of their abandonment time.
RQ_WORKER: dict[str, Any] = {"job_monitoring_interval": 1, "maintenance_interval": 1}
RQ_WORKER_TTL, RQ_SLACK, RQ_SIMPLE_TIMEOUT = 16, 2, 20
# Dramatiq: maintenance on every broker call; a worker is dead after 3 s without one.
DRAMATIQ_BROKER: dict[str, Any] = {"heartbeat_timeout": 3000, "maintenance_chance": 1_000_000}
DEADLINE = [time.monotonic() + 15 * 60]  # overall; main() resets it

_clients: dict[int, redis.Redis] = {}


def _client(port: int) -> redis.Redis:
    if port not in _clients:
        _clients[port] = redis.Redis(port=port, decode_responses=True)
    return _clients[port]


def fit_task(job_id: str, epochs: int, port: int) -> str:
    """The task both libraries run: the fit, a cooperative cancel between blocks."""
    from service.core import engine as training

    r = _client(port)
    r.rpush(f"bench:started:{job_id}", f"{time.time()} {os.getpid()}")
    x, y = training.as_tensor([1.0, 2.0, 3.0]), training.as_tensor([2.0, 4.0, 6.0])
    outcome = "done"
    for _ in training.train(x, y, training.FitParams(epochs, 0.01, 1.0, 1, False, seed=42)):
        if r.exists(f"bench:cancel:{job_id}"):
            outcome = "cancelled"
            break
    r.rpush(f"bench:end:{job_id}", f"{time.time()} {outcome}")
    return outcome


def _dramatiq_actor(port: int) -> Any:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(port=port, **DRAMATIQ_BROKER)  # type: ignore[no-untyped-call]
    dramatiq.set_broker(broker)
    return dramatiq.actor(actor_name="fit", queue_name=QUEUE, max_retries=0)(fit_task)


def worker_main(lib: str, mode: str, port: int) -> None:
    """A worker process: torch and the engine once, then the library's worker loop."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if lib == "dramatiq":
        import dramatiq

        actor = _dramatiq_actor(port)
        dramatiq.Worker(actor.broker, worker_threads=1, worker_timeout=int(mode)).start()
        while True:
            time.sleep(3600)
    from rq import SimpleWorker, Worker
    from rq.job import Job

    class FastWorker(Worker):  # the horse monitor heartbeats every job_monitoring_interval
        def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
            return int(self.job_monitoring_interval) + RQ_SLACK

    class FastSimpleWorker(SimpleWorker):  # no heartbeat while the job runs
        def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
            return int(job.timeout or RQ_SIMPLE_TIMEOUT) + RQ_SLACK

    cls = FastSimpleWorker if mode == "simple" else FastWorker
    conn = redis.Redis(port=port)
    cls([QUEUE], connection=conn, worker_ttl=RQ_WORKER_TTL, **RQ_WORKER).work(
        logging_level="WARNING"
    )


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    end = min(time.monotonic() + timeout, DEADLINE[0])
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    if time.monotonic() >= DEADLINE[0]:
        raise TimeoutError("overall deadline reached")
    return False


class Bench:
    """One library against one redis-server: spawns workers, enqueues fits, reads the marks."""

    def __init__(self, lib: str, port: int, logs: Path) -> None:
        self.lib, self.port, self.logs, self.seq = lib, port, logs, 0
        self.r = _client(port)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.actor = _dramatiq_actor(port) if lib == "dramatiq" else None

    def enqueue(self, epochs: int, timeout: int = 60) -> tuple[str, float]:
        from rq import Queue, Retry

        self.seq += 1
        job_id, now = f"{self.lib}-{self.seq}", time.time()
        if self.actor is not None:
            self.actor.send(job_id, epochs, self.port)
        else:
            Queue(QUEUE, connection=redis.Redis(port=self.port)).enqueue(
                "bench.job_engines.fit_task", job_id, epochs, self.port, job_id=job_id,
                job_timeout=timeout, retry=Retry(max=2), result_ttl=600,
            )  # fmt: skip
        return job_id, now

    def marks(self, kind: str, job_id: str) -> list[list[str]]:
        return [str(e).split() for e in self.r.lrange(f"bench:{kind}:{job_id}", 0, -1)]

    def run(self, epochs: int) -> tuple[float, float]:
        """Enqueue a fit and wait for it: (enqueue to start, enqueue to end) in seconds."""
        return self.finish(*self.enqueue(epochs), timeout=60)

    def finish(self, job_id: str, t: float, timeout: float) -> tuple[float, float]:
        """Wait for a job to end: (start, end) in seconds since t."""
        if not wait_for(lambda: bool(self.marks("end", job_id)), timeout):
            raise TimeoutError(f"{job_id} did not end; see the logs in {self.logs}")
        return float(self.marks("started", job_id)[0][0]) - t, float(
            self.marks("end", job_id)[0][0]
        ) - t

    def spawn(self, mode: str) -> subprocess.Popen[bytes]:
        code = f"import bench.job_engines as b; b.worker_main({self.lib!r}, {mode!r}, {self.port})"
        with (self.logs / f"{self.lib}-{mode}-{len(self.workers)}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=log)
        self.workers.append(proc)
        return proc

    def start_worker(self, mode: str) -> tuple[subprocess.Popen[bytes], float]:
        """A worker and its start-up time: from spawn to the start of a job waiting for it."""
        job_id, t = self.enqueue(TUTORIAL_EPOCHS)
        proc = self.spawn(mode)
        return proc, self.finish(job_id, t, timeout=90)[0]

    def kill(self, pid: int) -> None:
        """SIGKILL a process of ours: a worker or a horse, whose command line names our port."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"bench.job_engines" in cmdline and str(self.port).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for key in self.r.scan_iter("bench:started:*"):  # orphaned RQ horses
            for entry in self.r.lrange(key, 0, -1):
                self.kill(int(entry.split()[1]))
        self.workers.clear()
        self.r.flushall()

    def latency(self, mode: str, runs: int) -> tuple[list[float], list[float]]:
        self.start_worker(mode)
        starts, ends = [], []
        for _ in range(runs):
            time.sleep(IDLE_SECONDS)
            start, end = self.run(TUTORIAL_EPOCHS)
            starts.append(start)
            ends.append(end)
        self.stop_all()
        return starts, ends

    def long_and_cancel(self, mode: str) -> tuple[float, float]:
        """A long fit's enqueue to done; then the time from a cancel flag to a fit's end."""
        self.start_worker(mode)
        _, long_fit = self.run(LONG_EPOCHS)
        job_id, _ = self.enqueue(LONG_EPOCHS)
        wait_for(lambda: bool(self.marks("started", job_id)), 30)
        time.sleep(1.0)
        t = time.time()
        self.r.set(f"bench:cancel:{job_id}", 1)
        if not wait_for(lambda: bool(self.marks("end", job_id)), 30):
            raise TimeoutError("the cancelled fit did not end")
        end = self.marks("end", job_id)[0]
        assert end[1] == "cancelled", end
        self.stop_all()
        return long_fit, float(end[0]) - t

    def recovery(self, mode: str, target: str) -> str:
        """kill -9 `target` ("horse", "main", or "all": main and horse) one second into a long
        fit, start a new worker unless the main worker lives; times from the kill, and runs."""
        proc, _ = self.start_worker(mode)
        timeout = RQ_SIMPLE_TIMEOUT if mode == "simple" else 60
        job_id, _ = self.enqueue(LONG_EPOCHS, timeout)
        wait_for(lambda: bool(self.marks("started", job_id)), 30)
        time.sleep(1.0)
        runner = int(self.marks("started", job_id)[0][1])
        t = time.time()
        if target in ("main", "all"):
            self.kill(proc.pid)
        if target in ("horse", "all"):
            self.kill(runner)
        if target != "horse":
            self.spawn(mode)
        state: list[float] = []

        killed = 0 if target == "main" else 1  # runs that cannot end

        def settled() -> bool:  # every other run has ended, and nothing has changed for 3 s
            now = [len(self.marks("started", job_id)), len(self.marks("end", job_id))]
            if now != state[:2]:
                state[:] = [*now, time.monotonic()]
            return 0 < now[1] >= now[0] - killed and time.monotonic() - state[2] > 3

        wait_for(settled, 60)
        starts, ends = self.marks("started", job_id), self.marks("end", job_id)
        self.stop_all()
        again = f"{float(starts[1][0]) - t:.1f}" if len(starts) > 1 else "never"
        done = [float(e[0]) - t for e in ends if e[1] == "done"]
        return f"again {again} / done {min(done):.1f} ({len(starts)} runs, {len(done)} completed)"


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    args = ["--save", "", "--appendonly", "no", "--port", str(port), "--dir", str(tmp)]
    with (tmp / "redis.log").open("wb") as log:
        proc = subprocess.Popen(["/usr/bin/redis-server", *args], stdout=log, stderr=log)

    def up() -> bool:
        try:
            return bool(_client(port).ping())
        except redis.ConnectionError:
            return False

    if not wait_for(up, 10):
        raise RuntimeError("redis-server did not start")
    return proc, port


def ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f} / {1000 * min(values):.0f}"


def measure(lib: str, port: int, logs: Path, runs: int) -> dict[str, str]:
    bench = Bench(lib, port, logs)
    default, tuned = ("fork", "simple") if lib == "rq" else ("1000", "100")
    out: dict[str, str] = {}
    try:
        proc, startup = bench.start_worker(default)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        out["worker start-up until it takes a job (s)"] = f"{startup:.2f}"
        out["worker RSS, torch + engine prepared (MB)"] = f"{rss / 1024:.0f}"
        bench.stop_all()
        for name, mode in (("default", default), ("tuned", tuned)):
            starts, ends = bench.latency(mode, runs)
            out[f"enqueue→start, median / best (ms), {name}"] = ms(starts)
            out[f"enqueue→done, median / best (ms), {name}"] = ms(ends)
        long_fit, cancel = bench.long_and_cancel(default)
        out["long fit alone, enqueue→done (s)"] = f"{long_fit:.1f}"
        out["cancel: flag set → fit ended (ms)"] = f"{1000 * cancel:.0f}"
        scenarios = {
            "kill -9 the whole worker, start a new one": (default, "all"),
            "kill -9 the fit's process, worker lives": ("fork", "horse"),
            "kill -9 RQ main worker only, horse lives": ("fork", "main"),
            "kill -9 RQ SimpleWorker, start a new one": ("simple", "all"),
        }
        for name, (mode, target) in list(scenarios.items())[: 4 if lib == "rq" else 1]:
            out[f"recovery (s): {name}"] = bench.recovery(mode, target)
    finally:
        bench.stop_all()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=15)
    args = parser.parse_args()
    DEADLINE[0] = time.monotonic() + 60 * args.minutes
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as name:
        tmp = Path(name)
        server, port = start_redis(tmp)
        try:
            results = {lib: measure(lib, port, tmp, args.runs) for lib in ("rq", "dramatiq")}
        except BaseException:
            for log in sorted(tmp.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        finally:
            server.kill()
            server.wait(timeout=10)
    rows = dict.fromkeys([*results["rq"], *results["dramatiq"]])
    print("| measure | RQ 3.0.0 | Dramatiq 2.2.1 |\n|---|---|---|")
    for row in rows:
        cells = [results[lib].get(row, "n/a") for lib in ("rq", "dramatiq")]
        print(f"| {row} | {cells[0]} | {cells[1]} |")
    print("\ndefault: RQ Worker (forks a horse a job), Dramatiq worker_timeout=1000 ms (its")
    print("default); tuned: RQ SimpleWorker, Dramatiq worker_timeout=100 ms. Recovery: seconds")
    print(f"from the kill to the job's next start and to its completion. {os.getloadavg()=}")


if __name__ == "__main__":
    main()
