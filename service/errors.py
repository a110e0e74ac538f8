"""Domain errors (no HTTP in them) and the one handler that renders every error as problem+json."""

from collections.abc import Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

PROBLEM_JSON = "application/problem+json"


class ServiceError(Exception):
    """Base of every error a caller can see; `type` is a stable, documented identifier."""

    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        self.headers: dict[str, str] = {}

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem object for this error."""
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


class InvalidInput(ServiceError):
    type = "validation-error"
    title = "The request is not valid"
    status = 422

    def __init__(self, detail: str, errors: Sequence[dict[str, Any]]) -> None:
        super().__init__(detail, errors=list(errors))


class IdempotencyKeyReused(ServiceError):
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused with another body"
    status = 422


class ModelNotReady(ServiceError):
    type = "model-not-ready"
    title = "No model has been trained yet"
    status = 503


class PredictionOutOfRange(ServiceError):
    type = "prediction-out-of-range"
    title = "The prediction is not a finite number"
    status = 422


class JobNotFound(ServiceError):
    type = "job-not-found"
    title = "No such job"
    status = 404


class HistoryNotFound(ServiceError):
    type = "history-not-found"
    title = "No history yet"
    status = 404


class JobAlreadyEnded(ServiceError):
    type = "job-ended"
    title = "The job has already ended"
    status = 409


class QueueFull(ServiceError):
    type = "queue-full"
    title = "Too many queued jobs"
    status = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = str(retry_after)


class ShuttingDown(ServiceError):
    type = "shutting-down"
    title = "The service is shutting down"
    status = 503


class NotReady(ServiceError):
    type = "not-ready"
    title = "The service cannot take work"
    status = 503


class Unauthorized(ServiceError):
    type = "unauthorized"
    title = "Missing or wrong bearer token"
    status = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["WWW-Authenticate"] = 'Bearer realm="sgd-service"'


class Diverged(ServiceError):
    """Raised by the engine when the loss or a parameter stops being a finite number."""

    type = "diverged"
    title = "The fit diverged"
    status = 422

    def __init__(self, epoch: int, learning_rate: float) -> None:
        super().__init__(
            f"loss or parameters became non-finite at epoch {epoch}; retry with a smaller "
            f"learning_rate than {learning_rate:g} (e.g. {learning_rate / 10:g})",
            epoch=epoch,
        )
        self.epoch = epoch


class JobTimedOut(ServiceError):
    type = "timeout"
    title = "The fit ran out of time"
    status = 504

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the fit ran longer than SGD_JOB_TIMEOUT={seconds:g}s and was stopped; ask for "
            "fewer epochs or a smaller batch_size"
        )


class WorkerCrashed(ServiceError):
    type = "worker-crashed"
    title = "The training worker stopped unexpectedly"
    status = 500


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
