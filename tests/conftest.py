"""Shared fixtures: settings, the app through its factory, and a real uvicorn server process."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.http.app import create_app

TUTORIAL = {"x": [1.0, 2.0, 3.0], "y": [2.0, 4.0, 6.0]}
TIMEOUT = 10.0  # seconds, for every single request a test makes
SLOW_BATCH = 100_000
LONG_FIT_STEPS = 10**12


def settings_for_tests(**overrides: Any) -> Settings:
    """Settings for the suite: the tests' own needs, then a test's overrides.

    The suite runs fits of up to 2e11 samples (to cancel and kill them), above the default
    SGD_MAX_SAMPLE_STEPS. Its training workers run at normal priority: the suite must pass beside
    other load (CI's, or busy loops that shake out races), where a worker under SCHED_IDLE gets
    almost no CPU. The tests of the priority itself ask for the defaults.
    """
    base: dict[str, Any] = {"max_sample_steps": LONG_FIT_STEPS, "worker_nice": 0}
    base["allowed_hosts"] = [*Settings.model_fields["allowed_hosts"].default, "testserver"]
    return Settings(**{**base, "worker_sched_idle": False, **overrides})


# The same, for `python -m service` processes. No balancer watches the suite's servers, so a
# SIGTERM drains for a tenth of a second, not the default second; the drain's own tests set theirs.
SERVER_ENV = {
    "SGD_MAX_SAMPLE_STEPS": str(LONG_FIT_STEPS),
    "SGD_WORKER_NICE": "0",
    "SGD_WORKER_SCHED_IDLE": "false",
    "SGD_DRAIN_SECONDS": "0.1",
}


def slow_fit(n: int = 200_000, epochs: int = 2_000_000) -> dict[str, Any]:
    """A fit that runs for minutes on any engine: every epoch draws SLOW_BATCH samples."""
    x = [float(i % 10 + 1) for i in range(n)]
    return {"x": x, "y": [2.0 * v for v in x], "epochs": epochs, "batch_size": SLOW_BATCH}


def wait_job(client: httpx.Client, job_id: str, deadline: float = 60.0) -> dict[str, Any]:
    """Poll a job until it ends; fails the test at the deadline (never a bare sleep)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end within {deadline}s")


def wait_until(check: Callable[[], bool], deadline: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {deadline}s")


class RedisServer:
    """A real redis-server of our own (Debian's package) on a free port, with its data in a
    temporary directory, so that a test can stop, kill and restart it."""

    def __init__(self, directory: str, appendonly: bool = True, password: str = "") -> None:
        self.dir = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self._prefixes = 0

    @property
    def url(self) -> str:
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def prefix(self) -> str:
        """A fresh key prefix: a store of its own on the shared server."""
        self._prefixes += 1
        return f"t{os.getpid()}-{self._prefixes}-{time.monotonic_ns()}:"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", self.dir, "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_until(self.answers, 20.0, "redis-server start")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; every store on it gets its own key prefix."""
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is missing: `make test` installs it (apt-get install redis-server)"
        )
    srv = RedisServer(str(tmp_path_factory.mktemp("redis")))
    srv.start()
    yield srv
    srv.stop()


# The stores every API-level test runs against: in memory (the default) and shared on Redis.
STORES = ["memory", "redis"]


def store_settings(request: pytest.FixtureRequest, store: str) -> dict[str, Any]:
    """Settings that select `store`: for Redis, the session's server and a fresh key prefix
    (an empty store of its own)."""
    if store == "memory":
        return {}
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis_url": redis_server.url, "redis_prefix": redis_server.prefix()}


def store_env(request: pytest.FixtureRequest, store: str) -> dict[str, str]:
    """The same as SGD_* variables, for `python -m service` processes."""
    return {f"SGD_{k.upper()}": str(v) for k, v in store_settings(request, store).items()}


def stop_apps(pool: dict[str, TestClient]) -> None:
    for c in pool.values():
        c.__exit__(None, None, None)


@pytest.fixture(scope="session")
def client_pool() -> Iterator[dict[str, TestClient]]:
    """The in-memory app `client` shares, started on first use and stopped at the end of the
    run. A pool rather than `client` itself: pytest tears a parametrized session fixture down
    whenever the next test takes another parameter (between modules, often under pytest-xdist),
    and each start-up costs a worker process importing torch."""
    pool: dict[str, TestClient] = {}
    yield pool
    stop_apps(pool)


@pytest.fixture(scope="session")
def redis_client_pool(redis_server: RedisServer) -> Iterator[dict[str, TestClient]]:
    """The same for the Redis app. It holds the session's redis-server, so that the app stops
    before that does; the in-memory app's tests need no redis-server."""
    pool: dict[str, TestClient] = {}
    yield pool
    stop_apps(pool)


@pytest.fixture(scope="session", params=STORES)
def client(request: pytest.FixtureRequest) -> TestClient:
    """One app (and one worker process) per store, shared by the read-mostly API tests."""
    pool_name = "redis_client_pool" if request.param == "redis" else "client_pool"
    client_pool: dict[str, TestClient] = request.getfixturevalue(pool_name)
    if request.param not in client_pool:
        settings = settings_for_tests(
            max_queued_jobs=64,
            keep_jobs=200,
            max_epochs=2_000_000,
            **store_settings(request, request.param),
        )
        c = TestClient(create_app(settings))
        c.__enter__()
        client_pool[request.param] = c
        wait_until(lambda: c.get("/readyz").status_code == 200, 120.0, "readiness")
    return client_pool[request.param]


@pytest.fixture(params=STORES)
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., TestClient]]:
    """Fresh apps with their own settings, on an empty store of each kind: for tests that need
    an empty store or other limits."""
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = settings_for_tests(**store_settings(request, request.param), **overrides)
        c = TestClient(create_app(settings))
        c.__enter__()
        opened.append(c)
        wait_until(lambda: c.get("/readyz").status_code == 200, 120.0, "readiness")
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def named_descendants(pid: int, name: str) -> list[int]:
    """The live processes under `pid` (children, theirs, ...) that ps shows as `name`."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        comm, rest = stat[stat.index("(") + 1 :].rsplit(")", 1)
        state, ppid = rest.split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry.name))
            names[int(entry.name)] = comm
    tree = [pid]
    for p in tree:  # grows as it goes: breadth first
        tree.extend(children.get(p, []))
    return [p for p in tree[1:] if names[p] == name]


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A real `python -m service` process on a free port."""

    proc: subprocess.Popen[str]
    url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def spawn_server(log_dir: str, **env: str) -> Server:
    """Start `python -m service` with SGD_* overrides in a process group of its own (so that a
    test can signal the group, as a terminal's Ctrl-C does); its output goes to a file."""
    port = int(env.get("SGD_PORT") or free_port())  # a given port: a restart where it was
    full_env = {**os.environ, "SGD_PORT": str(port), "SGD_HOST": "127.0.0.1"}
    full_env.update(SERVER_ENV, **env)
    log_path = os.path.join(log_dir, f"server-{port}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def start_server(log_dir: str, **env: str) -> Server:
    """spawn_server, then wait until it is ready."""
    srv = spawn_server(log_dir, **env)
    proc, url = srv.proc, srv.url

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {srv.log()}")
        try:
            return httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, deadline=90.0, what="server readiness")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return srv


@pytest.fixture
def make_server(tmp_path: Any) -> Iterator[Callable[..., Server]]:
    """Real servers with SGD_* overrides, ready unless ready=False; any a test leaves running
    is killed."""
    started: list[Server] = []

    def make(ready: bool = True, **env: str) -> Server:
        srv = (start_server if ready else spawn_server)(str(tmp_path), **env)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)


@pytest.fixture(params=STORES)
def server(request: pytest.FixtureRequest, make_server: Callable[..., Server]) -> Server:
    """A real server of the test's own, on each store: for tests that need an empty store
    (version 1 is theirs) or a log of their own."""
    return make_server(SGD_MAX_EPOCHS="2000000", **store_env(request, request.param))


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server with the default settings (in memory) for the whole run: for the modules
    whose tests only need a live server, never an empty one, and never stop or signal it."""
    srv = start_server(str(tmp_path_factory.mktemp("default-server")))
    yield srv
    stop_shared(srv)


@pytest.fixture(scope="session")
def server_pool(redis_server: RedisServer) -> Iterator[dict[str, Server]]:
    """The servers `shared_server` shares, by store, as `client_pool` keeps the apps."""
    pool: dict[str, Server] = {}
    yield pool
    for srv in pool.values():
        stop_shared(srv)


@pytest.fixture(scope="session", params=STORES)
def shared_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    server_pool: dict[str, Server],
) -> Server:
    """One real server per store for the whole run, configured as `server`'s: for end-to-end
    tests that need no empty store, never stop or signal it, and leave it idle (every fit they
    start has ended or been cancelled when they return)."""
    if request.param not in server_pool:
        log_dir = str(tmp_path_factory.mktemp("shared-server"))
        env = store_env(request, request.param)
        server_pool[request.param] = start_server(log_dir, SGD_MAX_EPOCHS="2000000", **env)
    return server_pool[request.param]


def stop_shared(srv: Server) -> None:
    """Stop a server shared by many tests at the end of the run; killed if it will not stop."""
    try:
        srv.stop(timeout=20)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)


LEASE = "2"  # seconds, in Redis mode: a silent worker loses its job quickly here


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone (append-only file on), so that it can be stopped."""
    srv = RedisServer(str(tmp_path / "redis"))
    os.makedirs(srv.dir)
    srv.start()
    yield srv
    srv.stop(signal.SIGKILL)


class Fleet:
    """Replicas and standalone workers on one Redis, one key prefix."""

    def __init__(self, redis: RedisServer, make_server: Callable[..., Server], log_dir: Path):
        self.redis = redis
        self.prefix = redis.prefix()
        self._make_server = make_server
        self._log_dir = log_dir
        self.workers: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {
            "SGD_REDIS_URL": self.redis.url,
            "SGD_REDIS_PREFIX": self.prefix,
            "SGD_LEASE_SECONDS": LEASE,
            "SGD_MAX_EPOCHS": "5000000",
        }

    def replica(self, workers: int = 0, ready: bool = True, **env: str) -> Server:
        """A replica with SGD_WORKERS embedded workers; `env` overrides (SGD_REDIS_URL: a
        proxy's, say)."""
        return self._make_server(ready=ready, **{**self.env(), "SGD_WORKERS": str(workers), **env})

    def worker(self, *wrapper: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        """A standalone `sgd-service worker`, ready to take fits; and its log. `wrapper` runs
        it (faketime, say), `env` overrides."""
        log = self._log_dir / f"worker-{len(self.workers)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "service", "worker"],
                env={**os.environ, **SERVER_ENV, **self.env(), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.workers.append(proc)
        wait_until(lambda: "training worker ready" in log.read_text(), 60, "worker ready")
        return proc, log

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(10)


@pytest.fixture
def fleet(
    own_redis: RedisServer, make_server: Callable[..., Server], tmp_path: Path
) -> Iterator[Fleet]:
    f = Fleet(own_redis, make_server, tmp_path)
    yield f
    f.close()


# The markers (pyproject.toml lists them), put on each test here from what it uses, so that no
# test needs to say it and none is forgotten. `make test-fast` runs `-m "not e2e and not slow"`;
# `make test` runs everything.
#
# e2e: the test needs a redis-server, or the suite starts a process of the service's own for it
# (`python -m service`, a standalone worker): it uses one of these fixtures (or a fixture that
# uses one), takes the store parameter "redis", or calls one of these helpers itself or in one
# of its fixtures. An app through TestClient runs in process (its training worker is a fork of
# the fork server): not e2e.
E2E_FIXTURES = {
    "redis_server",
    "redis_client_pool",
    "own_redis",
    "fleet",
    "make_server",
    "server",
    "default_server",
    "shared_server",
}
E2E_HELPERS = {"start_server", "spawn_server", "RedisServer", "Fleet"}
# slow: a Hypothesis property test, which runs a test body hundreds of times (fits, requests).


def _names(code: CodeType) -> set[str]:
    """The global names a function uses, its nested functions' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names(const)
    return names


def _is_e2e(item: pytest.Function) -> bool:
    if E2E_FIXTURES & set(item.fixturenames):
        return True
    params = item.callspec.params.values() if hasattr(item, "callspec") else ()
    if any(isinstance(v, str) and v == "redis" for v in params):
        return True
    hypothesis = getattr(item.function, "hypothesis", None)
    functions = [getattr(hypothesis, "inner_test", item.function)]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        functions += [d.func for d in defs]
    return any(E2E_HELPERS & _names(f.__code__) for f in functions if hasattr(f, "__code__"))


def pytest_itemcollected(item: pytest.Item) -> None:
    """The markers, as each test is collected: before `-m` selects."""
    if not isinstance(item, pytest.Function):
        return
    if _is_e2e(item):
        item.add_marker(pytest.mark.e2e)
    if getattr(item.function, "is_hypothesis_test", False):
        item.add_marker(pytest.mark.slow)


# A fit whose worker died in each of its attempts fails with these members in both modes.
WORKER_CRASHED_MEMBERS = {"type", "title", "status", "detail", "attempts"}
