"""A typed client for sgd-service over an httpx client the caller provides (sync and async).

The caller owns the transport: base URL, timeouts, the `Authorization` header when the service
has SGD_API_TOKEN set. Every error answer is raised as a `ProblemError` carrying the problem.

    with httpx.Client(base_url="http://127.0.0.1:8000", timeout=10) as http:
        sgd = SGDClient(http)
        job = sgd.wait(sgd.fit([1, 2, 3], [2, 4, 6]).id, timeout=60)
        print(sgd.predict(4))
        print(sgd.predict_interval(4, 0.9).interval)  # lower, upper, coverage, method
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TextIO, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from service.core.schemas import (
    History,
    Job,
    JobStatus,
    Model,
    ModelList,
    ModelVersion,
    OutcomesReceipt,
    Prediction,
    Predictions,
    Problem,
    ProgressEvent,
)

T = TypeVar("T")
R = TypeVar("R")
Event = ProgressEvent | Job  # what `events` yields: progress, then the ended job
ImageFormat = Literal["png", "svg"]
Publish = Literal["always", "never", "if_better"]
Method = Literal["conformal", "gaussian"]  # how an interval is computed (predict_interval)

# An event stream that drops is resumed (Last-Event-ID): at once if it had delivered an event,
# else after a back-off that doubles from RECONNECT_DELAY; RECONNECTS drops in a row without an
# event (about 1.5 s of retrying) end it.
RECONNECTS = 5
RECONNECT_DELAY, RECONNECT_DELAY_MAX = 0.1, 2.0
POLL_MIN, POLL_MAX = 0.05, 0.5  # wait(): polls start fast and back off
# wait(progress=...) at its deadline: the job's state for WaitTimeout is asked for this long
LAST_STATE_LIMIT = 1.0


class FitOptions(TypedDict, total=False):
    """POST /fit's optional fields, sent only when given; batch_size None means every sample
    each epoch."""

    epochs: int
    learning_rate: float
    init_w: float
    batch_size: int | None
    fit_intercept: bool
    seed: int
    # the share of rows held out (chosen with the seed), 0..0.5: metrics gain val_mse, val_r2
    validation_fraction: float
    # early stopping, as scikit-learn's: stop after n_iter_no_change epochs (default 5) whose
    # loss improves on the best by less than tol; None: off
    tol: float | None
    n_iter_no_change: int
    # never: keep the version unserved; if_better: serve it only if its val_mse beats the
    # served model's on the same held-out rows (needs validation_fraction)
    publish: Publish
    # warm start from the served model or a kept version, instead of init_w
    init_from: Literal["served"] | int


# -- errors ---------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of every error this client raises."""


class TransportFailed(ClientError):
    """The service could not be reached, or the connection broke."""


class UnexpectedResponse(ClientError):
    """An answer that is not the service's (e.g. a proxy's HTML error page)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"unexpected HTTP {status} answer: {text[:200]!r}")
        self.status = status


class WaitTimeout(ClientError):
    """wait() reached its deadline before the job ended; `job` is its last state."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.id} is still {job.status.value} after {timeout:g}s")
        self.job = job


class ProblemError(ClientError):
    """The service answered with a problem (RFC 9457): `problem` holds every member of it."""

    def __init__(self, problem: Problem, headers: httpx.Headers) -> None:
        super().__init__(f"{problem.status} {problem.type}: {problem.detail}")
        self.problem = problem
        self.status = problem.status
        self.type = problem.type
        self.detail = problem.detail
        self.headers = headers


class UnauthorizedError(ProblemError):
    """401: the service wants `Authorization: Bearer <token>` on the httpx client."""


class NotFoundError(ProblemError):
    """404: no such job, no history yet, or no such route."""


class ConflictError(ProblemError):
    """409: e.g. cancelling a job that has already ended."""


class InvalidRequestError(ProblemError):
    """422: the problem's `errors` name each offending field."""


class QueueFullError(ProblemError):
    """429: retry after `retry_after` seconds."""

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("Retry-After")
        return float(value) if value and value.isdigit() else None


class UnavailableError(ProblemError):
    """503: the service is starting or draining."""


class ModelNotReadyError(UnavailableError):
    """503 model-not-ready: no fit has succeeded yet."""


_BY_STATUS: dict[int, type[ProblemError]] = {
    401: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
    429: QueueFullError,
    503: UnavailableError,
}
_BY_TYPE: dict[str, type[ProblemError]] = {"model-not-ready": ModelNotReadyError}


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = Problem.model_validate_json(response.content)
    except ValidationError:
        raise UnexpectedResponse(response.status_code, response.text) from None
    raise _error_for(problem, response.headers)


def _error_for(problem: Problem, headers: httpx.Headers) -> ProblemError:
    cls = _BY_TYPE.get(problem.type) or _BY_STATUS.get(problem.status, ProblemError)
    return cls(problem, headers)


def _model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    def parse(response: httpx.Response) -> Any:
        try:
            return cls.model_validate_json(response.content)
        except ValidationError:
            raise UnexpectedResponse(response.status_code, response.text) from None

    return parse


# -- one request, described once for both clients --------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    url: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def request(
        self, http: httpx.Client | httpx.AsyncClient, limits: httpx.Timeout | None
    ) -> httpx.Request:
        """The request on `http`, with its time limits unless `limits` bounds them."""
        return http.build_request(
            self.method,
            self.url,
            params=self.params,
            json=self.body,
            headers=self.headers,
            timeout=limits or http.timeout,
        )

    def result(self, response: httpx.Response) -> T:
        _raise_for(response)
        return self.parse(response)


def _fit_call(
    x: Sequence[float], y: Sequence[float], idempotency_key: str | None, options: FitOptions
) -> _Call[Job]:
    # Only what the caller set is sent: the service's defaults are the tutorial's.
    body = {"x": list(x), "y": list(y), **options}
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    return _Call("POST", "/fit", _model(Job), body=body, headers=headers)


def _job_path(job_id: str, *rest: str) -> str:
    """/jobs/{job_id}[/rest]: the id is one path segment whatever it holds ("../model", "a?b")."""
    segment = quote(job_id, safe="")
    if segment in (".", ".."):  # a dot segment would be resolved away by the URL, not sent
        segment = segment.replace(".", "%2E")
    return "/".join(("/jobs", segment, *rest))


def _job_call(job_id: str) -> _Call[Job]:
    return _Call("GET", _job_path(job_id), _model(Job))


def _cancel_call(job_id: str) -> _Call[Job]:
    return _Call("POST", _job_path(job_id, "cancel"), _model(Job))


PREDICTION_ID_HEADER = "X-Prediction-Id"  # v{version}-{16 hex}: for record_outcomes


def _caller_key(key: str | None) -> dict[str, str]:
    """The X-Caller-Key header: during a canary rollout the same key always gets the same
    version. An HTTP header carries visible ASCII only, and trims spaces at its ends: such a
    key could not be sent as it is, so it is refused here, not sent as another key."""
    if key is None:
        return {}
    if not (key and key.isascii() and key.isprintable() and key == key.strip()):
        raise ValueError(f"a caller key is visible ASCII without spaces at its ends: {key!r}")
    return {"X-Caller-Key": key}


def _predict_params(hours: float, version: int | None) -> dict[str, Any]:
    return {"hours": hours} | ({} if version is None else {"version": version})


def _predict_call(hours: float, version: int | None, key: str | None) -> _Call[Prediction]:
    params = _predict_params(hours, version)
    return _Call("GET", "/predict", _model(Prediction), params=params, headers=_caller_key(key))


def _with_prediction_id(
    parse: Callable[[httpx.Response], T],
) -> Callable[[httpx.Response], tuple[T, str]]:
    """`parse`, and the answer's X-Prediction-Id: an answer without one (a service that predates
    outcomes) is refused, as a prediction id made up here would name no answer."""

    def parse_with_id(response: httpx.Response) -> tuple[T, str]:
        prediction_id = response.headers.get(PREDICTION_ID_HEADER)
        if not prediction_id:
            raise UnexpectedResponse(response.status_code, response.text)
        return parse(response), prediction_id

    return parse_with_id


def _predict_with_id_call(
    hours: float, version: int | None, key: str | None
) -> _Call[tuple[Prediction, str]]:
    parse = _with_prediction_id(_model(Prediction))
    params = _predict_params(hours, version)
    return _Call("GET", "/predict", parse, params=params, headers=_caller_key(key))


def _predict_many_call(
    hours: Sequence[float], version: int | None, key: str | None
) -> _Call[Predictions]:
    body = {"hours": list(hours)} | ({} if version is None else {"version": version})
    return _Call("POST", "/predict", _model(Predictions), body=body, headers=_caller_key(key))


def _interval_options(
    coverage: float, method: Method | None, version: int | None
) -> dict[str, Any]:
    """What an interval request adds: coverage always, method and version only when given (the
    service's defaults: the version's first method, the served version)."""
    given = {"method": method, "version": version}
    return {"coverage": coverage} | {k: v for k, v in given.items() if v is not None}


def _with_interval(
    parse: Callable[[httpx.Response], T], has: Callable[[T], bool]
) -> Callable[[httpx.Response], T]:
    """`parse`, refusing an answer without the interval asked for: a service that predates
    intervals ignores ?coverage= and would answer a bare score."""

    def parse_interval(response: httpx.Response) -> T:
        value = parse(response)
        if not has(value):
            raise UnexpectedResponse(response.status_code, response.text)
        return value

    return parse_interval


def _predict_interval_call(
    hours: float, coverage: float, method: Method | None, version: int | None, key: str | None
) -> _Call[Prediction]:
    params = {"hours": hours} | _interval_options(coverage, method, version)
    parse = _with_interval(_model(Prediction), lambda p: p.interval is not None)
    return _Call("GET", "/predict", parse, params=params, headers=_caller_key(key))


def _predict_many_intervals_call(
    hours: Sequence[float],
    coverage: float,
    method: Method | None,
    version: int | None,
    key: str | None,
) -> _Call[Predictions]:
    body = {"hours": list(hours)} | _interval_options(coverage, method, version)
    parse = _with_interval(_model(Predictions), lambda p: p.method is not None)
    return _Call("POST", "/predict", parse, body=body, headers=_caller_key(key))


def _outcomes_call(
    hours: Sequence[float],
    score: Sequence[float],
    prediction_id: str | None,
    model_version: int | None,
) -> _Call[OutcomesReceipt]:
    given = {"prediction_id": prediction_id, "model_version": model_version}
    body: dict[str, Any] = {"hours": list(hours), "score": list(score)}
    body |= {k: v for k, v in given.items() if v is not None}
    return _Call("POST", "/outcomes", _model(OutcomesReceipt), body=body)


def _model_call() -> _Call[Model]:
    return _Call("GET", "/model", _model(Model))


def _models_call(limit: int) -> _Call[ModelList]:
    return _Call("GET", "/models", _model(ModelList), params={"limit": limit})


def _version_call(version: int) -> _Call[ModelVersion]:
    return _Call("GET", f"/models/{int(version)}", _model(ModelVersion))


def _serve_call(
    version: int, traffic: int | None, promote_after: int | None, max_worse: float | None
) -> _Call[ModelVersion]:
    # No option, no body: serving a version by hand is the request it has always been.
    given = {"traffic": traffic, "promote_after": promote_after, "max_worse": max_worse}
    body = {k: v for k, v in given.items() if v is not None} or None
    return _Call("POST", f"/models/{int(version)}/serve", _model(ModelVersion), body=body)


def _rollback_call(version: int) -> _Call[ModelVersion]:
    return _Call("DELETE", f"/models/{int(version)}/serve", _model(ModelVersion))


def _history_call(
    job_id: str | None, since: int, limit: int | None, max_points: int | None
) -> _Call[History]:
    params = {"job_id": job_id, "since": since, "limit": limit, "max_points": max_points}
    kept = {k: v for k, v in params.items() if v is not None}
    return _Call("GET", "/history", _model(History), params=kept)


def _plot_call(job_id: str | None, image_format: ImageFormat, log: bool) -> _Call[bytes]:
    params = {"format": image_format} | ({} if job_id is None else {"job_id": job_id})
    if log:
        params["log"] = "true"
    return _Call("GET", "/history/plot", lambda r: r.content, params=params)


# -- Server-Sent Events ----------------------------------------------------------------------


@dataclass
class _SSEDecoder:
    """The event-stream format, line by line: data/event/id fields, comments, blank = dispatch.

    One decoder per connection: the half of an event that a dropped connection carried must
    never be glued onto the next connection's lines. `last_id` changes only when an event is
    complete (its blank line came), so the Last-Event-ID a reconnect sends never skips an event
    that was cut off after its `id:` line.
    """

    last_id: str | None = None
    _id: str | None = None
    _event: str = "message"
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if self._id is not None:
                self.last_id = self._id
            dispatched = (self._event, "\n".join(self._data)) if self._data else None
            self._id, self._event, self._data = None, "message", []
            return dispatched
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def _decode_event(event: str, data: str, headers: httpx.Headers) -> Event | None:
    kinds: dict[str, type[BaseModel]] = {"progress": ProgressEvent, "end": Job, "problem": Problem}
    kind = kinds.get(event)
    if kind is None:
        return None  # an event type this client does not know yet
    try:
        value = kind.model_validate_json(data)
    except ValidationError:
        raise UnexpectedResponse(200, f"event {event}: {data}") from None
    if isinstance(value, Problem):
        raise _error_for(value, headers)
    assert isinstance(value, ProgressEvent | Job)
    return value


def _events_headers(last_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    return headers


def _check_stream(response: httpx.Response, body: bytes) -> bool:
    """True if the stream has events to read; False for 204 (the client has them all)."""
    if response.status_code == 204:
        return False
    if not response.is_success:
        _raise_for(httpx.Response(response.status_code, headers=response.headers, content=body))
    return True


def _ended_early() -> Exception:
    # A stream that closes cleanly before its end event (a restart, a proxy's time limit), even
    # in the middle of an event, is a drop like any other: resume from the last whole event.
    return EOFError("the stream closed before the end event")


@dataclass
class _Resume:
    """Where a dropped event stream resumes, and when to give up on it."""

    last_id: str | None
    reconnects: int
    failures: int = 0
    _progressed: bool = False

    def advance(self, last_id: str | None, decoded: tuple[str, str] | None) -> None:
        """Called for every line: a complete event (or id) is progress."""
        if decoded is not None or last_id != self.last_id:
            self._progressed = True
        self.last_id = last_id

    def dropped(self, job_id: str, error: Exception) -> float:
        """Seconds to wait before reconnecting; TransportFailed after too many bare drops."""
        self.failures = 1 if self._progressed else self.failures + 1
        self._progressed = False
        if self.failures > self.reconnects:
            raise TransportFailed(f"the event stream of job {job_id}: {error!r}") from error
        # A stream that had delivered events resumes at once; one that keeps failing backs off.
        if self.failures == 1:
            return 0.0
        return min(RECONNECT_DELAY * 2.0 ** (self.failures - 2), RECONNECT_DELAY_MAX)


# -- a progress bar of a job, fed by its event stream -----------------------------------------

# wait(progress=...): False (no bar), True (tqdm.auto: a widget in Jupyter, text on stderr
# elsewhere), or a text file the bar is written to (a terminal, a log, a StringIO).
ShowProgress = bool | TextIO
TICK = 1.0  # seconds: how often a bar without news redraws its elapsed time


class _Bar:
    """One tqdm bar of a job: epochs done of all, percent, epochs a second, elapsed and left,
    and the last loss, w (b) and val_loss. tqdm is imported here, only when a bar is asked for:
    `import service.client` stays light."""

    def __init__(self, job: Job, show: ShowProgress) -> None:
        from tqdm import tqdm

        cls = tqdm
        if show is True:
            from tqdm.auto import tqdm as cls  # picks the notebook widget in Jupyter
        file = None if isinstance(show, bool) else show
        self._running = job.status is not JobStatus.queued
        self._ticked = time.monotonic()
        self._bar = cls(
            total=job.params.epochs,
            initial=job.progress.epoch,
            unit="epoch",
            desc=job.status.value,
            dynamic_ncols=True,
            file=file,
        )

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def show(self, event: Event) -> None:
        if isinstance(event, Job):
            self._bar.set_description_str(event.status.value, refresh=False)
            self._bar.n = event.progress.epoch
            self._bar.refresh()
            return
        if not self._running:  # the first progress: the fit started; its clock starts now
            self._running = True
            self._bar.reset()
            self._bar.set_description_str(JobStatus.running.value, refresh=False)
            # the epochs it ran before this first news count as done, not as a burst of speed
            done = event.progress.epoch
            self._bar.n = self._bar.initial = self._bar.last_print_n = done
        values = {"loss": event.loss[-1], "w": event.w[-1]}
        if event.b is not None:
            values["b"] = event.b[-1]
        if event.val_loss is not None:
            values["val_loss"] = event.val_loss[-1]
        postfix = ", ".join(f"{name}={value:.4g}" for name, value in values.items())
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(event.progress.epoch - self._bar.n)

    def tick(self) -> None:
        """A line that is no event (a keep-alive), or a dropped connection: the elapsed time is
        redrawn, at most every TICK seconds (every line of an event ticks too)."""
        now = time.monotonic()
        if now - self._ticked >= TICK:
            self._ticked = now
            self._bar.refresh()


# -- waiting -----------------------------------------------------------------------------


class _Deadline:
    """wait()'s clock: the deadline, the back-off between polls and each poll's time limit."""

    def __init__(self, timeout: float, now: float) -> None:
        if not timeout >= 0:  # also refuses NaN, which compares false with everything
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        self.timeout = timeout
        self.deadline = now + timeout
        self.delay = POLL_MIN

    def left(self, now: float) -> float:
        return self.deadline - now

    def request_timeout(self, configured: httpx.Timeout, now: float) -> httpx.Timeout:
        """The transport's time limits, none longer than what is left of the wait."""
        left = max(self.left(now), POLL_MIN)

        def bound(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(
            connect=bound(configured.connect),
            read=bound(configured.read),
            write=bound(configured.write),
            pool=bound(configured.pool),
        )

    def pause(self, now: float) -> float:
        """How long to sleep before the next poll; polls start fast and back off."""
        pause = min(self.delay, max(self.left(now), 0.0))
        self.delay = min(self.delay * 2, POLL_MAX)
        return pause

    def expired(self, job: Job | None, error: ClientError | None) -> ClientError:
        """What wait() raises at the deadline: the job's last state, else the last error."""
        if job is not None:
            timed_out = WaitTimeout(job, self.timeout)
            timed_out.__cause__ = error
            return timed_out
        assert error is not None
        return error


def _last_state_limits(configured: httpx.Timeout) -> httpx.Timeout:
    """wait(progress=...) asks for the job once more at its deadline, for at most this long."""
    return _Deadline(LAST_STATE_LIMIT, 0.0).request_timeout(configured, 0.0)


# Answers that say "not now" rather than "never": wait() polls on through them.
_TRANSIENT = (TransportFailed, UnavailableError)


# -- the clients ---------------------------------------------------------------------------


class SGDClient:
    """sgd-service over a caller's `httpx.Client` (a FastAPI TestClient works too)."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def _send(self, call: _Call[R], limits: httpx.Timeout | None = None) -> R:
        try:
            response = self.http.send(call.request(self.http, limits))
        except httpx.TransportError as exc:
            raise TransportFailed(f"{call.method} {call.url}: {exc!r}") from exc
        return call.result(response)

    def fit(
        self,
        x: Sequence[float],
        y: Sequence[float],
        *,
        idempotency_key: str | None = None,
        **options: Unpack[FitOptions],
    ) -> Job:
        """Start a fit; parameters left out take the service's defaults (the tutorial's)."""
        return self._send(_fit_call(x, y, idempotency_key, options))

    def job(self, job_id: str) -> Job:
        """A job as it is now."""
        return self._send(_job_call(job_id))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job."""
        return self._send(_cancel_call(job_id))

    def wait(self, job_id: str, timeout: float = 60.0, *, progress: ShowProgress = False) -> Job:
        """Poll until the job ends (whatever its outcome); WaitTimeout at the deadline.

        A dropped connection or a 503 does not end the wait: it polls on until the deadline,
        and no poll's request outlives it. progress=True shows a bar (tqdm.auto: a widget in
        Jupyter, text on stderr elsewhere), a text file gets the bar written to it: it follows
        the job's event stream instead of polling, with the same deadline.
        """
        if progress is not False:
            return self._wait_showing(job_id, timeout, progress)
        clock = _Deadline(timeout, time.monotonic())
        job: Job | None = None
        error: ClientError | None = None
        while True:
            limit = clock.request_timeout(self.http.timeout, time.monotonic())
            try:
                job = self._send(_job_call(job_id), limit)
                error = None
            except _TRANSIENT as exc:
                error = exc
            if job is not None and job.status.ended and error is None:
                return job
            if clock.left(time.monotonic()) <= 0:
                raise clock.expired(job, error)
            time.sleep(clock.pause(time.monotonic()))

    def _wait_showing(self, job_id: str, timeout: float, show: ShowProgress) -> Job:
        clock = _Deadline(timeout, time.monotonic())
        job = self._first_state(job_id, clock)
        with _Bar(job, show) as bar:
            if job.status.ended:
                bar.show(job)
                return job
            last_id: str | None = None
            while True:
                resume = _Resume(last_id, RECONNECTS)
                try:
                    with contextlib.closing(self._stream(job_id, resume, clock)) as stream:
                        for event in stream:
                            if event is None:
                                bar.tick()
                            else:
                                bar.show(event)
                            if isinstance(event, Job):
                                return event
                            if clock.left(time.monotonic()) <= 0:
                                raise WaitTimeout(self._last_state(job_id, job), timeout)
                    error: ClientError | None = None  # a 204: the stream has nothing left
                except _TRANSIENT as exc:
                    error = exc
                last_id = resume.last_id
                if clock.left(time.monotonic()) <= 0:
                    raise clock.expired(self._last_state(job_id, job), error)
                time.sleep(clock.pause(time.monotonic()))

    def _first_state(self, job_id: str, clock: _Deadline) -> Job:
        """The job as it is now, polled through dropped connections and 503s to the deadline."""
        while True:
            limit = clock.request_timeout(self.http.timeout, time.monotonic())
            try:
                return self._send(_job_call(job_id), limit)
            except _TRANSIENT as exc:
                if clock.left(time.monotonic()) <= 0:
                    raise clock.expired(None, exc) from None
            time.sleep(clock.pause(time.monotonic()))

    def _last_state(self, job_id: str, known: Job) -> Job:
        """The job at the deadline, for WaitTimeout: asked once more (LAST_STATE_LIMIT), else
        the last state known."""
        try:
            return self._send(_job_call(job_id), _last_state_limits(self.http.timeout))
        except _TRANSIENT:
            return known

    def predict(self, hours: float, version: int | None = None, *, key: str | None = None) -> float:
        """The served model's score for `hours` (or kept version `version`'s). During a canary
        rollout the same `key` (a user, a session) always gets the same version; no key: random."""
        return self._send(_predict_call(hours, version, key)).score

    def predict_with_id(
        self, hours: float, *, key: str | None = None, version: int | None = None
    ) -> tuple[Prediction, str]:
        """predict()'s whole answer (`.score`, `.model_version`) and its prediction id
        (`v3-9f1c…`), for record_outcomes(prediction_id=...) once the true score is known."""
        return self._send(_predict_with_id_call(hours, version, key))

    def predict_many(
        self, hours: Sequence[float], version: int | None = None, *, key: str | None = None
    ) -> list[float]:
        """Scores for many hours, all from one model version (the served one by default, or the
        one `key` is sent to during a canary rollout)."""
        return self._send(_predict_many_call(hours, version, key)).scores

    def predict_interval(
        self,
        hours: float,
        coverage: float,
        *,
        method: Method | None = None,
        version: int | None = None,
        key: str | None = None,
    ) -> Prediction:
        """The score for `hours` and an interval that holds the true score with probability
        `coverage` (0.5..0.999): `.score`, `.interval.lower` and `.upper` (None: unbounded),
        `.interval.method`. `method` defaults to the version's first (`intervals.methods` of
        GET /models/{v}); one the version cannot answer raises ConflictError
        (interval-unavailable), a coverage out of range InvalidRequestError."""
        return self._send(_predict_interval_call(hours, coverage, method, version, key))

    def predict_many_intervals(
        self,
        hours: Sequence[float],
        coverage: float,
        *,
        method: Method | None = None,
        version: int | None = None,
        key: str | None = None,
    ) -> Predictions:
        """predict_interval for many hours from one model version: `.scores`, `.lower` and
        `.upper` (None: unbounded), `.coverage`, `.method`."""
        return self._send(_predict_many_intervals_call(hours, coverage, method, version, key))

    def record_outcomes(
        self,
        hours: Sequence[float],
        score: Sequence[float],
        *,
        prediction_id: str | None = None,
        model_version: int | None = None,
    ) -> OutcomesReceipt:
        """The scores that really happened for these hours; each version's live quality (and a
        canary's decision) is scored on them. `prediction_id` (from predict_with_id) or
        `model_version` names the version that predicted them; needs the train scope."""
        return self._send(_outcomes_call(hours, score, prediction_id, model_version))

    def model(self) -> Model:
        """The model being served."""
        return self._send(_model_call())

    def models(self, limit: int = 20) -> ModelList:
        """The kept model versions, newest first, and which one is served."""
        return self._send(_models_call(limit))

    def version(self, version: int) -> ModelVersion:
        """One kept model version."""
        return self._send(_version_call(version))

    def serve(
        self,
        version: int,
        *,
        traffic: int | None = None,
        promote_after: int | None = None,
        max_worse: float | None = None,
    ) -> ModelVersion:
        """Serve a kept version from now on (a rollback); needs the admin scope. With `traffic`
        1..99 it is a canary: that percent of predictions go to it, and after `promote_after`
        outcomes it is promoted if its MAE is at most the stable version's x (1 + `max_worse`),
        else rolled back (promote_after None: by hand). traffic=100 promotes it, 0 rolls it
        back. Only the options given are sent."""
        return self._send(_serve_call(version, traffic, promote_after, max_worse))

    def rollback(self, version: int) -> ModelVersion:
        """End the canary rollout of `version`: every prediction goes to the stable version
        again. ConflictError if `version` is no running canary."""
        return self._send(_rollback_call(version))

    def history(
        self,
        job_id: str | None = None,
        *,
        since: int = 0,
        limit: int | None = None,
        max_points: int | None = None,
    ) -> History:
        """A job's history (the latest job by default), paged and thinned."""
        return self._send(_history_call(job_id, since, limit, max_points))

    def plot(
        self, job_id: str | None = None, image_format: ImageFormat = "png", *, log: bool = False
    ) -> bytes:
        """The history figure as PNG or SVG bytes; log=True draws the loss on a log scale."""
        return self._send(_plot_call(job_id, image_format, log))

    def events(
        self, job_id: str, *, last_event_id: str | None = None, reconnects: int = RECONNECTS
    ) -> Iterator[Event]:
        """Progress events, then the ended Job; a dropped stream is resumed where it stopped.

        No event is lost or repeated across reconnects; `reconnects` drops in a row without a
        complete event end the stream with TransportFailed.
        """
        for event in self._stream(job_id, _Resume(last_event_id, reconnects), None):
            if event is not None:
                yield event

    def _stream(
        self, job_id: str, resume: _Resume, clock: _Deadline | None
    ) -> Generator[Event | None]:
        """events(), and None for every line that is no event (a keep-alive) and every drop:
        a caller with a deadline gets to look at its clock. With `clock`, no connection's time
        limits outlive it, nor does a pause between reconnects."""
        while True:
            decoder = _SSEDecoder(last_id=resume.last_id)  # a fresh one per connection
            now = time.monotonic()
            limits = (
                self.http.timeout
                if clock is None
                else clock.request_timeout(self.http.timeout, now)
            )
            try:
                with self.http.stream(
                    "GET",
                    _job_path(job_id, "events"),
                    headers=_events_headers(resume.last_id),
                    timeout=limits,
                ) as response:
                    body = b"" if response.is_success else response.read()
                    if not _check_stream(response, body):
                        return
                    for line in response.iter_lines():
                        decoded = decoder.feed(line)
                        resume.advance(decoder.last_id, decoded)
                        event = (
                            None if decoded is None else _decode_event(*decoded, response.headers)
                        )
                        yield event
                        if isinstance(event, Job):
                            return
                error: Exception = _ended_early()
            except httpx.TransportError as exc:
                error = exc
            pause = resume.dropped(job_id, error)
            yield None
            if clock is not None:
                pause = min(pause, max(clock.left(time.monotonic()), 0.0))
            time.sleep(pause)


class AsyncSGDClient:
    """The same client over a caller's `httpx.AsyncClient`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def _send(self, call: _Call[R], limits: httpx.Timeout | None = None) -> R:
        try:
            response = await self.http.send(call.request(self.http, limits))
        except httpx.TransportError as exc:
            raise TransportFailed(f"{call.method} {call.url}: {exc!r}") from exc
        return call.result(response)

    async def fit(
        self,
        x: Sequence[float],
        y: Sequence[float],
        *,
        idempotency_key: str | None = None,
        **options: Unpack[FitOptions],
    ) -> Job:
        """Start a fit; parameters left out take the service's defaults (the tutorial's)."""
        return await self._send(_fit_call(x, y, idempotency_key, options))

    async def job(self, job_id: str) -> Job:
        """A job as it is now."""
        return await self._send(_job_call(job_id))

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job."""
        return await self._send(_cancel_call(job_id))

    async def wait(
        self,
        job_id: str,
        timeout: float = 60.0,  # noqa: ASYNC109 (as sync)
        *,
        progress: ShowProgress = False,
    ) -> Job:
        """Poll until the job ends (whatever its outcome); WaitTimeout at the deadline.

        A dropped connection or a 503 does not end the wait: it polls on until the deadline,
        and no poll's request outlives it. `progress` shows a bar as SGDClient.wait's does.
        """
        if progress is not False:
            return await self._wait_showing(job_id, timeout, progress)
        loop = asyncio.get_running_loop()
        clock = _Deadline(timeout, loop.time())
        job: Job | None = None
        error: ClientError | None = None
        while True:
            limit = clock.request_timeout(self.http.timeout, loop.time())
            try:
                job = await self._send(_job_call(job_id), limit)
                error = None
            except _TRANSIENT as exc:
                error = exc
            if job is not None and job.status.ended and error is None:
                return job
            if clock.left(loop.time()) <= 0:
                raise clock.expired(job, error)
            await asyncio.sleep(clock.pause(loop.time()))

    async def _wait_showing(
        self,
        job_id: str,
        timeout: float,  # noqa: ASYNC109 (as wait's)
        show: ShowProgress,
    ) -> Job:
        loop = asyncio.get_running_loop()
        clock = _Deadline(timeout, loop.time())
        job = await self._first_state(job_id, clock)
        with _Bar(job, show) as bar:
            if job.status.ended:
                bar.show(job)
                return job
            last_id: str | None = None
            while True:
                resume = _Resume(last_id, RECONNECTS)
                try:
                    async with contextlib.aclosing(self._stream(job_id, resume, clock)) as stream:
                        async for event in stream:
                            if event is None:
                                bar.tick()
                            else:
                                bar.show(event)
                            if isinstance(event, Job):
                                return event
                            if clock.left(loop.time()) <= 0:
                                raise WaitTimeout(await self._last_state(job_id, job), timeout)
                    error: ClientError | None = None  # a 204: the stream has nothing left
                except _TRANSIENT as exc:
                    error = exc
                last_id = resume.last_id
                if clock.left(loop.time()) <= 0:
                    raise clock.expired(await self._last_state(job_id, job), error)
                await asyncio.sleep(clock.pause(loop.time()))

    async def _first_state(self, job_id: str, clock: _Deadline) -> Job:
        loop = asyncio.get_running_loop()
        while True:
            limit = clock.request_timeout(self.http.timeout, loop.time())
            try:
                return await self._send(_job_call(job_id), limit)
            except _TRANSIENT as exc:
                if clock.left(loop.time()) <= 0:
                    raise clock.expired(None, exc) from None
            await asyncio.sleep(clock.pause(loop.time()))

    async def _last_state(self, job_id: str, known: Job) -> Job:
        try:
            return await self._send(_job_call(job_id), _last_state_limits(self.http.timeout))
        except _TRANSIENT:
            return known

    async def predict(
        self, hours: float, version: int | None = None, *, key: str | None = None
    ) -> float:
        """The served model's score for `hours` (SGDClient.predict)."""
        return (await self._send(_predict_call(hours, version, key))).score

    async def predict_with_id(
        self, hours: float, *, key: str | None = None, version: int | None = None
    ) -> tuple[Prediction, str]:
        """The whole answer and its prediction id (SGDClient.predict_with_id)."""
        return await self._send(_predict_with_id_call(hours, version, key))

    async def predict_many(
        self, hours: Sequence[float], version: int | None = None, *, key: str | None = None
    ) -> list[float]:
        """Scores for many hours, all from one model version (SGDClient.predict_many)."""
        return (await self._send(_predict_many_call(hours, version, key))).scores

    async def predict_interval(
        self,
        hours: float,
        coverage: float,
        *,
        method: Method | None = None,
        version: int | None = None,
        key: str | None = None,
    ) -> Prediction:
        """The score for `hours` and its interval at `coverage` (SGDClient.predict_interval)."""
        return await self._send(_predict_interval_call(hours, coverage, method, version, key))

    async def predict_many_intervals(
        self,
        hours: Sequence[float],
        coverage: float,
        *,
        method: Method | None = None,
        version: int | None = None,
        key: str | None = None,
    ) -> Predictions:
        """Scores and intervals for many hours (SGDClient.predict_many_intervals)."""
        return await self._send(_predict_many_intervals_call(hours, coverage, method, version, key))

    async def record_outcomes(
        self,
        hours: Sequence[float],
        score: Sequence[float],
        *,
        prediction_id: str | None = None,
        model_version: int | None = None,
    ) -> OutcomesReceipt:
        """The scores that really happened for these hours (SGDClient.record_outcomes)."""
        return await self._send(_outcomes_call(hours, score, prediction_id, model_version))

    async def model(self) -> Model:
        """The model being served."""
        return await self._send(_model_call())

    async def models(self, limit: int = 20) -> ModelList:
        """The kept model versions, newest first, and which one is served."""
        return await self._send(_models_call(limit))

    async def version(self, version: int) -> ModelVersion:
        """One kept model version."""
        return await self._send(_version_call(version))

    async def serve(
        self,
        version: int,
        *,
        traffic: int | None = None,
        promote_after: int | None = None,
        max_worse: float | None = None,
    ) -> ModelVersion:
        """Serve a kept version, or start its canary rollout with `traffic` (SGDClient.serve)."""
        return await self._send(_serve_call(version, traffic, promote_after, max_worse))

    async def rollback(self, version: int) -> ModelVersion:
        """End the canary rollout of `version` (SGDClient.rollback)."""
        return await self._send(_rollback_call(version))

    async def history(
        self,
        job_id: str | None = None,
        *,
        since: int = 0,
        limit: int | None = None,
        max_points: int | None = None,
    ) -> History:
        """A job's history (the latest job by default), paged and thinned."""
        return await self._send(_history_call(job_id, since, limit, max_points))

    async def plot(
        self, job_id: str | None = None, image_format: ImageFormat = "png", *, log: bool = False
    ) -> bytes:
        """The history figure as PNG or SVG bytes; log=True draws the loss on a log scale."""
        return await self._send(_plot_call(job_id, image_format, log))

    async def events(
        self, job_id: str, *, last_event_id: str | None = None, reconnects: int = RECONNECTS
    ) -> AsyncIterator[Event]:
        """Progress events, then the ended Job; a dropped stream is resumed where it stopped.

        No event is lost or repeated across reconnects; `reconnects` drops in a row without a
        complete event end the stream with TransportFailed.
        """
        async for event in self._stream(job_id, _Resume(last_event_id, reconnects), None):
            if event is not None:
                yield event

    async def _stream(
        self, job_id: str, resume: _Resume, clock: _Deadline | None
    ) -> AsyncGenerator[Event | None]:
        """SGDClient._stream over the async transport."""
        loop = asyncio.get_running_loop()
        while True:
            decoder = _SSEDecoder(last_id=resume.last_id)  # a fresh one per connection
            limits = (
                self.http.timeout
                if clock is None
                else clock.request_timeout(self.http.timeout, loop.time())
            )
            try:
                async with self.http.stream(
                    "GET",
                    _job_path(job_id, "events"),
                    headers=_events_headers(resume.last_id),
                    timeout=limits,
                ) as response:
                    body = b"" if response.is_success else await response.aread()
                    if not _check_stream(response, body):
                        return
                    async for line in response.aiter_lines():
                        decoded = decoder.feed(line)
                        resume.advance(decoder.last_id, decoded)
                        event = (
                            None if decoded is None else _decode_event(*decoded, response.headers)
                        )
                        yield event
                        if isinstance(event, Job):
                            return
                error: Exception = _ended_early()
            except httpx.TransportError as exc:
                error = exc
            pause = resume.dropped(job_id, error)
            yield None
            if clock is not None:
                pause = min(pause, max(clock.left(loop.time()), 0.0))
            await asyncio.sleep(pause)
