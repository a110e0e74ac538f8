"""Learning from what happened: POST /outcomes, canary rollouts (POST and DELETE
/models/{v}/serve) and continuous training. The numbers and the rule are service.core.outcomes';
what they change, atomically, the store's."""

import logging
import secrets
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Path, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.core.errors import InvalidInput, ServiceError
from service.core.numbers import MAX_SEED, WHOLE
from service.core.schemas import (
    CanaryRule,
    JobParams,
    Model,
    ModelVersion,
    OutcomesReceipt,
    OutcomesRequest,
    ServeRequest,
)
from service.core.settings import Settings
from service.http import scoring
from service.http.bodies import outcomes_body
from service.http.deps import ADMIN, TRAIN, RunnerDep, SettingsDep, StoreDep
from service.http.direct import DirectRoute, json_answer
from service.http.openapi import json_body
from service.http.problems import problems
from service.runner.base import Runner
from service.state.base import Store

router = APIRouter()
log = logging.getLogger("sgd_service.outcomes")
MAX_SERVE_BODY = 1024  # bytes: three small numbers


class _OutcomesBody(DirectRoute):
    """POST /outcomes' body, counted, parsed and validated as POST /predict's is (after the
    token check); and the runner, for continuous training."""

    async def read(self, request: Request, settings: Settings) -> dict[str, Any]:
        arguments = await outcomes_body(request, self, settings)
        return {**arguments, "runner": request.state.runner}


async def record_outcomes(
    body: OutcomesRequest, runner: RunnerDep, store: StoreDep, settings: SettingsDep
) -> Response:
    """Record what really happened (the scores observed for these hours), score it against
    the versions live now (the served one, a canary) and the one named (prediction_id or
    model_version), and let a canary's rule promote or roll it back."""
    body.check_combinations()
    limit = settings.max_predict_batch
    if len(body.hours) > limit:
        raise InvalidInput(
            f"at most {limit} outcomes per request; split the request",
            [{"field": "hours", "message": "too many values", "code": "limit"}],
        )
    hours = np.array(body.hours, dtype=np.float64)
    scores = np.array(body.score, dtype=np.float64)
    for name, values in (("hours", hours), ("score", scores)):
        over = scoring.first_over(values, settings.max_abs_value)
        if over is not None:
            bound = settings.max_abs_value
            raise InvalidInput(
                f"every |{name}| must be at most SGD_MAX_ABS_VALUE={bound:g}",
                [{"field": f"{name}[{over}]", "message": f"at most {bound:g}", "code": "limit"}],
            )
    named = None
    if body.named_version is not None:
        named = store.held(body.named_version) or await run_in_threadpool(
            store.version, body.named_version
        )
    receipt = await run_in_threadpool(store.record_outcomes, hours, scores, named)
    decided = receipt.decision
    if decided is not None:
        log.info(
            "canary of version %d %s: %s",
            decided.version,
            decided.state.replace("_", " "),
            decided.reason,
            extra={"fields": decided.model_dump(mode="json")},
        )
    job = await run_in_threadpool(_retrain, store, runner, settings, receipt)
    if job is not None:
        receipt = receipt.model_copy(update={"retrain_job": job})
    return json_answer(receipt.model_dump_json().encode())


router.add_api_route(
    "/outcomes",
    record_outcomes,
    methods=["POST"],
    dependencies=[TRAIN],
    response_model=OutcomesReceipt,
    responses=problems(401, 404, 413, 422, 503),
    route_class_override=_OutcomesBody,
)


def _retrain(
    store: Store, runner: Runner, settings: Settings, receipt: OutcomesReceipt
) -> str | None:
    """Continuous training: every SGD_RETRAIN_AFTER outcomes, a fit on the last
    SGD_RETRAIN_ROWS of them, warm-started from the served version and rolled out as a canary
    that the rule judges; its job id. None when it is off, not due, or a canary runs already.
    The Idempotency-Key is the count reached, so that replicas crossing it at once make one."""
    every = settings.retrain_after
    if not every or receipt.total // every == (receipt.total - receipt.recorded) // every:
        return None
    served = store.model
    if served is None or store.canary is not None:
        return None
    hours, scores = store.recent_outcomes(settings.retrain_rows)
    if settings.retrain_fit_rows:
        hours, scores = _with_fit_rows(store.fit_rows(served.version), hours, scores, settings)
    if len(hours) < 2:
        return None
    params = _retrain_params(served, settings)
    key = f"sgd-retrain-{receipt.total // every}"
    x, y = hours.astype(np.float64).tobytes(), scores.astype(np.float64).tobytes()
    try:
        job, _ = runner.submit(params, len(hours), (x,), (y,), (key, "retrain"))
    except ServiceError as refused:  # a full queue, a drain: the outcomes are recorded anyway
        log.warning("continuous training could not start a fit: %s", refused.detail)
        return None
    log.info("continuous training: job %s on the last %d outcomes", job.id, len(hours))
    return job.id


def _with_fit_rows(
    rows: tuple[np.ndarray, np.ndarray] | None,
    hours: np.ndarray,
    scores: np.ndarray,
    settings: Settings,
) -> tuple[np.ndarray, np.ndarray]:
    """The served version's fit rows, then the outcomes: at most SGD_MAX_SAMPLES, the newest
    kept (the outcomes, then the fit's last rows)."""
    if rows is None:
        return hours, scores
    room = max(0, settings.max_samples - len(hours))
    start = max(0, len(rows[0]) - room)
    return np.concatenate((rows[0][start:], hours)), np.concatenate((rows[1][start:], scores))


def _retrain_params(served: Model, settings: Settings) -> JobParams:
    """The served version's fit, warm-started from it, published as a canary."""
    rule = CanaryRule(
        traffic=settings.retrain_traffic,
        promote_after=settings.retrain_promote_after,
        max_worse=settings.retrain_max_worse,
    )
    return served.params.model_copy(
        update={
            "epochs": settings.retrain_epochs,
            "init_w": served.w,
            "init_b": served.b,
            "init_from": served.version,
            "seed": secrets.randbelow(MAX_SEED + 1),
            "tol": None,
            "publish": "canary",
            "canary": rule,
        }
    )


# -- rollouts --------------------------------------------------------------------------------


def optional(extra: dict[str, Any]) -> dict[str, Any]:
    """A documented body that may be left out."""
    return {"requestBody": {**extra["requestBody"], "required": False}}


async def _serve_body(request: Request) -> ServeRequest:
    """The optional body of POST /models/{v}/serve (none: serve to everyone), read after the
    token check, at most MAX_SERVE_BODY bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SERVE_BODY:
            issue = {"field": "body", "message": "too long", "code": "limit"}
            raise InvalidInput(f"the body takes at most {MAX_SERVE_BODY} bytes", [issue])
    if not body.strip():
        return ServeRequest()
    try:
        asked = ServeRequest.model_validate(orjson.loads(body), strict=True)
    except orjson.JSONDecodeError as e:
        issue = {"field": "body", "message": str(e), "code": "json"}
        raise InvalidInput('the body is not JSON: send {} or {"traffic": 10}', [issue]) from None
    except ValidationError as e:
        issues = [
            {
                "field": ".".join(map(str, err["loc"])) or "body",
                "message": err["msg"],
                "code": err["type"],
            }
            for err in e.errors(include_url=False)[:20]
        ]
        raise InvalidInput("the body is not valid: see errors", issues) from None
    asked.check_combinations()
    return asked


async def serve_version(
    version: Annotated[int, Path(ge=1), WHOLE], request: Request, store: StoreDep
) -> ModelVersion:
    """Serve this kept version to everyone from now on, atomically (a rollback, or a
    promotion: of its canary too); or, with {"traffic": 1 to 99}, roll it out as a canary to
    that share of predictions, which a rule (promote_after, max_worse) may promote or roll
    back by itself; {"traffic": 0} rolls its canary back."""
    asked = await _serve_body(request)
    if asked.traffic == 100:
        model = await run_in_threadpool(store.serve, version)
    elif asked.traffic == 0:
        await run_in_threadpool(store.rollback, version)
        model = await run_in_threadpool(store.version, version)
    else:
        await run_in_threadpool(store.start_canary, version, asked.rule())
        model = await run_in_threadpool(store.version, version)
    return await run_in_threadpool(version_view, store, model)


router.add_api_route(
    "/models/{version}/serve",
    serve_version,
    methods=["POST"],
    dependencies=[ADMIN],
    responses=problems(401, 404, 409, 422),
    openapi_extra=optional(json_body(ServeRequest)),
)
BODIES = (ServeRequest,)


@router.delete(
    "/models/{version}/serve", dependencies=[ADMIN], responses=problems(401, 404, 409, 422)
)
async def rollback(version: Annotated[int, Path(ge=1), WHOLE], store: StoreDep) -> ModelVersion:
    """Roll back the canary of this version: every prediction goes to the stable one again."""
    model = await run_in_threadpool(store.version, version)
    await run_in_threadpool(store.rollback, version)
    return await run_in_threadpool(version_view, store, model)


def version_view(store: Store, model: Model) -> ModelVersion:
    """A kept version as GET /models/{v} shows it: served or not, its live quality and its
    latest rollout (reads of the store: off the event loop)."""
    return ModelVersion.of(
        model, store.model, store.quality(model.version), store.rollout(model.version)
    )
