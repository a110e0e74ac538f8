"""Load and faults against a real server, bounded in time: no errors, no mixed versions, no leak."""

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TUTORIAL, Server, slow_fit, start_server, wait_job, wait_until

CLIENTS = 50
SECONDS = 20.0


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def hammer(url: str, until: float, answers: list[dict[str, Any]], errors: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < until:
            try:
                r = await http.get("/predict", params={"hours": 4})
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            if r.status_code == 200:
                answers.append(r.json())
            else:
                errors.append(f"{r.status_code} {r.text}")


def churn(url: str, until: float) -> list[str]:
    """Start fits that finish, and slow ones that get cancelled, until the deadline."""
    ids: list[str] = []
    rng = random.Random(5)
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() < until - 2:
            k = rng.uniform(1, 5)
            data = {"x": [1.0, 2.0, 3.0], "y": [k, 2 * k, 3 * k], "batch_size": None}
            job = http.post("/fit", json={**data, "epochs": 300}).json()
            ids.append(wait_job(http, job["id"])["id"])
            slow = http.post("/fit", json=slow_fit(n=20_000)).json()
            time.sleep(0.2)
            http.post(f"/jobs/{slow['id']}/cancel")
            ids.append(slow["id"])
    return ids


@pytest.fixture
def roomy_server(tmp_path: Path) -> Iterator[Server]:
    """A server that keeps every job of the run, so every version can be checked."""
    srv = start_server(str(tmp_path), SGD_KEEP_JOBS="10000", SGD_MAX_EPOCHS="2000000")
    yield srv
    srv.stop()


@pytest.mark.timeout(180)
def test_fifty_clients_while_fits_start_finish_and_cancel(roomy_server: Server) -> None:
    server = roomy_server
    with server.client() as http:
        wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
    answers: list[dict[str, Any]] = []
    errors: list[str] = []
    until = time.monotonic() + SECONDS

    async def main() -> list[str]:
        fits = asyncio.create_task(asyncio.to_thread(churn, server.url, until))
        await asyncio.gather(*(hammer(server.url, until, answers, errors) for _ in range(CLIENTS)))
        return await fits

    ids = asyncio.run(main())
    with server.client() as http:
        jobs = [http.get(f"/jobs/{i}").json() for i in ids]
    versions = {j["result"]["model_version"]: j["result"] for j in jobs if j["result"]}
    versions[1] = None  # the tutorial fit's model
    assert not errors, errors[:5]
    assert len(answers) > 5 * CLIENTS  # they kept coming (how fast is the bench's to say)
    assert {j["status"] for j in jobs} <= {"succeeded", "cancelled"}
    assert "cancelled" in {j["status"] for j in jobs}
    for a in answers:
        result = versions.get(a["model_version"], "missing")
        assert result != "missing", a
        if result is not None:
            assert a["score"] == result["w"] * 4.0 + result["b"]
    print(f"{len(answers)} predictions in {SECONDS:.0f}s by {CLIENTS} clients, {len(ids)} fits")


@pytest.mark.timeout(300)
def test_memory_stays_flat_over_predictions_and_fits(server: Server) -> None:
    """RSS after 10,000 predictions and 100 fits stays within 10% of after 1,000 and 10."""

    def round_of(http: httpx.Client, predictions: int, fits: int) -> None:
        for i in range(fits):
            body = {**TUTORIAL, "epochs": 2000, "seed": i}
            wait_job(http, http.post("/fit", json=body).json()["id"])
        for i in range(predictions):
            assert http.get("/predict", params={"hours": i % 10}).status_code == 200

    with server.client() as http:
        round_of(http, 1000, 10)
        first = rss_bytes(server.proc.pid)
        round_of(http, 9000, 90)
        last = rss_bytes(server.proc.pid)
    growth = last / first - 1
    print(f"RSS after 1,000/10: {first / 2**20:.1f} MiB, after 10,000/100: {last / 2**20:.1f} MiB")
    assert growth < 0.10, f"RSS grew {growth:.1%}"


@pytest.mark.timeout(180)
def test_a_huge_body_is_refused_with_flat_memory(tmp_path: Path) -> None:
    """200 MB streamed without Content-Length: 413 at the limit; the rest is never buffered."""
    server = start_server(str(tmp_path), SGD_MAX_BODY_BYTES=str(2**20))
    before = rss_bytes(server.proc.pid)
    chunk = b"[" + b"1.0," * 16383 + b"1.0]"  # 64 KiB

    def body() -> Any:
        yield b'{"x": '
        for _ in range(200 * 2**20 // len(chunk)):
            yield chunk

    with httpx.Client(base_url=server.url, timeout=30) as http:
        try:
            r = http.post("/fit", content=body(), headers={"content-type": "application/json"})
        except httpx.HTTPError:
            r = None  # the server may close the connection while we still send
        if r is not None:
            assert r.status_code == 413
            assert r.headers["content-type"] == "application/problem+json"
        wait_until(lambda: http.get("/healthz").status_code == 200)
    growth = rss_bytes(server.proc.pid) - before
    server.stop()
    assert growth < 20 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB"
