"""FastAPI dependencies: what a route takes besides its request (the lifespan's objects, auth).

The app's lifespan (service.main) yields the long-lived objects; every request gets a copy of
that dict as request.state, which routes read only through these functions (FastPredict, the
pure-ASGI fast path of GET /predict, reads the store from the same dict). Route modules declare
`store: StoreDep` and the like, and import them from here, never from each other.
"""

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.changes import Streams
from service.errors import Unauthorized
from service.jobs import Runner
from service.observability import Metrics
from service.plotter import Plotter
from service.settings import Settings
from service.store import Store


# async: FastAPI runs plain `def` dependencies in its threadpool, a hop per request
async def get_store(request: Request) -> Store:
    store: Store = request.state.store
    return store


async def get_runner(request: Request) -> Runner:
    runner: Runner = request.state.runner
    return runner


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_plotter(request: Request) -> Plotter:
    plotter: Plotter = request.state.plotter
    return plotter


async def get_streams(request: Request) -> Streams:
    streams: Streams = request.state.streams
    return streams


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.state.metrics
    return metrics


StoreDep = Annotated[Store, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PlotterDep = Annotated[Plotter, Depends(get_plotter)]
StreamsDep = Annotated[Streams, Depends(get_streams)]


async def require_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """When SGD_API_TOKEN is set, writes need `Authorization: Bearer <token>`."""
    if settings.api_token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    expected = settings.api_token.get_secret_value().encode()
    # Starlette decodes headers as latin-1; re-encoding gives the bytes that were sent.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode("latin-1"), expected):
        raise Unauthorized("send the header 'Authorization: Bearer <SGD_API_TOKEN>'")


AuthDep = Depends(require_token)
