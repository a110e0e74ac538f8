"""GET /predict's happy path as plain ASGI, in front of FastAPI.

A prediction is one multiply; FastAPI's routing, dependency injection and response validation
cost several times that, and /predict must keep up with a bare endpoint. This layer answers only
a request it fully understands (`?hours=<number as JSON writes it>` within the limit, a model
served, a finite score); everything else falls through to the FastAPI route, which owns
validation, errors and the OpenAPI description, so the two can only differ in speed.
"""

import math
import re

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

# The route's grammar (service.core.numbers.JSON_NUMBER), or less of it: a laxer one would
# answer 200 here where the route answers 422. In a query a "+" is a space: `1e+3` is the
# route's `1e 3`, which it refuses; `1e%2B3` is left to it.
_PLAIN_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE]-?[0-9]+)?")
_HEADERS = [(b"content-type", b"application/json")]


class FastPredict:
    """Answer `GET /predict?hours=<number>` from the served model without FastAPI."""

    def __init__(self, app: ASGIApp, route: BaseRoute, max_abs_value: float) -> None:
        self.app = app
        self.route = route  # the FastAPI route of GET /predict, whose answers these are
        self.max_abs_value = max_abs_value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._answer(scope) if scope["type"] == "http" else None
        if body is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # as routing would have: RequestObserver labels by it
        headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _answer(self, scope: Scope) -> bytes | None:
        if scope["path"] != "/predict" or scope["method"] != "GET":
            return None
        query: bytes = scope["query_string"]
        if not query.startswith(b"hours=") or not _PLAIN_NUMBER.fullmatch(query, 6):
            return None
        state = scope.get("state") or {}
        store = state.get("store")
        model = store.model if store is not None else None  # one read: one version
        if model is None:
            return None
        hours = float(query[6:])
        score = model.predict(hours)
        if abs(hours) > self.max_abs_value or not math.isfinite(score):
            return None
        return b'{"hours":%r,"score":%r,"model_version":%d}' % (hours, score, model.version)
