"""HTTP routes: thin, typed, async; state comes in through service.http.deps; never torch.

Every call of the store but the served model's read runs in the threadpool: the store may be
Redis, across a network, and the event loop must stay free for /predict.
"""

import asyncio
import contextlib
import itertools
import math
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.core.errors import (
    InvalidInput,
    JobNotFound,
    ModelNotReady,
    NothingServed,
    StoreUnavailable,
)
from service.core.intervals import MAX_COVERAGE, METHODS, MIN_COVERAGE, Method
from service.core.numbers import (
    MAX_SEED,
    NUMBER,
    VERSION_NUMBER,
    WHOLE,
    finite_or_raise,
    overflowed,
)
from service.core.schemas import (
    METHOD_DESCRIPTION,
    FitRequest,
    Health,
    History,
    Job,
    JobList,
    JobParams,
    Model,
    ModelList,
    ModelVersion,
    Prediction,
    Predictions,
    PredictRequest,
)
from service.core.settings import Settings
from service.http import outcomes, scoring
from service.http.bodies import FitBody, predict_body
from service.http.deps import (
    PREDICT,
    READ,
    TRAIN,
    MetricsDep,
    RunnerDep,
    SettingsDep,
    StoreDep,
)
from service.http.direct import DirectRoute, json_answer, query_arguments
from service.http.intake import FitOptions
from service.http.openapi import json_body
from service.http.problems import problems
from service.http.turns import give_way
from service.state.base import HistoryPage, Store

CANCEL_WAIT_SECONDS = 10.0
MAX_KEY_LENGTH = 200
KEY = (
    "the caller's key (or the X-Caller-Key header): while a canary runs, one key always gets "
    "the same version"
)
MAX_LISTED_JOBS = 100
MAX_LISTED_VERSIONS = 100
MAX_HISTORY_POINTS = 1_000_000

router = APIRouter()


async def fit(
    accepted: FitBody,
    response: Response,
    store: StoreDep,
    runner: RunnerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Job:
    """Start a fit as a background job; poll the job at its Location."""
    options = accepted.options
    idem = None if idempotency_key is None else (idempotency_key, accepted.digest or "")
    start = None
    if options.init_from is not None:
        start = await run_in_threadpool(_start_from, store, options)
    params = JobParams(
        epochs=options.epochs,
        learning_rate=options.learning_rate,
        init_w=options.init_w if start is None else start.w,
        batch_size=options.batch_size,
        fit_intercept=options.fit_intercept,
        seed=secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed,
        validation_fraction=options.validation_fraction,
        tol=options.tol,
        n_iter_no_change=options.n_iter_no_change,
        publish=options.publish,
        init_from=None if start is None else start.version,
        init_b=0.0 if start is None else start.b,
    )
    # created and queued, or the key's original; a refusal (429, 503) leaves no trace
    job, _ = await run_in_threadpool(
        runner.submit, params, accepted.n, accepted.x, accepted.y, idem
    )
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


# FastAPI reads no body for /fit: `fit_body` does, after the token check (service.http.bodies)
router.add_api_route(
    "/fit",
    fit,
    methods=["POST"],
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[TRAIN],
    responses=problems(401, 404, 409, 413, 422, 429, 503),
    openapi_extra=json_body(FitRequest),
)
BODIES = (FitRequest,)  # models of bodies that dependencies read: the document needs them


def _start_from(store: Store, options: FitOptions) -> Model:
    """The model a warm start begins with: the served one or a kept version, resolved now."""
    if options.init_from == "served":
        model = store.model
        if model is None:
            raise NothingServed(
                'init_from is "served" but no model is served yet: fit without init_from first'
            )
    else:
        assert isinstance(options.init_from, int)
        model = store.version(options.init_from)
    if model.b != 0 and not options.fit_intercept:
        issue = {
            "field": "init_from, fit_intercept",
            "message": f"version {model.version} has b = {model.b:g}, which a fit without an "
            "intercept would drop: set fit_intercept to true, or start from init_w",
            "code": "combination",
        }
        raise InvalidInput("these options do not go together: init_from, fit_intercept", [issue])
    return model


@router.get("/jobs", dependencies=[READ], responses=problems(422))
async def list_jobs(
    store: StoreDep, limit: Annotated[int, Query(ge=1, le=MAX_LISTED_JOBS), WHOLE] = 20
) -> JobList:
    """Recent jobs, newest first."""
    return JobList(jobs=await run_in_threadpool(store.list_jobs, limit))


@router.get("/jobs/{job_id}", dependencies=[READ], responses=problems(404, 422))
async def get_job(job_id: str, store: StoreDep) -> Job:
    """One job: status, progress, result or error."""
    return await run_in_threadpool(store.get_job, job_id)


@router.post("/jobs/{job_id}/cancel", dependencies=[TRAIN], responses=problems(401, 404, 409, 422))
async def cancel_job(job_id: str, store: StoreDep, runner: RunnerDep) -> Job:
    """Cancel a queued or running job; answers once it has stopped."""
    job = await run_in_threadpool(runner.cancel, job_id)
    deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_SECONDS
    while not job.status.ended and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
        with contextlib.suppress(JobNotFound):  # evicted since: answer what we saw last
            job = await run_in_threadpool(store.get_job, job_id)
    return job


def _served(store: Store) -> Model:
    model = store.model
    if model is None:
        why = store.unreachable
        if why is not None:
            raise StoreUnavailable(f"this replica has not read the served model yet: {why}")
        raise ModelNotReady("no fit has succeeded yet: POST /fit, then retry when it succeeds")
    return model


async def _model(store: Store, version: int | None, key: str | None = None) -> Model:
    """The served model (or the canary, for its share of predictions: by the caller's `key`),
    or a kept version (a read of the store, off the event loop, unless this process holds
    it)."""
    if version is None:
        return scoring.routed(store, _served(store), key)
    held = store.held(version)
    return held if held is not None else await run_in_threadpool(store.version, version)


def _too_far(name: str, settings: Settings) -> InvalidInput:
    """The problem of an |hours| over the limit, named as the caller wrote it: `hours` for the
    query parameter, `hours[2]` for the body's list."""
    limit = settings.max_abs_value
    return InvalidInput(
        f"every |hours| must be at most SGD_MAX_ABS_VALUE={limit:g}",
        [{"field": name, "message": f"|hours| at most {limit:g}", "code": "limit"}],
    )


# The route's grammars (service.core.numbers: JSON_NUMBER, WHOLE_NUMBER), or less of them. In a
# query a "+" is a space, so `1e+3` is the route's `1e 3`, which it refuses.
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE]-?[0-9]+)?")
_VERSION = re.compile(VERSION_NUMBER.encode())
_KEY = re.compile(rb"[A-Za-z0-9._~-]{1,%d}" % MAX_KEY_LENGTH)


_METHODS = {m.encode(): m for m in METHODS}


class _OneHours(DirectRoute):
    """GET /predict's query as FastAPI reads it; `hours=<number>` (and `version=<number>`,
    `coverage=<number>` within its range, `method=<method>`, `key=<plain text>`), each once,
    read at once."""

    async def read(self, request: Request, settings: Settings) -> dict[str, Any]:
        query: bytes = request.scope["query_string"]
        fields = dict(p.partition(b"=")[::2] for p in query.split(b"&", 5))
        hours, version = fields.get(b"hours", b""), fields.pop(b"version", None)
        coverage, method = fields.pop(b"coverage", None), fields.pop(b"method", None)
        key = fields.pop(b"key", None)
        if (
            fields.keys() == {b"hours"}
            and _NUMBER.fullmatch(hours)
            and (version is None or _VERSION.fullmatch(version))
            and math.isfinite(number := float(hours))  # 1e999 is refused as FastAPI refuses it
            and (coverage is None or _within_range(coverage))
            and (method is None or method in _METHODS)
            and (key is None or _KEY.fullmatch(key))
        ):
            arguments = {
                "hours": number,
                "version": None if version is None else int(version),
                "coverage": None if coverage is None else float(coverage),
                "method": None if method is None else _METHODS[method],
                "key": None if key is None else key.decode(),
            }
        else:
            arguments = query_arguments(self, request)
        return _keyed(request, arguments)


def _keyed(request: Request, arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments, with the caller's X-Caller-Key as `key` (unless the query gave one):
    read only while a canary runs, when it matters."""
    if arguments.get("key") is None and request.scope["state"]["store"].canary is not None:
        key = scoring.caller_key(request.scope)
        if key is not None and len(key) > MAX_KEY_LENGTH:
            raise _long_key()
        arguments["key"] = key
    return arguments


def _long_key() -> InvalidInput:
    issue = {"field": "X-Caller-Key", "message": "too long", "code": "limit"}
    return InvalidInput(f"a caller key has at most {MAX_KEY_LENGTH} characters", [issue])


def _within_range(coverage: bytes) -> bool:
    return bool(_NUMBER.fullmatch(coverage)) and MIN_COVERAGE <= float(coverage) <= MAX_COVERAGE


async def predict(
    hours: Annotated[float, Query(allow_inf_nan=False, examples=[4]), NUMBER],
    store: StoreDep,
    settings: SettingsDep,
    version: Annotated[
        int | None, Query(ge=1, description="a kept version (GET /models)"), WHOLE
    ] = None,
    coverage: Annotated[
        float | None,
        Query(
            ge=MIN_COVERAGE,
            le=MAX_COVERAGE,
            allow_inf_nan=False,
            description="answer an interval that holds the true score with this probability",
            examples=[0.9],
        ),
        NUMBER,
    ] = None,
    method: Annotated[Method | None, Query(description=METHOD_DESCRIPTION)] = None,
    key: Annotated[str | None, Query(max_length=MAX_KEY_LENGTH, description=KEY)] = None,
) -> Response:
    """The served model's score for one number of hours (or a kept version's, ?version=);
    with ?coverage=, the interval around it. The X-Prediction-Id header names the answer (and
    its version) for POST /outcomes."""
    model = await _model(store, version, key)
    if abs(hours) > settings.max_abs_value:
        raise _too_far("hours", settings)
    score = finite_or_raise(model.predict(hours), "the score")
    answer: dict[str, Any] = {"hours": hours, "score": score, "model_version": model.version}
    if coverage is not None:
        used, half = await scoring.half_width(model, hours, coverage, method)
        lower, upper = _bounds(score, float(half), used)
        answer["interval"] = {"lower": lower, "upper": upper, "coverage": coverage, "method": used}
    elif method is not None:
        raise _method_alone()
    # Prediction, as FastAPI's route wrote it (pydantic's JSON: the floats as orjson writes them)
    return json_answer(orjson.dumps(answer), scoring.answered_by(model))


def _bounds(score: float, half: float, method: Method) -> tuple[float | None, float | None]:
    """score -+ half; None for both when a conformal interval is unbounded."""
    if half == math.inf and method == "conformal":
        return None, None
    lower, upper = score - half, score + half
    if not (math.isfinite(lower) and math.isfinite(upper)):
        raise overflowed("the interval")
    return lower, upper


def _method_alone() -> InvalidInput:
    issue = {"field": "method", "message": "set coverage too", "code": "combination"}
    return InvalidInput("method only applies with coverage: set coverage too", [issue])


router.add_api_route(
    "/predict",
    predict,
    methods=["GET"],
    dependencies=[PREDICT],
    response_model=Prediction,
    responses=problems(404, 409, 422, 503),
    route_class_override=_OneHours,
)


class _ManyHours(DirectRoute):
    """POST /predict's body, counted, parsed and validated (service.http.bodies)."""

    async def read(self, request: Request, settings: Settings) -> dict[str, Any]:
        return _keyed(request, await predict_body(request, self, settings))


async def predict_many(
    body: PredictRequest,
    store: StoreDep,
    settings: SettingsDep,
    key: Annotated[str | None, Header(alias="X-Caller-Key", description=KEY)] = None,
) -> Response:
    """Scores for many hours, all from one model version (the served one, or `version`); the
    X-Prediction-Id header names the answer (and its version) for POST /outcomes."""
    model = await _model(store, body.version, key)  # one read: every score from one version
    named = scoring.answered_by(model)
    if len(body.hours) > settings.max_predict_batch:
        raise InvalidInput(
            f"at most {settings.max_predict_batch} hours per request; split the request",
            [{"field": "hours", "message": "too many values", "code": "limit"}],
        )
    hours = np.array(body.hours, dtype=np.float64)
    over = scoring.first_over(hours, settings.max_abs_value)
    if over is not None:
        raise _too_far(f"hours[{over}]", settings)
    scores = scoring.scores(model, hours, lambda _: overflowed("a score"))
    # Predictions, with the scores written by orjson: the same numbers, to the last bit
    answer = b'{"scores":%b,"model_version":%d' % (_floats(scores), model.version)
    if body.coverage is None:
        if body.method is not None:
            raise _method_alone()
        return json_answer(answer + b"}", named)
    used, half = await scoring.half_width(model, hours, body.coverage, body.method)
    bounds = scoring.bounds(scores, half, lambda: overflowed("an interval bound"))
    lower, upper = (b"null", b"null") if bounds is None else map(_floats, bounds)
    tail = orjson.dumps({"coverage": body.coverage, "method": used})[1:]
    return json_answer(b'%b,"lower":%b,"upper":%b,%b' % (answer, lower, upper, tail), named)


def _floats(values: scoring.Floats) -> bytes:
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)


router.add_api_route(
    "/predict",
    predict_many,
    methods=["POST"],
    dependencies=[PREDICT],
    response_model=Predictions,
    responses=problems(404, 409, 413, 422, 503),
    route_class_override=_ManyHours,
)


@router.get("/model", dependencies=[READ], responses=problems(503))
async def get_model(store: StoreDep) -> Model:
    """The model being served."""
    return _served(store)


@router.get("/models", dependencies=[READ], responses=problems(422))
async def list_models(
    store: StoreDep, limit: Annotated[int, Query(ge=1, le=MAX_LISTED_VERSIONS), WHOLE] = 20
) -> ModelList:
    """Kept model versions, newest first, and which one is served."""
    return await run_in_threadpool(_model_list, store, limit)


def _model_list(store: Store, limit: int) -> ModelList:
    versions = store.versions(limit)
    served, canary = store.model, store.canary
    return ModelList(
        served_version=served.version if served else None,
        canary=None if canary is None else store.rollout(canary.model.version),
        versions=[outcomes.version_view(store, m) for m in versions],
    )


@router.get("/models/{version}", dependencies=[READ], responses=problems(404, 422))
async def get_model_version(
    version: Annotated[int, Path(ge=1), WHOLE], store: StoreDep
) -> ModelVersion:
    """One kept model version: served or not, its live quality and its latest rollout."""
    model = await run_in_threadpool(store.version, version)
    return await run_in_threadpool(outcomes.version_view, store, model)


@router.get("/history", dependencies=[READ], response_model=History, responses=problems(404, 422))
async def history(
    store: StoreDep,
    settings: SettingsDep,
    job_id: str | None = None,
    since: Annotated[int, Query(ge=0), WHOLE] = 0,
    limit: Annotated[int | None, Query(ge=1), WHOLE] = None,
    max_points: Annotated[int | None, Query(ge=2, le=MAX_HISTORY_POINTS), WHOLE] = None,
) -> Response:
    """Loss and w per epoch of the latest job (or ?job_id=), paged and thinned."""
    points = max_points or settings.history_max_points
    page = await run_in_threadpool(store.history_page, job_id, since, limit, points)
    if len(page.columns["w"]) <= HISTORY_SLICE:
        return Response(b"".join(_history_json(page)), media_type="application/json")
    return StreamingResponse(_history_stream(page), media_type="application/json")


# Values written per step: ~0.3 ms of orjson, after which /predict gets the event loop back.
HISTORY_SLICE = 4_096


def _history_json(page: HistoryPage) -> Iterator[bytes]:
    """The History object of this page, as FastAPI wrote it (same keys, in the same order),
    written column by column and HISTORY_SLICE values at a time."""
    p, cols = page.page, page.columns
    done = p.end >= p.total and page.job.status.ended
    head = {
        "job_id": page.job.id,
        "status": page.job.status.value,
        "total_epochs": p.total,
        "since": p.start,
        "stride": p.stride,
        "count": len(cols["w"]),
        "next_since": None if done else p.end,
    }
    yield orjson.dumps(head)[:-1]
    grid = range(p.start, p.end, p.stride)
    epochs = (list(grid[i : i + HISTORY_SLICE]) for i in range(0, len(grid), HISTORY_SLICE))
    yield from _list("epoch", itertools.chain(epochs, [p.tail]))
    for name in ("w", "b", "loss", "val_loss"):
        values = cols.get(name)
        if values is None:
            yield f',"{name}":null'.encode()
            continue
        yield from _list(name, values.slices(HISTORY_SLICE))
    yield b"}"


def _list(name: str, slices: Iterable[list[Any]]) -> Iterator[bytes]:
    """`,"name":[...]`, written a slice at a time."""
    yield f',"{name}":['.encode()
    first = True
    for values in slices:
        if values:
            text = orjson.dumps(values)[1:-1]
            yield text if first else b"," + text
            first = False
    yield b"]"


async def _history_stream(page: HistoryPage) -> AsyncIterator[bytes]:
    for part in _history_json(page):
        yield part
        await give_way()  # a slice at a time: let /predict in between


@router.get("/metrics", dependencies=[READ], response_class=PlainTextResponse)
async def metrics(metrics: MetricsDep) -> PlainTextResponse:
    """Prometheus metrics: requests, latencies, jobs, fits, queue depth, the model version."""
    body = await run_in_threadpool(generate_latest, metrics.registry)  # gauges may ask Redis
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", responses=problems(503))
async def readyz(runner: RunnerDep) -> Health:
    """Readiness: the job runner can take fits (a missing model does not matter)."""
    if not runner.ready:
        raise runner.not_ready()
    return Health(status="ready")
