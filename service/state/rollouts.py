"""What a canary rollout may become, decided once for both stores (as service.state.jobs decides
for jobs): when one may start, what serving a version by hand does to it, and the conflicts.
The numbers and the rule are service.core.outcomes'."""

from datetime import datetime

from service.core.errors import RolloutConflict
from service.core.schemas import CanaryRule, Model, Rollout


def started(
    model: Model, served: Model | None, canary: Rollout | None, rule: CanaryRule, at: datetime
) -> Rollout:
    """The rollout of `model` as a canary of `rule.traffic` percent; RolloutConflict when
    nothing is served, it is served already, or another canary runs."""
    if canary is not None:
        raise running(canary, f"version {model.version} cannot start")
    if served is None:
        raise RolloutConflict("no version is served yet: serve one to everyone first (traffic 100)")
    if served.version == model.version:
        raise RolloutConflict(f"version {model.version} is served to everyone already")
    return Rollout(
        version=model.version,
        stable_version=served.version,
        traffic=rule.traffic,
        promote_after=rule.promote_after,
        max_worse=rule.max_worse,
        started_at=at,
    )


def running(rollout: Rollout, what: str) -> RolloutConflict:
    return RolloutConflict(
        f"a canary of version {rollout.version} runs ({rollout.traffic}%): {what} until it "
        f"ends; promote it (POST /models/{rollout.version}/serve) or roll it back "
        f"(DELETE /models/{rollout.version}/serve)"
    )


def check_serve(version: int, canary: Rollout | None) -> bool:
    """Whether serving `version` to everyone promotes the running canary; RolloutConflict when
    a canary of another version runs."""
    if canary is None:
        return False
    if canary.version != version:
        raise running(canary, f"serving version {version} by hand waits")
    return True


def check_rollback(version: int, canary: Rollout | None) -> Rollout:
    """The running canary, if it is `version`'s; else RolloutConflict."""
    if canary is None or canary.version != version:
        now = "none runs" if canary is None else f"version {canary.version}'s runs"
        raise RolloutConflict(f"version {version} is not being rolled out as a canary ({now})")
    return canary


PROMOTED_BY_HAND = "promoted by hand (POST /models/{v}/serve)"
ROLLED_BACK_BY_HAND = "rolled back by hand"


def superseded(version: int) -> str:
    return f"version {version} was published to everyone while it ran"


def as_fit_says(
    model: Model, served: Model | None, canary: Rollout | None, at: datetime
) -> tuple[Rollout | None, str | None]:
    """A fit's version with publish "canary": its rollout, or why it could not start (the
    version is kept, not served)."""
    rule = model.params.canary
    assert rule is not None
    try:
        return started(model, served, canary, rule, at), None
    except RolloutConflict as refused:
        return None, f"not rolled out as a canary: {refused.detail}"
