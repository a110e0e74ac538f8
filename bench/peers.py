"""Peer model servers for comparing the Open Inference Protocol (KServe v2) REST route.

MLServer (with its scikit-learn runtime) and KServe's Python ModelServer, each serving a model
named `sgd` that computes y = 2x. They are bench-only: each is pip-installed with pinned
versions into its own venv under SGD_BENCH_PEERS_DIR (default
~/.cache/sgd-service-bench/peers/), outside the repository and never in the service's venv.
"""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import load

PEERS: tuple[str, ...] = ("mlserver-default", "mlserver-fastest", "kserve")

ROOT = Path(
    os.environ.get("SGD_BENCH_PEERS_DIR", Path.home() / ".cache" / "sgd-service-bench" / "peers")
)
START_TIMEOUT = 180.0
STOP_GRACE = 10.0
STAMP = "sgd-bench-stamp.txt"
INFER_PATH = "/v2/models/sgd/infer"

# sklearn models need a 2-D input, so the one value goes as a 1x1 tensor; KServe takes the same
BODIES: dict[str, bytes] = dict.fromkeys(
    PEERS,
    json.dumps(
        {"inputs": [{"name": "hours", "datatype": "FP64", "shape": [1, 1], "data": [4]}]},
        separators=(",", ":"),
    ).encode(),
)

MLSERVER_REQUIREMENTS = (
    "mlserver==1.7.1",
    "mlserver-sklearn==1.7.1",
    "scikit-learn==1.9.1",
    "joblib==1.6.0",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "fastapi==0.115.14",
    "starlette==0.46.2",
    "uvicorn==0.55.0",
    # uvloop 0.22 broke MLServer 1.7.1's inference workers ("There is no current event loop",
    # SeldonIO/MLServer#2286); 0.21.0 is the version MLServer 1.7.1's own lock file has
    "uvloop==0.21.0",
    "pydantic==2.14.4",
    "orjson==3.13.0",
)
KSERVE_REQUIREMENTS = (
    "kserve==0.21.0",
    "numpy==2.4.6",
    "pandas==2.3.3",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.55.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
    "pydantic==2.14.4",
    "orjson==3.13.0",
)

FIT_SCRIPT = """
import sys

import joblib
from sklearn.linear_model import LinearRegression

model = LinearRegression(fit_intercept=False).fit([[1.0], [2.0], [3.0]], [2.0, 4.0, 6.0])
joblib.dump(model, sys.argv[1])
"""

KSERVE_SCRIPT = '''"""KServe's ModelServer serving one custom v2 model, y = 2x (bench/peers.py)."""

from kserve import InferOutput, InferResponse, Model, ModelServer, model_server
from kserve.utils.utils import generate_uuid


class Sgd(Model):
    def __init__(self, name):
        super().__init__(name)
        self.ready = True

    def predict(self, payload, headers=None, response_headers=None):
        y = 2.0 * payload.inputs[0].as_numpy()
        out = InferOutput(name="predict", shape=list(y.shape), datatype="FP64")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(
            response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=[out]
        )


if __name__ == "__main__":
    ModelServer().start([Sgd(model_server.args.model_name)])
'''


@dataclass(frozen=True)
class Venv:
    """One peer's venv: what to pip-install, and whether to fit the sklearn model with it."""

    name: str
    requirements: tuple[str, ...]
    fits_model: bool = False

    @property
    def path(self) -> Path:
        return ROOT / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def stamp(self) -> str:
        fit = (FIT_SCRIPT,) if self.fits_model else ()
        return "\n".join((sys.version.split()[0], *self.requirements, *fit)) + "\n"

    def is_ready(self) -> bool:
        stamp = self.path / STAMP
        return self.python.exists() and stamp.exists() and stamp.read_text() == self.stamp


MLSERVER = Venv("mlserver", MLSERVER_REQUIREMENTS, fits_model=True)
KSERVE = Venv("kserve", KSERVE_REQUIREMENTS)
VENV_OF: dict[str, Venv] = {
    "mlserver-default": MLSERVER,
    "mlserver-fastest": MLSERVER,
    "kserve": KSERVE,
}
MODEL_FILE = MLSERVER.path / "sgd-model" / "model.joblib"


def _install(venv: Venv, log: Callable[[str], None]) -> str | None:
    """Build `venv` afresh; None, or why it failed."""
    log(f"peers: installing {venv.name} into {venv.path} ({', '.join(venv.requirements)}) ...")
    began = time.monotonic()
    shutil.rmtree(venv.path, ignore_errors=True)
    # the bench's own interpreter (3.11): MLServer 1.7.1 supports Python 3.9 to 3.12
    steps = [
        [sys.executable, "-m", "venv", str(venv.path)],
        [str(venv.python), "-m", "pip", "install", "-q", *venv.requirements],
    ]
    if venv.fits_model:
        steps.append([str(venv.python), "-c", FIT_SCRIPT, str(MODEL_FILE)])
    for cmd in steps:
        if cmd[-1] == str(MODEL_FILE):
            MODEL_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT, check=False
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd[:4])} ... timed out after 1200 s"
        if out.returncode != 0:
            # pip's config here lists local indexes that warn on every package: keep the rest
            lines = [x for x in (out.stdout + out.stderr).splitlines() if "is ignored" not in x]
            tail = " | ".join(lines[-12:])
            return f"{' '.join(cmd[:4])} ... failed with exit {out.returncode}: {tail}"
    (venv.path / STAMP).write_text(venv.stamp)
    size = sum(f.stat().st_size for f in venv.path.rglob("*") if f.is_file() and not f.is_symlink())
    log(f"peers: {venv.name} ready in {time.monotonic() - began:.0f} s, {size / 1e6:.0f} MB")
    return None


def prepare(log: Callable[[str], None]) -> dict[str, str]:
    """name -> reason it is unavailable, for each peer that could not be installed.

    Installs the rest (idempotent: a venv whose stamp matches its pins is reused). A lock file
    keeps two benches that prepare at once from building the same venv together.
    """
    failed: dict[str, str] = {}
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for venv in dict.fromkeys(VENV_OF.values()):
            if venv.is_ready():
                log(f"peers: reusing {venv.path}")
                continue
            reason = _install(venv, log)
            if reason is not None:
                log(f"peers: {venv.name} unavailable: {reason}")
                failed.update({name: reason for name, v in VENV_OF.items() if v is venv})
    return failed


def _pgrp(pid: int) -> int | None:
    """The process group of a live (not zombie) `pid`, or None."""
    fields = load.proc_stat(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[2])


class PeerServer(load.Server):
    """A peer started in its own session: stop() also ends what is left of its process group."""

    def stop(self) -> None:
        """SIGTERM to the server; after STOP_GRACE s, SIGKILL to what is left of its group.

        MLServer 1.7.1 with parallel workers can hang in its shutdown after load ("Waiting for
        background tasks to complete"), so waiting longer only slows the bench down.
        """
        group = self.proc.pid
        members = [p for p in load.process_tree(group) if _pgrp(p) == group]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_GRACE)
        deadline = time.monotonic() + 2
        while self.proc.poll() is not None and time.monotonic() < deadline:
            if not any(_pgrp(p) == group for p in members):
                break
            time.sleep(0.1)  # its workers, still shutting down after it
        for pid in members:
            if _pgrp(pid) == group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = load.free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _command(name: str, run_dir: Path, port: int) -> list[str]:
    """Write the peer's configuration into `run_dir`; the command that serves it on `port`."""
    if name == "kserve":
        script = run_dir / "sgd_kserve.py"
        script.write_text(KSERVE_SCRIPT)
        # KServe's REST server listens on 0.0.0.0 (not configurable in 0.21.0)
        return [
            str(KSERVE.python),
            str(script),
            f"--http_port={port}",
            "--enable_grpc=false",
            "--workers=1",
            "--model_name=sgd",
        ]
    grpc_port, metrics_port = _free_ports(2)
    # MLServer 1.7.1 always starts its gRPC server; metrics stay on (its default), on a free port
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
    }
    if name == "mlserver-fastest":
        settings["parallel_workers"] = 0  # inference in the main process
    (run_dir / "settings.json").write_text(json.dumps(settings, indent=2))
    model_dir = run_dir / "sgd"
    model_dir.mkdir()
    model_settings = {
        "name": "sgd",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(MODEL_FILE), "version": "v1"},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return [str(MLSERVER.path / "bin" / "mlserver"), "start", str(run_dir)]


def _answers(url: str, body: bytes) -> bool:
    """Whether the peer answers one-value inference with 200 and y = 8."""
    with contextlib.suppress(httpx.TransportError):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=5)
        if r.status_code == 200:
            y = r.json()["outputs"][0]["data"][0]
            if abs(y - 8.0) > 1e-9:
                raise RuntimeError(f"{url} answered {y}, not 8: {r.text}")
            return True
    return False


def start(name: str, log_dir: Path) -> load.Server:
    """Start the peer on a free port; returns once POST /v2/models/sgd/infer answers 200.

    Waits up to 180 s. Server.url is its base URL.
    """
    venv = VENV_OF[name]
    if not venv.is_ready():
        raise RuntimeError(f"{name}: {venv.path} is not installed; call peers.prepare first")
    run_dir = log_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = load.free_port()
    cmd = _command(name, run_dir, port)
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MLSERVER")}
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=run_dir, start_new_session=True
        )
    server = PeerServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text()[-2000:]}")
            if _answers(server.url + INFER_PATH, infer_body(name)):
                return server
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    server.stop()
    raise RuntimeError(f"{name} did not answer within {START_TIMEOUT:.0f} s: see {log_path}")


def infer_body(name: str) -> bytes:
    """The JSON body of one-value inference for this peer (hours = 4)."""
    return BODIES[name]


def version(name: str) -> str:
    """What the peer runs, for the report."""
    if name == "kserve":
        return "KServe 0.21.0 ModelServer (custom kserve.Model), 1 uvicorn worker, gRPC off"
    workers = "0" if name == "mlserver-fastest" else "1 (its default)"
    return (
        f"MLServer 1.7.1 (mlserver-sklearn 1.7.1, scikit-learn 1.9.1), parallel_workers {workers}"
    )
