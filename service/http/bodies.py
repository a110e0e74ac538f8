"""JSON bodies counted before they are parsed: POST /fit's, parsed and checked elsewhere, and
POST /predict's.

FastAPI reads a body whole, parses it and validates it on the event loop. For the two routes
that take lists of numbers that is where a heavy caller would stall every /predict in flight,
or make the server allocate gigabytes of Python floats for a body of zeros. So their bodies
are read chunk by chunk first, their values counted as they come (a comma per value), and
refused as soon as they hold more than the route can take:

- POST /fit's body is read by a dependency, `fit_body`, never by FastAPI: it runs after the
  token check, hands the chunks to the intake process (service.http.intake), which parses
  and checks them, and gives the route what the intake accepted. The OpenAPI document still
  describes the body as a FitRequest (service.http.openapi.json_body).
- POST /predict's body (at most SGD_MAX_PREDICT_BATCH numbers, which its body limit also
  bounds) is read by `predict_body`, for its route (service.http.direct), and validated by
  FastAPI's own function against the route's body model.

The answers to bad bodies are the ones FastAPI gave. A body that is not JSON (by its
Content-Type) is refused whatever it holds, so only its first chunk is read: the rest never
is (and a caller without the token is refused before even that).
"""

import email.message
from typing import Annotated, Any, assert_never

from fastapi import Depends
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from pydantic_core import PydanticUndefined as Undefined
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from service.core.errors import InvalidInput
from service.core.schemas import FitRequest
from service.core.settings import Settings
from service.http.deps import IntakeDep, SettingsDep
from service.http.intake import Accepted
from service.http.reading import (
    NotAccepted,
    NotJson,
    NotRead,
    NotValid,
    Refused,
    Unreadable,
    loads,
    loads_quickly,
)
from service.http.turns import give_way

OTHER_VALUES = 16  # values a body holds besides its lists, with room to spare


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


def _strict(route: APIRoute) -> bool:
    """Whether the route takes a body without a Content-Type as not JSON (FastAPI's default)."""
    return bool(getattr(route.strict_content_type, "value", route.strict_content_type))


def _is_json(request: Request, strict: bool) -> bool:
    """Whether FastAPI would parse this body as JSON (its own test of the Content-Type)."""
    value = request.headers.get("content-type")
    if not value:
        return not strict
    if value == "application/json":  # most of them, read in 1 us rather than 20
        return True
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def _first(request: Request) -> bytes:
    """The body's first chunk, as all of it: FastAPI refuses a body that is not JSON for being
    there, not for what it holds, so the rest is not worth reading."""
    try:
        async for chunk in request.stream():
            if chunk:
                return chunk
    except ClientDisconnect as e:
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
    return b""


async def _counted(request: Request, most: int, refusal: InvalidInput) -> list[bytes]:
    """The body's chunks, as they arrived; raises `refusal` once it holds over `most` values."""
    chunks, values, steps = [], 1, 0
    try:
        async for chunk in request.stream():
            if steps:  # between two chunks: /predict goes first
                await give_way()
            steps += 1
            values += chunk.count(b",")
            if values > most:
                refusal.headers["Connection"] = "close"  # the rest of the body is never read
                raise refusal
            if chunk:
                chunks.append(chunk)
    except ClientDisconnect as e:  # gone, or cut off by BodyLimit, which has answered 413
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
    return chunks


async def fit_body(request: Request, settings: SettingsDep, intake: IntakeDep) -> Accepted:
    """POST /fit's body, counted as it arrives, then parsed and checked by the intake process.

    A dependency of the route after its token check, which FastAPI runs first: a caller
    without the token cannot make the server read 64 MiB, whatever its type. FastAPI reads no
    body for the route (it declares none), so nothing else reads this one.
    """
    if not _is_json(request, _strict(request.scope["route"])):
        raise _not_parsed(request, await _first(request))
    most = settings.max_samples
    too_many = InvalidInput(
        f"the body holds more than {2 * most + OTHER_VALUES:,} values; x and y take at "
        f"most SGD_MAX_SAMPLES={most:,} each: send fewer samples per fit",
        [{"field": "x", "message": "too many values", "code": "limit"}],
    )
    chunks = await _counted(request, 2 * most + OTHER_VALUES, too_many)
    if not chunks:
        raise _not_parsed(request, b"")
    reply = await intake.accept(chunks, digest="idempotency-key" in request.headers)
    if not isinstance(reply, Accepted):
        raise error_of(reply)
    return reply


FitBody = Annotated[Accepted, Depends(fit_body)]


def _not_parsed(request: Request, body: bytes) -> RequestValidationError:
    """FastAPI's answer to a FitRequest body that is missing or not JSON: the errors of the
    route's parameters (an Idempotency-Key too long), then the body's, in one answer."""
    dependant = request.scope["route"].dependant
    errors: list[Any] = []
    for params, received in (
        (dependant.path_params, request.path_params),
        (dependant.query_params, request.query_params),
        (dependant.header_params, request.headers),
        (dependant.cookie_params, request.cookies),
    ):
        errors += request_params_to_args(params, received)[1]
    if not body:
        errors.append({"type": "missing", "loc": ("body",), "msg": "Field required", "input": None})
    else:
        try:  # as FastAPI validates the raw bytes of a body it did not parse
            FitRequest.model_validate(body, from_attributes=True)
        except ValidationError as e:
            errors += [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
    return RequestValidationError(errors)


async def predict_body(request: Request, route: APIRoute, settings: Settings) -> dict[str, Any]:
    """POST /predict's arguments: its body, at most SGD_MAX_PREDICT_BATCH hours counted before it
    is parsed, then parsed as a fit's is (service.http.reading) and validated by FastAPI's own
    function against the route's body model: the answers FastAPI gave, errors included."""
    most = settings.max_predict_batch
    refusal = InvalidInput(
        f"at most {most} hours per request; split the request",
        [{"field": "hours", "message": "too many values", "code": "limit"}],
    )
    return await listed_body(request, route, most + OTHER_VALUES, refusal)


async def outcomes_body(request: Request, route: APIRoute, settings: Settings) -> dict[str, Any]:
    """POST /outcomes' arguments, read as POST /predict's are: hours and score, at most
    SGD_MAX_PREDICT_BATCH of each."""
    most = settings.max_predict_batch
    refusal = InvalidInput(
        f"at most {most} outcomes per request; split the request",
        [{"field": "hours", "message": "too many values", "code": "limit"}],
    )
    return await listed_body(request, route, 2 * most + OTHER_VALUES, refusal)


async def listed_body(
    request: Request, route: APIRoute, most: int, refusal: InvalidInput
) -> dict[str, Any]:
    """A route's body of lists of numbers: refused (`refusal`) past `most` values, counted
    before it is parsed; parsed and validated as predict_body says."""
    if not _is_json(request, _strict(route)):  # validated as the bytes it is, and refused
        received: Any = await _first(request) or Undefined
    else:
        body = b"".join(await _counted(request, most, refusal))
        try:
            received = loads_quickly(body) if body else Undefined  # no body: FastAPI's missing
        except NotRead as e:
            raise error_of(e.refused) from None
    # one body model, not embedded: the body is the model
    values, errors = await request_body_to_args(route.dependant.body_params, received, False)
    if errors and isinstance(received, dict | list):
        # orjson read it: the standard library's reading, and its refusals (lists nested
        # deeper than it goes), as the route always answered
        try:
            received = loads(body)
        except NotRead as e:
            raise error_of(e.refused) from None
        values, errors = await request_body_to_args(route.dependant.body_params, received, False)
    if errors:
        raise RequestValidationError(errors)
    return values
