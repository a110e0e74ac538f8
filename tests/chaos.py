"""A bounded chaos run of Redis mode: `python -m tests.chaos --minutes 3` from the project root.

The property: every fit the service answered 202 ends as promised. At least once, exactly the
fit that was asked for, findable again by its Idempotency-Key, while processes die, pause and
lose Redis under it, and predictions keep answering from memory meanwhile.

The stack, in a temporary directory: one redis-server (append-only file, `appendfsync always`),
a TCP proxy in front of it for replica A alone (tests/redis_proxy.py's RedisProxy), two
replicas with one embedded training worker each, and two standalone workers; lease 2 s, 10
attempts a job. Four client threads post fits, each under a fresh Idempotency-Key, retrying
errors, timeouts, 5xx and 429 with the same key and body until 202. About 70% are short
(0.05-0.1 s of a worker's time) with random data, seeds and sizes; the rest are long (1-3 s),
so that faults hit fits while they run and the redelivery and fencing paths get their turn:
each reuses verbatim one of 4 long bodies drawn from the run's seed, each with a seed of its
own, so that the checks recompute each distinct fit once. A prober asks every replica for
/predict every ~50 ms. A driver injects one fault every 2-5 s and waits until it has healed:
kill -9 of a replica, of a standalone or an embedded worker, SIGSTOP of a worker past its lease,
a restart or a SIGSTOP of Redis, and the proxy cutting or refusing replica A's connections.

Then, with everything healed and every accepted job ended (or 180 s passed), it checks:
- every accepted job ended `succeeded` (failed, cancelled or unfinished: lost);
- its w and b equal, bit for bit, what the engine computes here for the params the job records;
- every key still leads to its job: the same POST again answers 202 with the same id (and no
  two 202s for one key named different jobs);
- no job is left `queued` or `running`;
- no /predict failed on a replica that was up (not killed by the driver, nor within 5 s of its
  restart).
It prints a one-line summary (and the details of anything that failed), with the number of long
fits and how many accepted jobs ran more than once ("re-run N": a fault hit them running),
writes it as JSON with `--summary PATH`, and exits 1 if any check failed. Every process runs in
a process group of its own and is killed at the end whatever happens; the run ends within
`--minutes` + 3 minutes.
"""

import argparse
import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from tests.redis_proxy import RedisProxy

with warnings.catch_warnings():  # conftest imports Starlette's TestClient, which warns about httpx
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from tests.conftest import SERVER_ENV, alive, free_port, named_descendants

TIMEOUT = 10.0  # seconds, for every request a client or the prober makes
CLIENTS = 4
# The share of fits that are long (1-3 s of worker time, where the others take 0.05-0.1 s), so
# that faults hit running fits; each is one of LONG_BODIES fits drawn from the seed, so that the
# checks recompute each once.
LONG_SHARE = 0.3
LONG_BODIES = 4
PROBE_SECONDS = 0.05
# A replica's first /predict may precede its learning of the first model by the store's re-read
# interval (0.5 s): failures before that are not counted.
PROPAGATION_SECONDS = 1.0
RESTART_GRACE_SECONDS = 5.0  # a restarted replica's failures count from this long after its start
SETUP_SECONDS = 120.0
HEAL_SECONDS = 60.0
DRAIN_SECONDS = 180.0
SLACK_SECONDS = 180.0  # the whole run ends within --minutes plus this
CHECK_RESERVE_SECONDS = 45.0  # kept after the drain for the checks and the clean-up
MIN_AFTER_FAULTS_SECONDS = 100.0  # the fault phase is cut short to leave this for the rest
ENDED = ("succeeded", "failed", "cancelled")
FAULTS = (
    "replica-kill",
    "worker-kill",
    "embedded-worker-kill",
    "worker-pause",
    "redis-restart",
    "redis-hang",
    "proxy-cut",
    "proxy-refuse",
)
DESCRIPTION = "A bounded chaos run of Redis mode: every fit answered 202 ends as promised."
ROOT = Path(__file__).resolve().parent.parent
STARTED = time.monotonic()


def say(message: str) -> None:
    """One progress line, stamped with the seconds since the run started."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def wait_for(check: Callable[[], bool], until: float, every: float = 0.2) -> bool:
    """Poll `check` until it holds (True) or time.monotonic() passes `until` (False)."""
    while not check():
        if time.monotonic() >= until:
            return False
        time.sleep(every)
    return True


# -- the processes -------------------------------------------------------------------------


class Proc:
    """A process of the stack, in a process group of its own, restartable with the same command;
    each start writes a log of its own (name.N.log), so a killed run's log stays readable."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env, self.log_dir = name, args, env, log_dir
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.log_path = log_dir / f"{name}.0.log"

    def start(self) -> None:
        """Start it (again)."""
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        with open(self.log_path, "wb") as log:
            # A session of its own: a signal to the group reaches its children (fork server,
            # embedded workers), and a Ctrl-C in the terminal reaches only this harness.
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        """Started and not exited (a stopped process still runs)."""
        return self.popen is not None and self.popen.poll() is None

    def exited(self) -> int | None:
        """Its exit code if it was started and has exited."""
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: int) -> None:
        """Send `sig` to its whole process group."""
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """kill -9 its whole process group and reap it."""
        if self.popen is not None:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)


class Redis(Proc):
    """redis-server on a free port, its append-only file in `directory`: a restart keeps all."""

    def __init__(self, directory: Path, log_dir: Path) -> None:
        directory.mkdir()
        self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(directory), "--save", "", "--daemonize", "no"]
        args += ["--loglevel", "warning", "--appendonly", "yes", "--appendfsync", "always"]
        super().__init__("redis", args, dict(os.environ), log_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        """PING answers PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class Replica(Proc):
    """`python -m service` on a fixed port (a restart comes back where it was), and whether the
    prober should count its failures: not while the driver has it down, nor just after."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        env = {**env, "SGD_HOST": "127.0.0.1", "SGD_PORT": str(self.port)}
        super().__init__(name, [sys.executable, "-m", "service"], env, log_dir)
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._down = False
        self._live_from = 0.0
        self.incarnation = 0  # changes at every take_down: a request across it is excused

    def take_down(self) -> None:
        """The driver is about to kill it: its failures are excused until bring_up."""
        with self._lock:
            self._down = True
            self.incarnation += 1

    def bring_up(self) -> None:
        """It is back (or should be): failures count from 5 s after its start, once ready."""
        with self._lock:
            if self._down:
                self._down = False
                self._live_from = max(self.started_at + RESTART_GRACE_SECONDS, time.monotonic())

    def live(self) -> tuple[bool, int]:
        """(whether its failures count now, its incarnation)."""
        with self._lock:
            return not self._down and time.monotonic() >= self._live_from, self.incarnation

    def ready(self) -> bool:
        """/readyz answers 200."""
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def embedded_workers(self) -> list[int]:
        """The pids of its training workers (ps names them sgd-worker)."""
        return named_descendants(self.pid, "sgd-worker") if self.running() else []


class Worker(Proc):
    """A standalone `python -m service worker`."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, [sys.executable, "-m", "service", "worker"], env, log_dir)

    def ready(self) -> bool:
        """It runs and has logged that it takes fits."""
        try:
            return self.running() and "training worker ready" in self.log_path.read_text()
        except OSError:
            return False


class Stack:
    """Redis, the proxy in front of it for replica A, two replicas and two standalone workers,
    all on one fresh key prefix; heal() brings whatever is down back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = Redis(root / "redis", root)
        self.proxy = RedisProxy(self.redis.port)  # started in start(), after Redis
        self.prefix = f"chaos-{uuid.uuid4().hex[:12]}:"
        self.replicas: list[Replica] = []
        self.workers: list[Worker] = []
        self.unexpected_exits: list[str] = []
        self._killed = False
        self._kill_lock = threading.Lock()

    def env(self, redis_url: str) -> dict[str, str]:
        """The environment of every replica and worker."""
        return {
            **os.environ,
            **SERVER_ENV,
            "SGD_REDIS_URL": redis_url,
            "SGD_REDIS_PREFIX": self.prefix,
            "SGD_LEASE_SECONDS": "2",
            "SGD_WORKERS": "1",
            "SGD_JOB_ATTEMPTS": "10",
            "SGD_KEEP_JOBS": "100000",  # no job nor key is evicted before the checks
            "SGD_MAX_QUEUED_JOBS": "1000",
        }

    def start(self, until: float) -> None:
        """Start everything and wait until all of it is ready."""
        self.redis.start()
        if not wait_for(self.redis.answers, until):
            raise RuntimeError(f"redis-server did not start: see {self.redis.log_path}")
        self.proxy.start()
        say(f"redis on :{self.redis.port}; replica A's proxy to it on :{self.proxy.port}")
        self.replicas = [
            Replica("replica-a", self.env(self.proxy.url), self.root),
            Replica("replica-b", self.env(self.redis.url), self.root),
        ]
        self.workers = [Worker(f"worker-{i}", self.env(self.redis.url), self.root) for i in (1, 2)]
        for proc in [*self.replicas, *self.workers]:
            proc.start()
        if not wait_for(self.healthy, until, 0.5):
            raise RuntimeError(f"the stack did not start: {self.what_is_wrong()}")

    def healthy(self) -> bool:
        """Redis answers; every replica is ready with a live embedded worker; every standalone
        worker has said it is ready. Restarts (and records) anything that exited by itself."""
        self._restart_exited()
        return (
            self.redis.answers()
            and all(r.ready() and r.embedded_workers() for r in self.replicas)
            and all(w.ready() for w in self.workers)
        )

    def what_is_wrong(self) -> str:
        """The parts that are not healthy, for a message."""
        wrong = [] if self.redis.answers() else ["redis does not answer"]
        wrong += [f"{r.name} not ready" for r in self.replicas if not r.ready()]
        wrong += [f"{r.name} has no worker" for r in self.replicas if not r.embedded_workers()]
        wrong += [f"{w.name} not ready" for w in self.workers if not w.ready()]
        return ", ".join(wrong) or "nothing"

    def _restart_exited(self) -> None:
        """A process that exited without the driver killing it is a finding: record, restart."""
        for proc in [self.redis, *self.replicas, *self.workers]:
            code = proc.exited()
            if code is not None and not self._killed:
                self.unexpected_exits.append(f"{proc.name} exited with {code} ({proc.log_path})")
                say(f"UNEXPECTED: {self.unexpected_exits[-1]}; restarting it")
                proc.start()

    def heal(self, until: float) -> str | None:
        """Bring everything back and wait until healthy; None, or what is still wrong at `until`."""
        self.redis.signal(signal.SIGCONT)
        self.proxy.refuse(False)
        ok = wait_for(self.healthy, until)
        for r in self.replicas:
            r.bring_up()  # not ready in time: its failures count from now on, truthfully
        return None if ok else self.what_is_wrong()

    def kill_all(self) -> None:
        """kill -9 every process group this run started; close the proxy. Safe to call twice."""
        with self._kill_lock:
            self._killed = True
            with contextlib.suppress(Exception):
                self.proxy.close()
            for proc in [*self.replicas, *self.workers, self.redis]:
                proc.kill()


# -- the clients ---------------------------------------------------------------------------


@dataclass
class Fit:
    """One fit a client asked for, under one Idempotency-Key."""

    key: str
    body: dict[str, Any]
    ids: list[str] = field(default_factory=list)  # the job id of every 202 for this key
    params: dict[str, Any] | None = None  # the resolved params of the first 202
    refused: str | None = None  # a 4xx other than 429: not worth a retry, and a finding
    long: bool = False  # one of the long bodies

    @property
    def job_id(self) -> str | None:
        return self.ids[0] if self.ids else None


def fit_body(rng: random.Random) -> dict[str, Any]:
    """A small random fit: 3-50 points of y = 2x + noise, 20,000-200,000 epochs of batch 1."""
    n = rng.randint(3, 50)
    xs = [round(rng.uniform(0.5, 5.0), 3) for _ in range(n)]
    body: dict[str, Any] = {
        "x": xs,
        "y": [round(2.0 * x + rng.gauss(0.0, 0.3), 3) for x in xs],
        "epochs": rng.randint(20_000, 200_000),
        "batch_size": 1,
        "seed": rng.randrange(2**31),
    }
    if rng.random() < 0.3:
        body["fit_intercept"] = True
    return body


def long_bodies(seed: int) -> list[dict[str, Any]]:
    """LONG_BODIES distinct long fits drawn from the run's seed, each with a seed of its own: 3
    points, batches of 128 and 120,000-220,000 epochs, 15-28 million samples to process, 1-3 s
    of a training worker's time (the cost goes with the samples, the history with the epochs:
    a few MB each, like the short fits', in Redis and its append-only file)."""
    rng = random.Random(f"{seed}-long")
    bodies: list[dict[str, Any]] = []
    while len(bodies) < LONG_BODIES:
        xs = [round(rng.uniform(0.5, 5.0), 3) for _ in range(3)]
        body: dict[str, Any] = {
            "x": xs,
            "y": [round(2.0 * x + rng.gauss(0.0, 0.3), 3) for x in xs],
            "epochs": rng.randint(120_000, 220_000),
            "batch_size": 128,
            "learning_rate": 0.001,
            "seed": rng.randrange(2**31),
        }
        if rng.random() < 0.5:
            body["fit_intercept"] = True
        if body not in bodies:
            bodies.append(body)
    return bodies


class Clients:
    """Client threads: each posts fits until the fault phase ends, retrying each (same key, same
    body, a random replica) until 202; a pending retry gives up only when told to."""

    def __init__(self, urls: list[str], seed: int) -> None:
        self.urls = urls
        self.seed = seed
        self.long_bodies = long_bodies(seed)
        self.fits: list[Fit] = []
        self.answers: Counter[str] = Counter()  # every POST /fit answer, by status or error
        self.no_new = threading.Event()
        self.give_up = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"client-{i}", daemon=True)
            for i in range(CLIENTS)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, until: float) -> bool:
        """Wait for every thread until `until`; whether all have ended."""
        for t in self._threads:
            t.join(max(0.0, until - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self, i: int) -> None:
        rng = random.Random(f"{self.seed}-client-{i}")
        with httpx.Client(timeout=TIMEOUT) as http:
            while not self.no_new.is_set():
                if rng.random() < LONG_SHARE:  # a long body verbatim, under a fresh key
                    fit = Fit(str(uuid.uuid4()), dict(rng.choice(self.long_bodies)), long=True)
                else:
                    fit = Fit(str(uuid.uuid4()), fit_body(rng))
                with self._lock:
                    self.fits.append(fit)
                self.submit(http, rng, fit, retry=True)
                # Now and then the same POST again, as a client whose 202 got lost would: the
                # key must name the same job, whatever happened meanwhile.
                if fit.ids and rng.random() < 0.1:
                    self.submit(http, rng, fit, retry=False)
                # Paced (about 1.3 fits/s from all clients, a third of a second of worker time
                # each on average): the workers keep up through the faults, and beside other
                # load, so the queue stays short and the drain at the end within its bound.
                self.no_new.wait(rng.uniform(1.5, 4.5))

    def submit(self, http: httpx.Client, rng: random.Random, fit: Fit, retry: bool) -> bool:
        """POST the fit through random replicas until 202 (or once); whether it was accepted."""
        while True:
            url = rng.choice(self.urls)
            try:
                r = http.post(f"{url}/fit", json=fit.body, headers={"Idempotency-Key": fit.key})
                answer = str(r.status_code)
                if r.status_code == 202:
                    job = r.json()
                    with self._lock:
                        fit.ids.append(job["id"])
                        fit.params = fit.params or job["params"]
                        self.answers[answer] += 1
                    return True
                if r.status_code != 429 and r.status_code < 500:
                    fit.refused = f"{r.status_code} {r.text[:300]}"
            except (httpx.HTTPError, ValueError) as exc:  # ValueError: a 202 that is not JSON
                answer = type(exc).__name__
            with self._lock:
                self.answers[answer] += 1
            if fit.refused is not None or not retry:
                return False
            if self.give_up.wait(rng.uniform(0.2, 1.0)):
                return False


# -- the prober ----------------------------------------------------------------------------


class Prober:
    """One thread per replica asking GET /predict?hours=4 every ~50 ms; a failure counts when
    a model exists and the replica was up (by the driver's account) before and after it."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.excused: Counter[str] = Counter()  # on a replica down or just restarted
        self.samples: list[str] = []  # the first failures that count, for the report
        self.model_seen: float | None = None
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(r,), name=f"probe-{r.name}", daemon=True)
            for r in replicas
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(TIMEOUT + 5)

    def _run(self, replica: Replica) -> None:
        http = httpx.Client(timeout=TIMEOUT)
        seen = replica.incarnation
        try:
            while not self.stop.wait(PROBE_SECONDS):
                live, incarnation = replica.live()
                if incarnation != seen:  # a new process: no pooled connection to the old one
                    http.close()
                    http = httpx.Client(timeout=TIMEOUT)
                    seen = incarnation
                asked = time.monotonic()
                error = self._ask(http, replica)
                self._count(replica, error, asked, live, incarnation)
        finally:
            http.close()

    def _ask(self, http: httpx.Client, replica: Replica) -> str | None:
        """None if /predict answered 200, else what went wrong."""
        try:
            r = http.get(f"{replica.url}/predict", params={"hours": 4})
        except httpx.HTTPError as exc:
            return repr(exc)
        return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"

    def _count(
        self, replica: Replica, error: str | None, asked: float, live: bool, incarnation: int
    ) -> None:
        with self._lock:
            if error is None:
                self.ok[replica.name] += 1
                self.model_seen = self.model_seen or asked
                return
            if self.model_seen is None or asked < self.model_seen + PROPAGATION_SECONDS:
                return  # no model yet: 503 model-not-ready is the right answer
            still_live, still = replica.live()
            if live and still_live and incarnation == still:
                self.failed[replica.name] += 1
                if len(self.samples) < 20:
                    self.samples.append(f"{replica.name} at {asked - STARTED:.1f}s: {error}")
            else:
                self.excused[replica.name] += 1


# -- the driver ----------------------------------------------------------------------------


class Driver:
    """One fault every 2-5 s, chosen at random; after each, waits until it has healed."""

    def __init__(self, stack: Stack, rng: random.Random) -> None:
        self.stack = stack
        self.rng = rng
        self.counts: Counter[str] = Counter({kind: 0 for kind in FAULTS})
        self.heal_failures: list[str] = []

    def run(self, until: float, heal_until: float) -> None:
        """Inject faults until `until`; a heal may run on to `heal_until`."""
        while True:
            pause = self.rng.uniform(2.0, 5.0)
            if time.monotonic() + pause >= until:
                time.sleep(max(0.0, until - time.monotonic()))
                return
            time.sleep(pause)
            kind = self.rng.choice(FAULTS)
            what = getattr(self, kind.replace("-", "_"))()
            self.counts[kind] += 1
            began = time.monotonic()
            wrong = self.stack.heal(min(began + HEAL_SECONDS, heal_until))
            if wrong is None:
                say(f"fault {kind}: {what}; healed in {time.monotonic() - began:.1f}s")
            else:
                self.heal_failures.append(f"after {kind} ({what}): {wrong}")
                say(f"fault {kind}: {what}; NOT healed: {wrong}")

    def replica_kill(self) -> str:
        # The whole group: the replica, its fork server and its worker mid-fit, as a lost host.
        replica = self.rng.choice(self.stack.replicas)
        replica.take_down()
        replica.kill()
        down = self.rng.uniform(1.0, 3.0)
        time.sleep(down)
        replica.start()
        return f"{replica.name} down {down:.1f}s"

    def worker_kill(self) -> str:
        worker = self.rng.choice(self.stack.workers)
        worker.kill()
        worker.start()
        return worker.name

    def embedded_worker_kill(self) -> str:
        replica = self.rng.choice(self.stack.replicas)
        pids = replica.embedded_workers()
        if not pids:
            return f"{replica.name} had no worker to kill"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[0], signal.SIGKILL)
        # Healed once the replica has forked another: not while the dead one still shows.
        wait_for(lambda: not alive(pids[0]), time.monotonic() + 10)
        return f"{replica.name}'s worker {pids[0]}"

    def worker_pause(self) -> str:
        # Past the 2 s lease: another worker runs its fit again, its late writes must be refused.
        targets: list[tuple[str, Callable[[int], None]]] = [
            (w.name, w.signal) for w in self.stack.workers
        ]
        for r in self.stack.replicas:
            targets += [
                (f"{r.name}'s worker {pid}", _signaller(pid)) for pid in r.embedded_workers()
            ]
        name, send = self.rng.choice(targets)
        paused = self.rng.uniform(3.0, 5.0)
        send(signal.SIGSTOP)
        try:
            time.sleep(paused)
        finally:
            send(signal.SIGCONT)
        return f"{name} paused {paused:.1f}s"

    def redis_restart(self) -> str:
        self.stack.redis.kill()
        down = self.rng.uniform(1.0, 4.0)
        time.sleep(down)
        self.stack.redis.start()  # the same port and directory: the append-only file has it all
        return f"down {down:.1f}s"

    def redis_hang(self) -> str:
        hung = self.rng.uniform(1.0, 4.0)
        self.stack.redis.signal(signal.SIGSTOP)
        try:
            time.sleep(hung)
        finally:
            self.stack.redis.signal(signal.SIGCONT)
        return f"hung {hung:.1f}s"

    def proxy_cut(self) -> str:
        self.stack.proxy.cut_all()
        return "replica A's connections cut"

    def proxy_refuse(self) -> str:
        refused = self.rng.uniform(1.0, 3.0)
        self.stack.proxy.refuse(True)
        try:
            time.sleep(refused)
        finally:
            self.stack.proxy.refuse(False)
        return f"replica A refused {refused:.1f}s"


def _signaller(pid: int) -> Callable[[int], None]:
    """A function that sends a signal to this one process (an embedded worker, not its group)."""

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    return send


# -- the end: waiting for the jobs, and the checks -----------------------------------------


def get_json(http: httpx.Client, urls: list[str], path: str, tries: int = 3) -> Any:
    """GET path through random replicas; the JSON of a 200, else None after `tries`."""
    for _ in range(tries):
        try:
            r = http.get(f"{random.choice(urls)}{path}")
            if r.status_code == 200:
                return r.json()
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return None


def wait_ended(fits: list[Fit], urls: list[str], until: float) -> dict[str, dict[str, Any]]:
    """Poll every accepted job until all have ended or `until`; the last view of each."""
    jobs: dict[str, dict[str, Any]] = {}
    pending = {f.job_id for f in fits if f.job_id is not None}
    with httpx.Client(timeout=TIMEOUT) as http:
        while pending:
            for job_id in sorted(pending):
                job = get_json(http, urls, f"/jobs/{job_id}", tries=1)
                if job is not None:
                    jobs[job_id] = job
                    if job["status"] in ENDED:
                        pending.discard(job_id)
            if not pending or time.monotonic() >= until:
                break
            say(f"waiting for {len(pending)} jobs to end")
            time.sleep(1.0)
    return jobs


def expected_results(
    fits: list[Fit], jobs: dict[str, dict[str, Any]]
) -> Iterator[tuple[Fit, dict[str, Any], float, float]]:
    """(fit, job, w, b) for every succeeded job, w and b as the service's engine computes them
    here, with what the training worker uses: the body's values as float64 bytes, the params the
    job records, one torch thread (service.queue_worker's FitActor._run). Each distinct fit (body
    and params) is computed once: the long fits repeat a few bodies."""
    import torch

    from service.core import engine as training

    torch.set_num_threads(1)
    done: dict[tuple[str, str], tuple[float, float]] = {}
    for fit in fits:
        job = jobs.get(fit.job_id or "")
        if job is None or job["status"] != "succeeded":
            continue
        key = (canonical(fit.body), canonical(job["params"]))
        if key not in done:
            x = training.as_tensor(array("d", fit.body["x"]).tobytes())
            y = training.as_tensor(array("d", fit.body["y"]).tobytes())
            session = training.Session(x, y, training.FitParams.of(job["params"]))
            for _ in session.chunks():
                pass
            report = session.report()
            done[key] = report.w, report.b
        w, b = done[key]
        yield fit, job, w, b


def canonical(value: Any) -> str:
    """The canonical JSON of a body or params: equal values, equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class Findings:
    """What the checks found, each item a line for the report."""

    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    keys_at_nothing: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    unverified: int = 0  # succeeded jobs whose result there was no time left to recompute


def check(
    fits: list[Fit], jobs: dict[str, dict[str, Any]], urls: list[str], until: float
) -> Findings:
    """Every check but the prober's, on the accepted fits and their last seen jobs."""
    found = Findings()
    accepted = [f for f in fits if f.job_id is not None]
    found.refused = [f"key {f.key}: {f.refused}" for f in fits if f.refused is not None]
    stuck: set[str] = set()
    for fit in accepted:
        job = jobs.get(fit.job_id or "")
        if job is None:
            found.lost.append(f"{fit.job_id}: never found (GET /jobs/{{id}} did not answer 200)")
        elif job["status"] != "succeeded":
            found.lost.append(f"{fit.job_id}: {job['status']}, error {job.get('error')}")
            if job["status"] not in ENDED:
                stuck.add(fit.job_id or "")
    verified = 0
    for fit, job, w, b in expected_results(accepted, jobs):
        if time.monotonic() >= until:
            break
        verified += 1
        got = job["result"]
        if fit.params != job["params"]:
            found.wrong.append(f"{job['id']}: params {job['params']} but the 202 had {fit.params}")
        if (got["w"], got["b"]) != (w, b):  # exact: the same engine, data and seed
            found.wrong.append(f"{job['id']}: w, b = {got['w']!r}, {got['b']!r}; here {w!r}, {b!r}")
    found.unverified = sum(1 for j in jobs.values() if j["status"] == "succeeded") - verified
    with httpx.Client(timeout=TIMEOUT) as http:
        for fit in accepted:
            if time.monotonic() >= until:
                found.keys_at_nothing.append(f"key {fit.key}: not asked again (out of time)")
                continue
            again = _post_again(http, urls, fit)
            if again != fit.job_id or len(set(fit.ids)) > 1:
                found.keys_at_nothing.append(
                    f"key {fit.key}: recorded {fit.job_id}, 202s named {sorted(set(fit.ids))}, "
                    f"asked again: {again}"
                )
        listed = get_json(http, urls, "/jobs?limit=100")
    if listed is None:
        found.stuck.append("GET /jobs?limit=100 did not answer 200")
    else:
        stuck |= {j["id"] for j in listed["jobs"] if j["status"] not in ENDED}
    found.stuck += sorted(stuck)
    return found


def _post_again(http: httpx.Client, urls: list[str], fit: Fit) -> str:
    """The same POST /fit once more: the id its 202 names, or what it answered instead."""
    answer = "nothing"
    for _ in range(5):
        try:
            r = http.post(
                f"{random.choice(urls)}/fit", json=fit.body, headers={"Idempotency-Key": fit.key}
            )
            if r.status_code == 202:
                job_id: str = r.json()["id"]
                fit.ids.append(job_id)
                return job_id
            answer = f"{r.status_code} {r.text[:200]}"
            if r.status_code != 429 and r.status_code < 500:
                return answer
        except (httpx.HTTPError, ValueError) as exc:
            answer = repr(exc)
        time.sleep(0.5)
    return answer


# -- the run -------------------------------------------------------------------------------


def report(
    minutes: float,
    seed: int,
    clients: Clients,
    jobs: dict[str, dict[str, Any]],
    found: Findings,
    driver: Driver,
    prober: Prober,
    stack: Stack,
) -> dict[str, Any]:
    """The summary as a dict; its `line` is what the run prints last."""
    accepted = [f for f in clients.fits if f.job_id is not None]
    succeeded = sum(
        1 for f in accepted if jobs.get(f.job_id or "", {}).get("status") == "succeeded"
    )
    never = [f.key for f in clients.fits if f.job_id is None and f.refused is None]
    faults = ", ".join(f"{k} {n}" for k, n in driver.counts.items())
    failed = sum(prober.failed.values())
    # Jobs that ran more than once: a fault hit them running (or a duplicate delivery did).
    rerun = [f for f in accepted if jobs.get(f.job_id or "", {}).get("attempts", 0) > 1]
    long = [f for f in accepted if f.long]
    seconds = long_fit_seconds(long, jobs)
    median = f"{statistics.median(seconds):.1f} s" if seconds else "none ran once"
    line = (
        f"chaos: {minutes:.1f} min, {len(accepted)} fits accepted, {succeeded} succeeded, "
        f"{len(found.lost)} lost, {len(found.wrong)} wrong results, "
        f"{len(found.keys_at_nothing)} keys at nothing, {len(found.stuck)} stuck, "
        f"{len(never)} never accepted, {len(found.refused)} refused; {len(long)} long fits "
        f"(median {median}), re-run {len(rerun)} ({sum(f.long for f in rerun)} long); "
        f"faults: {faults}; "
        f"predict: {sum(prober.ok.values())} ok, {failed} failed on live replicas"
    )
    checks = {
        "some_fit_accepted": bool(accepted),  # a run that tested nothing does not pass
        "no_job_lost": not found.lost,
        "results_exact": not found.wrong,
        "every_key_finds_its_job": not found.keys_at_nothing,
        "nothing_stuck": not found.stuck,
        "no_valid_fit_refused": not found.refused,
        "no_predict_failure_on_live_replicas": failed == 0,
    }
    return {
        "line": line,
        "passed": all(checks.values()),
        "checks": checks,
        "seed": seed,
        "minutes": round(minutes, 2),
        "fits_accepted": len(accepted),
        "succeeded": succeeded,
        "reruns": len(rerun),  # accepted jobs with attempts > 1
        "long_reruns": sum(f.long for f in rerun),
        "long_fits": len(long),
        "long_fit_seconds": {  # started to finished, of the long fits that ran once
            "median": round(statistics.median(seconds), 2) if seconds else None,
            "max": round(max(seconds), 2) if seconds else None,
        },
        "long_bodies": clients.long_bodies,
        "lost": found.lost,
        "wrong_results": found.wrong,
        "keys_at_nothing": found.keys_at_nothing,
        "stuck": found.stuck,
        "refused": found.refused,
        "never_accepted": never,
        "unverified_results": found.unverified,
        "post_fit_answers": dict(clients.answers),
        "faults": dict(driver.counts),
        "heal_failures": driver.heal_failures,
        "unexpected_exits": stack.unexpected_exits,
        "predict": {
            "ok": dict(prober.ok),
            "failed_on_live_replicas": dict(prober.failed),
            "excused": dict(prober.excused),
            "failure_samples": prober.samples,
        },
    }


def long_fit_seconds(fits: list[Fit], jobs: dict[str, dict[str, Any]]) -> list[float]:
    """Started to finished, in seconds, of each of these fits whose job succeeded at its first
    attempt (a re-run's started_at is its first attempt's)."""
    seconds = []
    for fit in fits:
        job = jobs.get(fit.job_id or "", {})
        if job.get("status") == "succeeded" and job.get("attempts") == 1:
            started = datetime.fromisoformat(job["started_at"])
            seconds.append((datetime.fromisoformat(job["finished_at"]) - started).total_seconds())
    return seconds


def print_details(summary: dict[str, Any]) -> None:
    """Every finding, the first 20 of each kind, before the summary line."""
    for name in ("lost", "wrong_results", "keys_at_nothing", "stuck", "refused"):
        for item in summary[name][:20]:
            print(f"  {name}: {item}")
        if len(summary[name]) > 20:
            print(f"  {name}: ... {len(summary[name]) - 20} more")
    for item in summary["predict"]["failure_samples"]:
        print(f"  predict failure: {item}")
    for item in summary["heal_failures"] + summary["unexpected_exits"]:
        print(f"  note: {item}")
    if summary["unverified_results"]:
        print(f"  note: {summary['unverified_results']} results not recomputed (out of time)")
    print(f"  POST /fit answers: {summary['post_fit_answers']}")


def start_watchdog(stack: Stack, at: float) -> None:
    """The hard limit: at `at` kill every process of the run and exit 3, stuck or not."""

    def watch() -> None:
        time.sleep(max(0.0, at - time.monotonic()))
        message = f"chaos: hard time limit reached; killing everything (logs in {stack.root})"
        print(message, file=sys.stderr, flush=True)
        stack.kill_all()
        os._exit(3)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()


def on_sigterm(sig: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run like Ctrl-C: through the finally that kills the stack."""
    raise SystemExit(128 + sig)


def main(argv: list[str] | None = None) -> int:
    """Run the stack, the clients, the prober and the driver; check; 0 if every check passed."""
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=DESCRIPTION)
    parser.add_argument("--minutes", type=float, default=3.0, help="of faults (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="the driver's (default random)")
    parser.add_argument("--summary", type=Path, default=None, help="write the summary as JSON")
    parser.add_argument(
        "--no-faults", action="store_true", help="a baseline: the same run without faults"
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    deadline = STARTED + args.minutes * 60 + SLACK_SECONDS
    say(f"chaos: seed {seed}, {args.minutes} min of {'no ' if args.no_faults else ''}faults")
    root = Path(tempfile.mkdtemp(prefix="sgd-chaos-"))
    stack = Stack(root)
    atexit.register(stack.kill_all)
    signal.signal(signal.SIGTERM, on_sigterm)
    start_watchdog(stack, deadline - 2)
    passed = False
    try:
        stack.start(time.monotonic() + SETUP_SECONDS)
        say(f"stack ready ({root})")
        urls = [r.url for r in stack.replicas]
        clients, prober = Clients(urls, seed), Prober(stack.replicas)
        driver = Driver(stack, random.Random(seed))
        clients.start()
        prober.start()
        began = time.monotonic()
        faults_until = min(began + args.minutes * 60, deadline - MIN_AFTER_FAULTS_SECONDS)
        if args.no_faults:
            time.sleep(max(0.0, faults_until - time.monotonic()))
        else:
            driver.run(faults_until, deadline - CHECK_RESERVE_SECONDS - 30)
        minutes = (time.monotonic() - began) / 60
        clients.no_new.set()
        say("fault phase over: healing, then waiting for every accepted fit to end")
        wrong = stack.heal(time.monotonic() + HEAL_SECONDS)
        if wrong is not None:
            driver.heal_failures.append(f"at the end: {wrong}")
        # Pending retries go on while they can still succeed; then they give up (never accepted).
        clients.join(min(time.monotonic() + 30, deadline - CHECK_RESERVE_SECONDS))
        clients.give_up.set()
        clients.join(time.monotonic() + TIMEOUT + 5)
        jobs = wait_ended(
            clients.fits,
            urls,
            min(time.monotonic() + DRAIN_SECONDS, deadline - CHECK_RESERVE_SECONDS),
        )
        prober.join()
        say("checking")
        found = check(clients.fits, jobs, urls, deadline - 10)
        summary = report(minutes, seed, clients, jobs, found, driver, prober, stack)
        print_details(summary)
        print(summary["line"], flush=True)
        if args.summary is not None:
            args.summary.write_text(json.dumps(summary, indent=2) + "\n")
        passed = bool(summary["passed"])
        print("chaos: PASSED" if passed else f"chaos: FAILED (logs kept in {root})", flush=True)
    except BaseException as exc:
        print(f"chaos: stopped by {exc!r}; logs kept in {root}", file=sys.stderr, flush=True)
        raise
    finally:
        stack.kill_all()
        if passed:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
