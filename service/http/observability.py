"""Metrics (Prometheus), request ids and one structured log line per request."""

import logging
import time
import uuid
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import ServiceError
from service.core.schemas import Job, JobStatus, Model
from service.runner.base import Runner
from service.state.base import Store

access_log = logging.getLogger("sgd_service.access")
# Health probes come every few seconds from Docker, Kubernetes or a load balancer: their lines
# are written at debug, so that an info log holds what callers did.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
FIT_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 7200)


class Metrics:
    """The service's metrics in a registry of its own (one per app, no process globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sgd_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sgd_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fit_duration = Histogram(
            "sgd_fit_duration_seconds",
            "Wall time of ended fits",
            ["status"],
            buckets=FIT_BUCKETS,
            registry=r,
        )
        self.epochs_per_second = Gauge(
            "sgd_fit_epochs_per_second", "Epochs per second of the last ended fit", registry=r
        )
        self.jobs_ended = Counter(
            "sgd_jobs_ended", "Jobs that ended, by final state", ["status"], registry=r
        )

    def job_ended(self, job: Job) -> None:
        """Count an ended job; time it and its epochs per second if it ran."""
        self.jobs_ended.labels(job.status.value).inc()
        if job.started_at is None or job.finished_at is None:
            return
        seconds = (job.finished_at - job.started_at).total_seconds()
        self.fit_duration.labels(job.status.value).observe(seconds)
        if seconds > 0 and job.progress.epoch:
            self.epochs_per_second.set(job.progress.epoch / seconds)

    def watch(self, store: Store, runner: Runner) -> None:
        """Gauges read at scrape time from the store and the runner."""
        self.registry.register(_StateCollector(store, runner))


class _StateCollector(Collector):
    def __init__(self, store: Store, runner: Runner) -> None:
        self._store = store
        self._runner = runner

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._store.job_counts()
        except ServiceError:  # a shared store out of reach: leave its gauge out, serve the rest
            counts = None
        if counts is not None:
            by_state = GaugeMetricFamily(
                "sgd_jobs", "Jobs currently kept, by state", labels=["status"]
            )
            for status in JobStatus:
                by_state.add_metric([status.value], counts.get(status, 0))
            yield by_state
        yield GaugeMetricFamily(
            "sgd_queue_depth", "Jobs waiting for the worker", value=self._runner.queue_depth
        )
        model = self._store.model
        yield GaugeMetricFamily(
            "sgd_model_version",
            "Version of the served model (0: none yet)",
            value=model.version if model else 0,
        )
        yield GaugeMetricFamily(
            "sgd_ready", "1 when the job runner can take fits", value=int(self._runner.ready)
        )
        yield from self._live(model)

    def _live(self, served: Model | None) -> Iterator[GaugeMetricFamily]:
        """The live quality of the served version and the canary, labelled by version, and
        the canary's share of predictions."""
        canary = self._store.canary
        traffic = GaugeMetricFamily(
            "sgd_canary_traffic_percent", "Share of predictions the canary gets", labels=["version"]
        )
        if canary is not None:
            traffic.add_metric([str(canary.model.version)], canary.rollout.traffic)
        yield traffic
        families = {
            name: GaugeMetricFamily(f"sgd_live_{name}", text, labels=["version"])
            for name, text in (
                ("outcomes", "Outcomes in the version's quality window"),
                ("mae", "Mean absolute error over the version's recent outcomes"),
                ("rmse", "Root mean squared error over the version's recent outcomes"),
                ("coverage", "Share of recent outcomes inside the version's 90% interval"),
            )
        }
        for model in (served, None if canary is None else canary.model):
            try:
                quality = None if model is None else self._store.quality(model.version)
            except ServiceError:  # a shared store out of reach: leave it out
                quality = None
            if model is None or quality is None:
                continue
            label = [str(model.version)]
            families["outcomes"].add_metric(label, quality.outcomes)
            families["mae"].add_metric(label, quality.mae)
            families["rmse"].add_metric(label, quality.rmse)
            if quality.coverage is not None:
                families["coverage"].add_metric(label, quality.coverage)
        yield from families.values()


class RequestObserver:
    """Pure ASGI: request id in and out, latency and count by route template, one log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(elapsed)
            level = logging.DEBUG if scope["path"] in PROBE_PATHS else logging.INFO
            if access_log.isEnabledFor(level):
                access_log.log(
                    level,
                    "request",
                    extra={
                        "fields": {
                            "method": method,
                            "route": template,
                            "path": scope["path"],
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "request_id": request_id,
                        }
                    },
                )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            # a caller's id is echoed, but bounded and printable: it ends up in our logs
            text = value.decode("latin-1")[:128]
            return text if text.isprintable() and text else None
    return None
