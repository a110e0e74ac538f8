"""The app factory: create_app(settings) wires routes and handlers; its lifespan owns the state."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict

from fastapi import FastAPI, Request, Response
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.core import intervals
from service.core.errors import ServiceError
from service.core.settings import Settings
from service.http import api, oip, outcomes, views
from service.http.access import Access
from service.http.deps import document_access
from service.http.direct import DirectRoute, Shortcut
from service.http.intake import Intake
from service.http.middleware import (
    PAGE_CSP,
    SECURITY_HEADERS,
    AllowedHosts,
    BodyLimit,
    SecurityHeaders,
)
from service.http.observability import Metrics, RequestObserver
from service.http.openapi import document_bodies, document_limits
from service.http.plotter import Plotter
from service.http.problems import install_handlers, problem_response
from service.http.streams import Streams
from service.runner.base import Runner
from service.runner.local import JobRunner
from service.state.base import Store
from service.state.memory import MemoryStore

log = logging.getLogger("sgd_service")
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")  # where FastAPIOffline serves them


class State(TypedDict):
    """The long-lived objects, in one place: what the lifespan yields. Each request gets a copy
    as request.state (read in service.http.deps); DrainingServer finds the runner where
    uvicorn keeps it."""

    store: Store
    runner: Runner
    access: Access
    settings: Settings
    metrics: Metrics
    intake: Intake
    plotter: Plotter
    streams: Streams


def _state(settings: Settings, metrics: Metrics) -> tuple[Store, Runner]:
    """The store and the runner: in this process's memory, or shared in Redis."""
    if settings.redis_url is None:
        store = MemoryStore(
            keep_jobs=settings.keep_jobs,
            keep_versions=settings.keep_versions,
            keep_outcomes=settings.keep_outcomes,
            quality_window=settings.quality_window,
            keep_fit_rows=settings.retrain_fit_rows,
        )
        return store, JobRunner(store, settings, on_end=metrics.job_ended)
    from service.runner.fleet import QueueRunner  # imports redis only in Redis mode
    from service.state.redis import RedisStore

    shared = RedisStore.from_settings(settings, on_end=metrics.job_ended)
    return shared, QueueRunner(shared, settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; nothing starts until the app's lifespan does."""
    settings = settings or Settings()
    metrics = Metrics()
    access = Access(settings)  # a bad SGD_TOKENS_FILE stops start-up here

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        if access.is_open("train"):
            log.warning(
                "no token is set (SGD_API_TOKEN, SGD_TOKENS_FILE): anyone who reaches the "
                "service can start fits"
            )
        store, runner = _state(settings, metrics)
        metrics.watch(store, runner)
        runner.start()
        intervals.warm_up()  # the t quantile's code, imported now rather than on a request
        intake = Intake(settings)
        plotter = Plotter(settings.worker_nice, settings.worker_sched_idle)
        try:
            yield {
                "store": store,
                "runner": runner,
                "access": access,
                "settings": settings,
                "metrics": metrics,
                "intake": intake,
                "plotter": plotter,
                "streams": Streams(settings.max_streams, settings.max_job_streams),
            }
        finally:
            await run_in_threadpool(plotter.close)
            await run_in_threadpool(intake.close)
            await run_in_threadpool(runner.stop)

    # FastAPIOffline: /docs and /redoc load their JavaScript and CSS from this service (a pinned
    # package ships them), not from a CDN, so they work on a machine without internet access.
    app = FastAPIOffline(
        title="sgd-service",
        version=__version__,
        summary="Fits y = w*x (+ b) by SGD with PyTorch autograd and serves its predictions.",
        lifespan=lifespan,
    )
    install_handlers(app)

    async def on_bug(request: Request, exc: Exception) -> Response:
        # Starlette's outermost layer answers a bug, outside every middleware of ours: the
        # answer says what happened as problem+json, with the headers every answer carries.
        error = ServiceError(
            "the service failed on this request (the log has it); retry, and report it if "
            "it happens again"
        )
        headers = dict(
            (name.decode(), value.decode())
            for name, value in [*SECURITY_HEADERS, (b"content-security-policy", PAGE_CSP.encode())]
        )
        return problem_response(error, headers)

    app.add_exception_handler(Exception, on_bug)
    routers = (api.router, outcomes.router, views.router, oip.router)
    for router in routers:
        app.include_router(router)
    # the prediction routes, found before FastAPI's layers and its router's scan of every route
    direct = [r for router in routers for r in router.routes if isinstance(r, DirectRoute)]
    app.add_middleware(Shortcut, routes=direct)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        max_predict_batch=settings.max_predict_batch,
    )
    app.add_middleware(AllowedHosts, hosts=settings.allowed_hosts)
    app.add_middleware(oip.ProtocolErrors)  # /v2's errors, the two above's too, as {"error"}
    app.add_middleware(SecurityHeaders, docs_paths=DOCS_PATHS)  # on every answer
    app.add_middleware(RequestObserver, metrics=metrics)  # outermost: sees every answer

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = document_bodies(FastAPI.openapi(app), api.BODIES + outcomes.BODIES)
            spec = document_limits(spec, settings)
            spec = document_access(spec, [r for router in routers for r in router.routes], access)
            app.openapi_schema = oip.document(spec, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
