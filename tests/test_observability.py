"""Metrics scraped and parsed with prometheus-client's own parser; request ids; JSON log lines."""

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TUTORIAL, Server, wait_job, wait_until


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_requests_jobs_and_the_model(client: TestClient) -> None:
    job = wait_job(client, client.post("/fit", json=TUTORIAL).json()["id"])
    before = scrape(client)
    key = ("sgd_http_requests_total", (("method", "GET"), ("route", "/predict"), ("status", "200")))
    for _ in range(3):
        assert client.get("/predict", params={"hours": 4}).status_code == 200
    client.get("/predict", params={"hours": "x"})
    client.get("/jobs/some-unknown-id")
    after = scrape(client)
    assert after[key] - before.get(key, 0) == 3
    bad = ("sgd_http_requests_total", (("method", "GET"), ("route", "/predict"), ("status", "422")))
    assert after[bad] - before.get(bad, 0) == 1
    # an unknown id is counted under its route template, not its path
    nf = ("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "404")
    assert after[("sgd_http_requests_total", nf)] >= 1
    count = ("sgd_http_request_duration_seconds_count", (("method", "GET"), ("route", "/predict")))
    assert after[count] - before.get(count, 0) == 4
    assert after[("sgd_model_version", ())] == job["result"]["model_version"]
    assert after[("sgd_jobs", (("status", "succeeded"),))] >= 1
    assert after[("sgd_queue_depth", ())] == 0
    assert after[("sgd_ready", ())] == 1
    assert after[("sgd_fit_duration_seconds_count", (("status", "succeeded"),))] >= 1
    assert after[("sgd_fit_epochs_per_second", ())] > 0
    assert after[("sgd_jobs_ended_total", (("status", "succeeded"),))] >= 1


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    # an id that does not belong in a log line is replaced
    odd = client.get("/healthz", headers={"X-Request-ID": "a\tb"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", odd)


def test_one_json_line_per_request_and_per_job_transition(shared_server: Server) -> None:
    with shared_server.client() as http:
        job = wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
        http.get("/predict", params={"hours": 4}, headers={"X-Request-ID": "trace-me"})

    def lines() -> list[dict[str, Any]]:
        return [
            json.loads(line) for line in shared_server.log().splitlines() if line.startswith("{")
        ]

    # the request's line is written once its response has gone, so it may trail the response
    wait_until(lambda: any(x.get("request_id") == "trace-me" for x in lines()), 10.0, "log line")
    requests = [x for x in lines() if x.get("request_id") == "trace-me"]
    assert len(requests) == 1
    line = requests[0]
    assert line["method"] == "GET"
    assert line["route"] == "/predict"
    assert line["status"] == 200
    assert line["duration_ms"] >= 0

    def transitions() -> list[str]:
        return [x["status"] for x in lines() if x.get("job_id") == job["id"]]

    # in Redis mode the worker process writes them, and may write the end after a reader saw it
    wait_until(lambda: "succeeded" in transitions(), 10.0, "the job's last log line")
    assert transitions() == ["running", "succeeded"]
    assert any("no token is set (SGD_API_TOKEN, SGD_TOKENS_FILE)" in x["msg"] for x in lines())


def test_probes_are_logged_at_debug_only(make_server: Callable[..., Server]) -> None:
    """A healthcheck every 10 s must not fill an info log; at debug its lines are there."""
    for level, expected in (("info", []), ("debug", ["debug", "debug"])):
        srv = make_server(SGD_LOG_LEVEL=level)
        with srv.client() as http:
            http.get("/healthz", headers={"X-Request-ID": "probe"})
            http.get("/readyz", headers={"X-Request-ID": "probe"})
            http.get("/model", headers={"X-Request-ID": "after-the-probes"})

        def lines(log: str = srv.log_path) -> list[dict[str, Any]]:
            with open(log) as f:
                return [json.loads(x) for x in f if x.startswith("{")]

        wait_until(lambda: any(x.get("request_id") == "after-the-probes" for x in lines()))
        srv.stop()
        assert [x["level"] for x in lines() if x.get("request_id") == "probe"] == expected
