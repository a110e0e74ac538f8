"""HTTP rendering of errors: every error answer is application/problem+json (RFC 9457).

The domain errors (service.errors) are data; this module turns them, FastAPI's validation errors
and Starlette's HTTP errors into responses.
"""

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.errors import InvalidInput, ServiceError

PROBLEM_JSON = "application/problem+json"

_HTTP_TYPES = {
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Request body too large"),
}


def problem_response(
    problem: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    """Render a problem object with its status and media type."""
    return JSONResponse(
        problem, status_code=problem["status"], headers=headers, media_type=PROBLEM_JSON
    )


def _field(loc: Sequence[int | str]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
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


def install_handlers(app: FastAPI) -> None:
    """Render domain errors, validation errors and Starlette's HTTP errors as problem+json."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return problem_response(exc.problem(), exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [_issue(e) for e in exc.errors()]
        fields = ", ".join(sorted({e["field"] for e in errors}))
        detail = f"fix these fields and retry: {fields}"
        return problem_response(InvalidInput(detail, errors).problem())

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 400:  # FastAPI's answer to a body that is not even text
            issue = {"field": "body", "message": "not UTF-8 JSON", "code": "json_invalid"}
            invalid = InvalidInput("the body must be a JSON object encoded as UTF-8", [issue])
            return problem_response(invalid.problem())
        type_, title = _HTTP_TYPES.get(exc.status_code, ("http-error", "HTTP error"))
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
            allow = headers["Allow"]
            detail = f"{request.method} is not allowed on {request.url.path}; use {allow}"
        elif exc.status_code == 404:
            detail = f"no route {request.url.path}; see /docs for the API"
        problem = {"type": type_, "title": title, "status": exc.status_code, "detail": detail}
        return problem_response(problem, headers)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
