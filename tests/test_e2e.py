"""End to end: a real `python -m service` process on a free port, driven over HTTP."""

import threading
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TUTORIAL, Server, slow_fit, wait_job, wait_until


def test_fit_poll_predict_history(shared_server: Server) -> None:
    with shared_server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        r = http.post("/fit", json=TUTORIAL)
        assert r.status_code == 202
        job = wait_job(http, r.json()["id"])
        assert job["status"] == "succeeded"
        pred = http.get("/predict", params={"hours": 4}).json()
        assert abs(pred["score"] - 8) < 0.01
        hist = http.get("/history").json()
        assert hist["total_epochs"] == 100
        assert hist["w"][0] == 1.0
        bad = http.post("/fit", json={"x": [1, 2], "y": [1]})
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        assert http.get("/predict", params={"hours": 4}).json() == pred


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_torch_is_loaded_in_the_worker_never_in_the_server(shared_server: Server) -> None:
    """The server stays small: a torch loaded by a pickled TorchVersion made full GCs take 0.2 s."""
    with shared_server.client() as http:
        job = wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
        assert job["status"] == "succeeded"
        assert http.get("/history").status_code == 200
        assert http.get("/predict", params={"hours": 4}).status_code == 200
    pid = shared_server.proc.pid
    tasks = Path(f"/proc/{pid}/task").iterdir()  # each thread lists the children it started
    children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    assert any(_maps_torch(c) for c in children)  # the probe finds torch where it is
    assert not _maps_torch(pid)


def test_cancel_over_http(shared_server: Server) -> None:
    with shared_server.client() as http:
        job = http.post("/fit", json=slow_fit()).json()
        wait_until(lambda: http.get(f"/jobs/{job['id']}").json()["progress"]["epoch"] > 0)
        r = http.post(f"/jobs/{job['id']}/cancel")
        assert r.json()["status"] == "cancelled"
        assert http.post(f"/jobs/{job['id']}/cancel").status_code == 409


def test_every_prediction_comes_from_one_published_version(server: Server) -> None:
    """Predictions race with fits that finish; each answer must match exactly one version."""
    stop = threading.Event()
    singles: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    failures: list[str] = []

    def predict_forever() -> None:
        with server.client() as http:
            while not stop.is_set():
                one = http.get("/predict", params={"hours": 4})
                many = http.post("/predict", json={"hours": [1, 2, 4]})
                for r, out in ((one, singles), (many, batches)):
                    if r.status_code == 200:
                        out.append(r.json())
                    elif r.status_code != 503:  # 503: no model yet
                        failures.append(r.text)

    def read_at_least(n: int) -> bool:
        return len(singles) >= n

    threads = [threading.Thread(target=predict_forever) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with server.client() as http:
            for k in range(1, 9):
                body = {"x": [1.0, 2.0, 3.0], "y": [k * 1.0, k * 2.0, k * 3.0]}
                r = http.post("/fit", json={**body, "batch_size": None, "epochs": 400})
                wait_job(http, r.json()["id"])
                # a fit takes milliseconds: let each version be read before the next one races it
                wait_until(partial(read_at_least, 8 * k), 30.0, f"predictions of fit {k}")
            jobs = http.get("/jobs", params={"limit": 100}).json()["jobs"]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    versions = {
        j["result"]["model_version"]: (j["result"]["w"], j["result"]["b"])
        for j in jobs
        if j["result"]
    }
    assert len(versions) == 8
    assert not failures
    assert len(singles) > 50
    for p in singles:
        w, b = versions[p["model_version"]]
        assert p["score"] == w * 4.0 + b
    for p in batches:
        w, b = versions[p["model_version"]]
        assert p["scores"] == [w * h + b for h in (1.0, 2.0, 4.0)]
    seen = {p["model_version"] for p in singles}
    assert len(seen) > 1  # the race really happened


def test_server_answers_problem_json_to_garbage(shared_server: Server) -> None:
    with httpx.Client(base_url=shared_server.url, timeout=10) as http:
        r = http.post("/fit", content=b"\xff\xfe garbage", headers={"content-type": "text/plain"})
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/problem+json"
        r = http.get("/predict", params={"hours": "NaN"})
        assert r.status_code == 422
