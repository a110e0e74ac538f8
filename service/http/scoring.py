"""Scores of many hours at once: w * hours + b over a whole batch, in numpy.

Per value in Python, a batch of 100,000 hours costs ~5 ms to score and as much again to check;
numpy does both in ~0.1 ms. The arithmetic is Model.predict's, the same two float64 operations
in the same order (a multiply, then an add: never fused), so every score equals the one
GET /predict gives. An interval's bounds are the scores -+ its half width, in one array.
"""

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from service.core.intervals import Method
from service.core.outcomes import prediction_id, to_canary
from service.core.schemas import Model
from service.state.base import Store

Floats = npt.NDArray[np.float64]


def scores(model: Model, hours: Floats, overflow: Callable[[int], Exception]) -> Floats:
    """The model's score of each of `hours`; raises overflow(i) for the first that is not a
    finite float."""
    with np.errstate(all="ignore"):  # an overflow is an infinity, refused below
        out: Floats = hours * model.w + model.b
    finite = np.isfinite(out)
    if not finite.all():
        raise overflow(int(np.argmin(finite)))
    return out


async def half_width(
    model: Model, hours: float | Floats, coverage: float, method: Method | None
) -> tuple[Method, float | Floats]:
    """Model.half_width, in the threadpool when it waits on a shared store (a kept version
    read from Redis), else at once."""
    if model.intervals_wait:
        return await run_in_threadpool(model.half_width, hours, coverage, method)
    return model.half_width(hours, coverage, method)


def bounds(
    scores: Floats, half: float | Floats, overflow: Callable[[], Exception]
) -> tuple[Floats, Floats] | None:
    """scores -+ half (an interval's half width, one or one per score); None when it is
    unbounded (an infinite half width of a conformal interval); raises overflow() when a
    bound is not a finite float."""
    if isinstance(half, float) and half == math.inf:
        return None
    with np.errstate(all="ignore"):
        both = np.add(scores, _SIGNS * half)  # one array: [lower, upper]
    if not np.isfinite(both).all():
        raise overflow()
    return both[0], both[1]


_SIGNS = np.array([[-1.0], [1.0]])


def first_over(hours: Floats, limit: float) -> int | None:
    """The index of the first value that is not finite or is over `limit` in magnitude."""
    if not len(hours) or (-limit <= hours.min() and hours.max() <= limit):  # False with a NaN
        return None
    within = np.abs(hours) <= limit  # False for NaN, and for an infinity past any limit
    return int(np.argmin(within))


# -- which version answers, and the id of its answer -----------------------------------------

CALLER_KEY = b"x-caller-key"
PREDICTION_ID = "x-prediction-id"


def routed(store: Store, served: Model, key: str | None) -> Model:
    """The version that answers this prediction: the canary for its share of them (by the
    caller's key when it gives one), else the served one. One attribute read when no canary
    runs."""
    canary = store.canary
    if canary is not None and to_canary(canary.rollout.traffic, key):
        return canary.model
    return served


def caller_key(scope: Scope) -> str | None:
    """The X-Caller-Key header's value, read only when a canary runs."""
    for name, value in scope["headers"]:
        if name == CALLER_KEY:
            return str(value.decode("latin-1"))
    return None


def answered_by(model: Model) -> dict[str, str]:
    """The headers of a prediction's answer: its id, which names the version."""
    return {PREDICTION_ID: prediction_id(model.version)}
