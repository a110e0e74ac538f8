"""HTTP rendering of errors: every error answer is application/problem+json (RFC 9457).

The domain errors (service.core.errors) are data; problem_response is the one place that turns an
error into a response. The exception handlers use it for domain errors, FastAPI's validation
errors and Starlette's HTTP errors, and the body-limit middleware for its 413; problems()
documents those answers in OpenAPI.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.core.errors import (
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    capped,
)
from service.core.schemas import Problem

PROBLEM_JSON = "application/problem+json"


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers a route can give."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        code: {"model": Problem, "content": {PROBLEM_JSON: {"schema": schema}}} for code in codes
    }


def problem_response(error: ServiceError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error as problem+json with its status and headers (over `headers`, the transport's).

    The response is an ASGI app too: pure ASGI middleware sends it as it is.
    """
    return JSONResponse(
        error.problem(),
        status_code=error.status,
        headers={**(headers or {}), **error.headers},
        media_type=PROBLEM_JSON,
    )


# Where FastAPI found a value; a caller names the value alone (`hours`, not `query.hours`).
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def _field(loc: Sequence[int | str]) -> str:
    parts = [str(p) for p in (loc[1:] if loc and loc[0] in _LOCATIONS else loc)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _issue(error: Any) -> dict[str, str]:
    """One offending field, named as a caller writes it: x[3], body, learning_rate."""
    if error["type"] == "json_invalid":  # loc is ("body", character offset)
        reason = error.get("ctx", {}).get("error", "")
        return {"field": "body", "message": f"not valid JSON: {reason}", "code": "json_invalid"}
    return {"field": _field(error["loc"]), "message": error["msg"], "code": error["type"]}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    # Starlette names only the first route that matched the path; callers need all of them.
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]
    return ", ".join(allowed)


def _http_error(request: Request, exc: HTTPException) -> ServiceError:
    """Starlette's HTTP error as the service's error of the same status."""
    path = request.url.path
    if exc.status_code == 404:
        return NotFound(f"no route {path}; see /docs for the API")
    if exc.status_code == 405:
        allow = _allowed_methods(request)
        return MethodNotAllowed(f"{request.method} is not allowed on {path}; use {allow}", allow)
    if exc.status_code == 413:
        return PayloadTooLarge(str(exc.detail))
    # A status the service gives no type of its own (Starlette raises none of these today).
    unnamed = type(
        "HTTPError",
        (ServiceError,),
        {"type": "http-error", "title": "HTTP error", "status": exc.status_code},
    )
    error: ServiceError = unnamed(str(exc.detail))
    return error


def install_handlers(app: FastAPI) -> None:
    """Render domain errors, validation errors and Starlette's HTTP errors as problem+json."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return problem_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [_issue(e) for e in capped(exc.errors())]
        fields = ", ".join(sorted({e["field"] for e in errors}))
        detail = f"fix these fields and retry: {fields}"
        return problem_response(InvalidInput(detail, errors))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 400:  # FastAPI's answer to a body that is not even text
            issue = {"field": "body", "message": "not UTF-8 JSON", "code": "json_invalid"}
            invalid = InvalidInput("the body must be a JSON object encoded as UTF-8", [issue])
            return problem_response(invalid)
        return problem_response(_http_error(request, exc), exc.headers)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
