"""The app factory: create_app(settings) wires routes and handlers; its lifespan owns the state."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import __version__, api, views
from service.errors import install_handlers
from service.jobs import JobRunner
from service.middleware import BodyLimit
from service.settings import Settings
from service.store import MemoryStore


class State(TypedDict):
    store: MemoryStore
    runner: JobRunner
    settings: Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; nothing starts until the app's lifespan does."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        store = MemoryStore(keep_jobs=settings.keep_jobs)
        runner = JobRunner(store, settings)
        await run_in_threadpool(runner.start)
        app.state.runner = runner  # for the SIGTERM handler, which runs outside any request
        try:
            yield {"store": store, "runner": runner, "settings": settings}
        finally:
            await run_in_threadpool(runner.stop)

    app = FastAPI(
        title="sgd-service",
        version=__version__,
        summary="Fits y = w*x (+ b) by SGD with PyTorch autograd and serves its predictions.",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.include_router(api.router)
    app.include_router(views.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
