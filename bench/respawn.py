"""How long a replica cannot train after its training worker dies: kill -9 the idle worker of a
real server, then time until a new worker is up and /readyz answers 200 again. Also the cold
start, `python -m service` to its first 200. Medians, with the best and the worst.

    .venv/bin/python bench/respawn.py [kills]     # 10 kills by default
"""

import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import load


def workers(server_pid: int) -> list[int]:
    """The server's training workers: the processes under it named sgd-worker."""
    found = []
    for pid in load.process_tree(server_pid)[1:]:
        with contextlib.suppress(OSError):  # ended meanwhile
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sgd-worker":
                found.append(pid)
    return found


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def summary(seconds: list[float]) -> str:
    m, best, worst = statistics.median(seconds), min(seconds), max(seconds)
    return f"median {m:.3f} s, best {best:.3f} s, worst {worst:.3f} s ({len(seconds)} runs)"


def main(kills: int) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="sgd-respawn-"))
    colds = []
    for i in range(3):
        (log_dir / f"cold{i}").mkdir()
        start = time.perf_counter()
        srv = load.start_service(log_dir / f"cold{i}")  # returns once /readyz is 200
        colds.append(time.perf_counter() - start)
        srv.stop()
    print("cold start to ready:", summary(colds))
    (log_dir / "kills").mkdir()
    srv = load.start_service(log_dir / "kills")
    try:
        times = []
        for _ in range(kills):
            (old,) = workers(srv.pid)
            start = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            while not ((new := workers(srv.pid)) and new != [old] and ready(srv.url)):
                time.sleep(0.002)
            times.append(time.perf_counter() - start)
            time.sleep(0.2)
        print("kill -9 of the worker to ready again:", summary(times))
    finally:
        srv.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
