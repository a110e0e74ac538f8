"""FastAPI dependencies: what a route takes besides its request (the lifespan's objects, auth).

The app's lifespan (service.http.app) yields the long-lived objects; every request gets a copy of
that dict as request.state, which routes read only through these functions (the prediction
routes of service.http.direct read the same dict). Route modules declare
`store: StoreDep` and the like, and import them from here, never from each other.
"""

from typing import Annotated, Any

from fastapi import Depends, Request

from service.core.settings import Scope, Settings
from service.http.access import WRITES, Access
from service.http.intake import Intake
from service.http.observability import Metrics
from service.http.plotter import Plotter
from service.http.streams import Streams
from service.runner.base import Runner
from service.state.base import Store


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


async def get_intake(request: Request) -> Intake:
    intake: Intake = request.state.intake
    return intake


StoreDep = Annotated[Store, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PlotterDep = Annotated[Plotter, Depends(get_plotter)]
StreamsDep = Annotated[Streams, Depends(get_streams)]
IntakeDep = Annotated[Intake, Depends(get_intake)]


def check_access(request: Request, scope: Scope) -> None:
    """Raise the 401, 403 or cross-site 403 unless this request may act in `scope`."""
    access: Access = request.state.access
    headers = request.headers
    access.require(
        scope,
        headers.get("authorization"),
        headers.get("host"),
        headers.get("origin"),
        headers.get("sec-fetch-site"),
    )


class _Needs:
    """A route's dependency on a scope; `scope` tells the OpenAPI document which (main.py)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(self, request: Request) -> None:
        check_access(request, self.scope)


# dependencies=[READ] and the like: every route needs one, or is open by design (health, page)
PREDICT: Any = Depends(_Needs("predict"))
READ: Any = Depends(_Needs("read"))
TRAIN: Any = Depends(_Needs("train"))
ADMIN: Any = Depends(_Needs("admin"))


def needed_scope(dependant: Any) -> Scope | None:
    """The scope a route's dependencies=[...] need, or None for an open route."""
    needs = [d.call for d in dependant.dependencies if isinstance(d.call, _Needs)]
    return needs[0].scope if needs else None


def document_access(spec: dict[str, Any], routes: list[Any], access: Access) -> dict[str, Any]:
    """State in the OpenAPI document which routes need a token (their scope is not open) and
    the 401 and 403 they answer then; and the cross-site 403 of every write."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    secured = False
    for route in routes:
        dependant = getattr(route, "dependant", None)
        scope = None if dependant is None else needed_scope(dependant)
        if scope is None:
            continue
        for method in route.methods:
            operation = spec["paths"][route.path_format][method.lower()]
            answers = operation.setdefault("responses", {})
            if scope in WRITES:
                answers.setdefault("403", {"description": "Forbidden", "content": problem})
            if not access.is_open(scope):
                secured = True
                operation["security"] = [{"bearer": [scope]}]
                answers.setdefault("401", {"description": "Unauthorized", "content": problem})
                answers.setdefault("403", {"description": "Forbidden", "content": problem})
    if secured:
        spec.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "SGD_API_TOKEN (every scope) or a token of SGD_TOKENS_FILE",
        }
    return spec
