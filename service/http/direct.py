"""The prediction routes, served without FastAPI's request handling: GET and POST /predict and
the /v2 inference routes.

A prediction is a multiply; FastAPI's routing (35 to 90 us for these paths: the routes are
tried one by one, included routers inside), dependency injection and response validation cost
many times that. These routes are still FastAPI routes: FastAPI documents them from their
endpoints' signatures, and their errors are rendered by the app's handlers. But their requests
are read by the route class's own `read`, which gives the endpoint its arguments (validated
with the same pydantic models and FastAPI's own parameter checks), and the endpoints answer
with a Response they render themselves. `Shortcut`, in front of FastAPI's own layers, hands a
request for one of these paths straight to its route.

One handler each: a request that reaches them through the router (another model's name, say)
is served by the same code.
"""

import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.settings import Scope as AccessScope
from service.core.settings import Settings
from service.http.deps import check_access, needed_scope

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class DirectRoute(APIRoute):
    """A route whose endpoint takes what `read` gives it, plus the store and the settings,
    and returns the Response itself."""

    async def read(self, request: Request, settings: Settings) -> dict[str, Any]:
        """The endpoint's arguments, read from the request (raises the route's errors)."""
        raise NotImplementedError

    def get_route_handler(self) -> Handler:
        endpoint, read = self.endpoint, self.read
        needs: AccessScope | None = needed_scope(self.dependant)

        async def handle(request: Request) -> Response:
            state = request.scope["state"]
            settings: Settings = state["settings"]
            if needs is not None and not state["access"].is_open(needs):
                check_access(request, needs)  # first, as FastAPI runs dependencies=[...]
            arguments = await read(request, settings)
            response: Response = await endpoint(
                **arguments, store=state["store"], settings=settings
            )
            return response

        return handle

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The route as an ASGI app: its handler, its errors rendered by the app's handlers
        as FastAPI's exception middleware renders them, so that `Shortcut` can call it from
        outside that middleware."""
        request = Request(scope, receive)
        try:
            response = await self.handle_request(request)
        except Exception as exc:
            response = await _rendered(request, exc)
        await response(scope, receive, send)

    @functools.cached_property
    def handle_request(self) -> Handler:
        return self.get_route_handler()


async def _rendered(request: Request, exc: Exception) -> Response:
    """The answer the app's exception handlers give to this error (as Starlette looks them
    up: a status code's handler for an HTTPException, then by the error's classes); raises
    it again when none does, for the outermost layer's 500."""
    handlers = request.app.exception_handlers
    handler = None
    if isinstance(exc, HTTPException) and exc.status_code != 500:  # 500: the outermost layer's
        handler = handlers.get(exc.status_code)
    for cls in type(exc).__mro__:
        if handler is not None:
            break
        handler = handlers.get(cls) if cls is not Exception else None
    if handler is None:
        raise exc
    response: Response = await handler(request, exc)
    return response


def json_answer(body: bytes, headers: dict[str, str] | None = None) -> Response:
    """A 200 with this JSON body, written by the endpoint."""
    return Response(body, media_type="application/json", headers=headers)


def query_arguments(route: APIRoute, request: Request) -> dict[str, Any]:
    """The route's query parameters as FastAPI reads and validates them (its own function),
    or its RequestValidationError."""
    values, errors = request_params_to_args(route.dependant.query_params, request.query_params)
    if errors:
        raise RequestValidationError(errors)
    return values


class Shortcut:
    """Routing for the prediction routes, in front of FastAPI's own layers: a request for one
    of them goes straight to its route (`DirectRoute.serve`); any other goes on to FastAPI,
    whose router finds it, or finds the same route (another model's name, say)."""

    def __init__(self, app: ASGIApp, routes: Sequence[DirectRoute]) -> None:
        self.app = app
        self.exact = {
            (method, route.path): route
            for route in routes
            if "{" not in route.path
            for method in route.methods or ()
        }
        self.infer = {r.path: r for r in routes if "{" in r.path and "POST" in (r.methods or ())}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):  # else: the router's reading
            route, params = self._match(scope["method"], scope["path"])
            if route is not None:
                scope["route"] = route  # as routing would have: RequestObserver labels by it
                scope["endpoint"] = route.endpoint
                scope["path_params"] = params
                await route.serve(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _match(self, method: str, path: str) -> tuple[DirectRoute | None, dict[str, str]]:
        route = self.exact.get((method, path))
        if route is not None:
            return route, {}
        if method != "POST" or not path.startswith("/v2/models/") or not path.endswith("/infer"):
            return None, {}
        # /v2/models/{name}/infer or /v2/models/{name}/versions/{version}/infer, each
        # parameter one path segment at least a character long, as the router reads them
        parts = path[len("/v2/models/") : -len("/infer")].split("/")
        if len(parts) == 1 and parts[0]:
            template, params = "/v2/models/{name}/infer", {"name": parts[0]}
        elif len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
            template = "/v2/models/{name}/versions/{version}/infer"
            params = {"name": parts[0], "version": parts[2]}
        else:
            return None, {}
        return self.infer.get(template), params
