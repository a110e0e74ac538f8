"""Domain errors: plain Python, no web framework.

Each error is data: a stable `type`, a `title`, the `status` a caller gets, `headers` it needs
(Allow, Retry-After, WWW-Authenticate) and an RFC 9457 problem object. service.problems renders
them over HTTP; the engine, the worker, the store and the runner import them without importing
the web stack (tests/test_layers.py).
"""

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar


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


# Validation errors listed in one answer: a body of a million nulls is a million errors, and
# listing them all made a 2 MB body a 38 MB answer. The rest are counted, not listed.
MAX_LISTED_ERRORS = 20


def capped(errors: Sequence[dict[str, Any]], total: int | None = None) -> list[dict[str, Any]]:
    """The first MAX_LISTED_ERRORS of pydantic-style errors (type, loc, msg), and one more that
    counts the rest of `total` (default: all of `errors`); a list capped already stays."""
    if errors and errors[-1]["type"] == "too_many_errors":
        return list(errors)
    total = len(errors) if total is None else total
    listed = list(errors[:MAX_LISTED_ERRORS])
    if total > len(listed):
        more = total - len(listed)
        listed.append(
            {
                "type": "too_many_errors",
                "loc": ("body",),
                "msg": f"{more} more error{'s' if more > 1 else ''} like these not listed",
            }
        )
    return listed


class InvalidInput(ServiceError):
    type = "validation-error"
    title = "The request is not valid"
    status = 422

    def __init__(self, detail: str, errors: Sequence[dict[str, Any]]) -> None:
        super().__init__(detail, errors=list(errors))


class NotFound(ServiceError):
    """Nothing at this path: no route, or no such static asset."""

    type = "not-found"
    title = "Not found"
    status = 404


class AssetNotFound(NotFound):
    """The page asked for a static asset the service does not have."""


class MethodNotAllowed(ServiceError):
    type = "method-not-allowed"
    title = "Method not allowed"
    status = 405

    def __init__(self, detail: str, allow: str) -> None:
        super().__init__(detail)
        self.headers["Allow"] = allow


class HostNotAllowed(ServiceError):
    """The request's Host is none the service answers to (a guard against DNS rebinding)."""

    type = "host-not-allowed"
    title = "Host not allowed"
    status = 400


class PayloadTooLarge(ServiceError):
    type = "payload-too-large"
    title = "Request body too large"
    status = 413


class IdempotencyKeyReused(ServiceError):
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused with another body"
    status = 422


class ModelNotReady(ServiceError):
    type = "model-not-ready"
    title = "No model has been trained yet"
    status = 503


class VersionNotFound(ServiceError):
    type = "version-not-found"
    title = "No such model version"
    status = 404


class NothingServed(ServiceError):
    type = "nothing-served"
    title = "No model is served to start from"
    status = 409


class IntervalUnavailable(ServiceError):
    """The model version cannot answer the interval asked for (a method it has no data for)."""

    type = "interval-unavailable"
    title = "This model version has no such interval"
    status = 409


class RolloutConflict(ServiceError):
    """A canary rollout that cannot start or end as asked (another one runs, or none does)."""

    type = "rollout-conflict"
    title = "This rollout conflicts with the one running"
    status = 409


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


class StoreUnavailable(ServiceError):
    """The shared store (Redis) cannot be reached; predictions still come from memory."""

    type = "store-unavailable"
    title = "The shared store is unreachable"
    status = 503

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = "1"


class Fenced(ServiceError):
    """A worker's attempt at a job is no longer the current one (it was paused or cut off past
    its lease and the job was run again): none of its writes may land."""

    type = "fenced"
    title = "This attempt no longer owns the job"
    status = 409


class Unauthorized(ServiceError):
    type = "unauthorized"
    title = "Missing or wrong bearer token"
    status = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["WWW-Authenticate"] = 'Bearer realm="sgd-service"'


class MalformedRequest(ServiceError):
    """What uvicorn's HTTP parser refused: the request never reached the app."""

    type = "malformed-request"
    title = "Not a valid HTTP/1.1 request"
    status = 400


class RequestTimeout(ServiceError):
    type = "request-timeout"
    title = "The request took too long to arrive"
    status = 408


class TooManyConnections(ServiceError):
    type = "too-many-connections"
    title = "The service holds as many connections as it takes"
    status = 503

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = "1"


class TooManyStreams(ServiceError):
    type = "too-many-streams"
    title = "Too many event streams"
    status = 503

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = "5"


class TooManyPlots(ServiceError):
    type = "too-many-plots"
    title = "Too many plots to draw"
    status = 503


class InsufficientScope(ServiceError):
    type = "insufficient-scope"
    title = "The token does not hold the scope this needs"
    status = 403

    def __init__(self, scope: str, held: Iterable[str]) -> None:
        super().__init__(
            f"this needs the {scope!r} scope, and the token holds "
            f"{', '.join(sorted(held))}: use a token that holds {scope!r}",
            scope=scope,
        )
        self.headers["WWW-Authenticate"] = (
            f'Bearer realm="sgd-service", error="insufficient_scope", scope="{scope}"'
        )


class CrossSiteWrite(ServiceError):
    type = "cross-site-write"
    title = "A page on another site may not change this service"
    status = 403


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

    @classmethod
    def every_attempt(cls, deaths: int, limit: int, attempts: int, last: str) -> "WorkerCrashed":
        """A fit whose worker died `deaths` times, its attempts spent: one shape in both modes
        (the in-memory runner's and Redis mode's), with the job's `attempts` as a member."""
        return cls(
            f"the training worker died {deaths} times running this fit "
            f"(SGD_JOB_ATTEMPTS={limit}), last: {last}; if it needs more memory than a "
            "worker has, ask for fewer samples or a smaller batch_size",
            attempts=attempts,
        )
