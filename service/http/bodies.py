"""Routes whose JSON bodies are counted before they are parsed, and the fit's parsed elsewhere.

FastAPI reads a body whole, parses it and validates it on the event loop. For the two routes
that take lists of numbers that is where a heavy caller would stall every /predict in flight,
or make the server allocate gigabytes of Python floats for a body of zeros. Their route
classes read the body chunk by chunk first, counting its values as they go (a comma per
value), and refuse it as soon as it holds more than the route can take:

- POST /fit hands the chunks to the intake process (service.intake), which parses and checks
  them; FastAPI then gets the checked FitRequest as if it had parsed it, and runs the route.
- POST /predict hands the body (at most SGD_MAX_PREDICT_BATCH numbers, which its body limit
  also bounds) to FastAPI, which parses it as before.

Everything else is FastAPI's, and the answers to bad bodies are the ones FastAPI gave. A body
that is not JSON (by its Content-Type) is refused by FastAPI whatever it holds, so it gets
only its first chunk: the rest is never read (and on POST /fit, a caller without the token is
refused before even that).
"""

import email.message
from collections.abc import Callable, Coroutine
from typing import Any, assert_never

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from service.core.errors import InvalidInput
from service.core.settings import Settings
from service.http.deps import check_access
from service.http.intake import Accepted, Intake
from service.http.reading import NotAccepted, NotJson, NotValid, Refused, Unreadable
from service.http.turns import give_way

OTHER_VALUES = 16  # values a body holds besides its lists, with room to spare
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def error_of(refused: Refused) -> Exception:
    """What FastAPI or the route raised for a refused body when FastAPI parsed it: the same
    answers, rendered by the same handlers."""
    match refused:
        case NotJson(message, position):
            return RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", position),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": message},
                    }
                ]
            )
        case Unreadable():
            return HTTPException(status_code=400, detail="There was an error parsing the body")
        case NotValid(errors):
            return RequestValidationError(errors)
        case NotAccepted(detail, issues):
            return InvalidInput(detail, issues)
        case _:
            assert_never(refused)


class _Received(Request):
    """A request whose body its route has read already, and for a fit, checked too."""

    def __init__(self, scope: Scope, receive: Receive, body: bytes, parsed: Any = None) -> None:
        super().__init__(scope, receive)
        self._received = body
        self._parsed = parsed

    async def body(self) -> bytes:
        return self._received

    async def json(self) -> Any:
        return await super().json() if self._parsed is None else self._parsed


def _is_json(request: Request, strict: bool) -> bool:
    """Whether FastAPI would parse this body as JSON (its own test of the Content-Type)."""
    value = request.headers.get("content-type")
    if not value:
        return not strict
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def _first(request: Request) -> _Received:
    """The request with its body's first chunk as its whole body: FastAPI refuses a body that
    is not JSON for being there, not for what it holds, so the rest is not worth reading."""
    try:
        async for chunk in request.stream():
            if chunk:
                return _Received(request.scope, request.receive, chunk)
    except ClientDisconnect as e:
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
    return _Received(request.scope, request.receive, b"")


async def _counted(request: Request, most: int, refusal: InvalidInput) -> list[bytes]:
    """The body's chunks, as they arrived; raises `refusal` once it holds over `most` values."""
    chunks, values = [], 1
    try:
        async for chunk in request.stream():
            await give_way()
            values += chunk.count(b",")
            if values > most:
                refusal.headers["Connection"] = "close"  # the rest of the body is never read
                raise refusal
            if chunk:
                chunks.append(chunk)
    except ClientDisconnect as e:  # gone, or cut off by BodyLimit, which has answered 413
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
    return chunks


class _CountedRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        handle = super().get_route_handler()
        strict = bool(getattr(self.strict_content_type, "value", self.strict_content_type))

        async def route(request: Request) -> Response:
            state = request.scope.get("state") or {}
            if "intake" not in state:
                # no lifespan (an app under test that never started): FastAPI's own reading
                return await handle(request)
            await self.before_body(request, state["settings"])
            if not _is_json(request, strict):  # FastAPI refuses it as it always did
                return await handle(await _first(request))
            return await self.received(request, state["settings"], handle)

        return route

    async def before_body(self, request: Request, settings: Settings) -> None:
        """What is checked before any of the body is read."""

    async def received(self, request: Request, settings: Settings, handle: Handler) -> Response:
        raise NotImplementedError


class FitRoute(_CountedRoute):
    """POST /fit: the token first, then the body's count, then the intake process's checks."""

    async def before_body(self, request: Request, settings: Settings) -> None:
        # a caller without the token cannot make the server read 64 MiB, whatever its type
        check_access(request, "train")

    async def received(self, request: Request, settings: Settings, handle: Handler) -> Response:
        most = settings.max_samples
        refusal = InvalidInput(
            f"the body holds more than {2 * most + OTHER_VALUES:,} values; x and y take at "
            f"most SGD_MAX_SAMPLES={most:,} each: send fewer samples per fit",
            [{"field": "x", "message": "too many values", "code": "limit"}],
        )
        chunks = await _counted(request, 2 * most + OTHER_VALUES, refusal)
        if not chunks:  # FastAPI's answer: the body is missing
            return await handle(_Received(request.scope, request.receive, b""))
        intake: Intake = request.state.intake
        reply = await intake.accept(chunks, digest="idempotency-key" in request.headers)
        if not isinstance(reply, Accepted):
            raise error_of(reply)
        # FastAPI checks only that there is a body; the intake has had all of it
        checked = _Received(request.scope, request.receive, b"{}", reply.request())
        return await handle(checked)


class PredictRoute(_CountedRoute):
    """POST /predict: the scope first, then at most SGD_MAX_PREDICT_BATCH hours, counted
    before FastAPI parses them."""

    async def before_body(self, request: Request, settings: Settings) -> None:
        check_access(request, "predict")

    async def received(self, request: Request, settings: Settings, handle: Handler) -> Response:
        most = settings.max_predict_batch
        refusal = InvalidInput(
            f"at most {most} hours per request; split the request",
            [{"field": "hours", "message": "too many values", "code": "limit"}],
        )
        chunks = await _counted(request, most + OTHER_VALUES, refusal)
        return await handle(_Received(request.scope, request.receive, b"".join(chunks)))
