"""Servers under test and the load generator: wrk (Debian's package), or an asyncio fallback.

Every process the bench starts is tracked by its own Popen object and stopped by its pid.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH / "wrk_report.lua"
WRK_POST_SCRIPT = BENCH / "wrk_post.lua"
CONNECTIONS = 32


def ensure_wrk(log: Any) -> str | None:
    """wrk's path, installing Debian's package when it is missing and we are root."""
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    log("installing wrk from Debian's packages (apt-get) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "wrk"], ["apt-get", "update", "-qq"]):
        subprocess.run(cmd, env=env, capture_output=True, check=False, timeout=300)
        if shutil.which("wrk"):
            break
    if not shutil.which("wrk"):
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"], env=env, capture_output=True, timeout=300
        )
    return shutil.which("wrk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start(cmd: list[str], port: int, log_dir: Path, name: str, env: dict[str, str]) -> Server:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        # cwd outside the repo: `python -m` puts the cwd first on sys.path, which would shadow
        # a PYTHONPATH given for an experiment on a copy of `service`
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log_dir)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/openapi.json", timeout=2).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not start within 120 s")


def start_service(log_dir: Path, extra_env: dict[str, str] | None = None) -> Server:
    """`python -m service` as deployed (one uvicorn worker, its own settings)."""
    port = free_port()
    env = {
        **os.environ,
        "SGD_HOST": "127.0.0.1",
        "SGD_PORT": str(port),
        "SGD_MAX_EPOCHS": "2000000",
        **(extra_env or {}),
    }
    server = start([sys.executable, "-m", "service"], port, log_dir, "service", env)
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the service's worker did not get ready")
        time.sleep(0.1)
    return server


def start_bare(log_dir: Path, w: float, b: float, version: int) -> Server:
    port = free_port()
    cmd = [sys.executable, str(BENCH / "bare_app.py"), str(port), repr(w), repr(b), str(version)]
    return start(cmd, port, log_dir, "bare", dict(os.environ))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name, or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants (a server's helpers, fork server and training worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = proc_stat(int(entry)) if entry.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree = [root]
    for pid in tree:  # grows as it goes: breadth first
        tree.extend(children.get(pid, []))
    return tree


def hammer(
    wrk: str | None,
    url: str,
    seconds: float,
    body: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    connections: int = CONNECTIONS,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Load `url` with `connections` keep-alive connections; requests/s and latency percentiles.

    With a body, each request is a POST of it (wrk_post.lua). `timeout` is wrk's per request (its
    default is 2 s); a request that takes longer counts as failed, its latency unrecorded.
    """
    if wrk is None:
        return asyncio.run(_py_load(url, seconds, body, content_type, headers, connections))
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s"]
    if timeout is not None:
        cmd.append(f"--timeout={timeout:g}s")
    sent = dict(headers or {})
    if body is not None:
        sent = {"Content-Type": content_type, **sent}
    for name, value in sent.items():
        cmd += ["-H", f"{name}: {value}"]
    env = None
    with contextlib.ExitStack() as stack:
        if body is None:
            cmd += ["-s", str(WRK_SCRIPT), url]
        else:
            body_file = stack.enter_context(tempfile.NamedTemporaryFile(prefix="wrk-body-"))
            body_file.write(body)
            body_file.flush()
            env = {**os.environ, "WRK_BODY_FILE": body_file.name, "WRK_REPORT": str(WRK_SCRIPT)}
            cmd += ["-s", str(WRK_POST_SCRIPT), url]
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60 + (timeout or 0),
            env=env,
        )
    line = next(x for x in out.stdout.splitlines() if x.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON ") :])
    return {
        "tool": "wrk",
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "requests": raw["requests"],
        "failed": raw["socket_errors"] + raw["non2xx"],
        "p50_ms": raw["p50_us"] / 1e3,
        "p90_ms": raw["p90_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "max_ms": raw["max_us"] / 1e3,
    }


async def _py_load(
    url: str,
    seconds: float,
    body: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    connections: int = CONNECTIONS,
) -> dict[str, Any]:
    """A small asyncio HTTP/1.1 keep-alive load generator, for when wrk cannot be installed."""
    parsed = httpx.URL(url)
    target = parsed.raw_path.decode()
    lines = [f"{'GET' if body is None else 'POST'} {target} HTTP/1.1", f"Host: {parsed.host}"]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    latencies: list[float] = []
    failed = 0
    end = time.perf_counter() + seconds

    async def connection() -> None:
        nonlocal failed
        reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        try:
            while time.perf_counter() < end:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not head.startswith(b"HTTP/1.1 2"):
                    failed += 1
        finally:
            writer.close()

    began = time.perf_counter()
    results = await asyncio.gather(
        *(connection() for _ in range(connections)), return_exceptions=True
    )
    elapsed = time.perf_counter() - began
    failed += sum(isinstance(r, BaseException) for r in results)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    return {
        "tool": "python-asyncio",
        "rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "failed": failed,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1e3,
    }
