"""Learning from what happened: how a version did on recorded outcomes, how predictions are split
between a stable version and a canary, and the rule that promotes or rolls back the canary.

Pure functions and values; the stores (service.state) keep the numbers, atomically.

Every outcome is scored against each version live when it arrives (the served one and the
canary), each by its own prediction for those hours, whichever of them answered the caller: a
version's prediction is a function of the hours, so the two are compared on the same outcomes,
and a 10% canary needs no more outcomes than the stable version to be judged.
"""

import hashlib
import math
import random
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from service.core.errors import IntervalUnavailable
from service.core.schemas import Model, Quality, Rollout

# The nominal coverage of the interval a version's live coverage is measured with.
QUALITY_COVERAGE = 0.9


@dataclass(frozen=True)
class Scored:
    """One version's errors on a batch of outcomes: |score - prediction|, and whether each
    lies inside its 90% interval (None when the version has no interval)."""

    version: int
    errors: np.ndarray
    hits: np.ndarray | None


def score(model: Model, hours: np.ndarray, scores: np.ndarray) -> Scored:
    """How `model` did on these outcomes. An error too large for a float counts as the largest
    float, so that a version that overflows is judged worst, never NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        errors = np.abs(scores - (model.w * hours + model.b))
    errors = np.nan_to_num(errors, nan=np.finfo(np.float64).max)
    hits = None
    if model.intervals is not None and model.intervals.methods:
        try:
            _, half = model.half_width(hours, QUALITY_COVERAGE, None)
        except IntervalUnavailable:
            pass
        else:
            hits = errors <= half
    return Scored(model.version, errors, hits)


def quality(errors: np.ndarray, hits: np.ndarray | None, window: int) -> Quality | None:
    """The figures of a version's window of errors (the newest last), None when empty."""
    if not len(errors):
        return None
    big = np.finfo(np.float64).max
    with np.errstate(over="ignore"):
        mae = min(float(np.mean(errors)), big)
        rmse = min(math.sqrt(min(float(np.mean(np.square(errors))), big)), big)
    coverage = None if hits is None or not len(hits) else float(np.mean(hits))
    return Quality(outcomes=len(errors), window=window, mae=mae, rmse=rmse, coverage=coverage)


# -- the split ------------------------------------------------------------------------------


def bucket(key: str) -> int:
    """The caller key's percentile, 0 to 99: the same on every replica and every run (Python's
    own hash() is salted per process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


def to_canary(traffic: int, key: str | None) -> bool:
    """Whether this prediction goes to the canary: by the key's bucket, or at random."""
    if key is None:
        return random.random() * 100 < traffic  # noqa: S311 (a split, not a secret)
    return bucket(key) < traffic


def prediction_id(version: int) -> str:
    """The id an answer carries (X-Prediction-Id): the version that answered, and 64 random
    bits to tell answers apart (not a secret: an id only names a version, which a caller may
    name anyway). The version is in the id, so nothing is stored per prediction."""
    return f"v{version}-{random.getrandbits(64):016x}"


# -- the rule -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """The canary being rolled out, as the predict path reads it: one attribute."""

    model: Model
    rollout: Rollout


def with_figures(rollout: Rollout, outcomes: int, canary_sum: float, stable_sum: float) -> Rollout:
    """The rollout with its outcomes and the two MAEs of these sums of absolute errors."""
    if not outcomes:
        return rollout
    big = np.finfo(np.float64).max
    return rollout.model_copy(
        update={
            "outcomes": outcomes,
            "mae": min(canary_sum / outcomes, big),
            "stable_mae": min(stable_sum / outcomes, big),
        }
    )


def verdict(rollout: Rollout) -> tuple[str, str] | None:
    """("promoted" or "rolled_back", why) once the rule can decide, else None."""
    if rollout.promote_after is None or rollout.outcomes < rollout.promote_after:
        return None
    assert rollout.mae is not None
    assert rollout.stable_mae is not None
    limit = rollout.stable_mae * (1 + rollout.max_worse)
    figures = (
        f"MAE {rollout.mae:.6g} against {rollout.stable_mae:.6g} for version "
        f"{rollout.stable_version} on the same {rollout.outcomes} outcomes"
    )
    if rollout.mae <= limit:
        return "promoted", f"{figures}: within max_worse={rollout.max_worse:g}"
    return "rolled_back", f"{figures}: worse by more than max_worse={rollout.max_worse:g}"


def ended(rollout: Rollout, state: str, reason: str, at: datetime) -> Rollout:
    return rollout.model_copy(update={"state": state, "reason": reason, "ended_at": at})
