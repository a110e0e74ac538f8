"""Outcomes, live quality and canary rollouts in Redis (Outcomes, a base of RedisStore).

What lives where (under SGD_REDIS_PREFIX, beside redis_jobs' keys):

    canary            the running canary's Rollout as JSON (absent: none runs)
    canary:sums       hash: n, mine, theirs: its outcomes and both versions' |error| sums
    rollouts          hash: version -> its latest Rollout JSON (running or ended)
    quality:{v}       list: version v's last quality_window outcomes, newest first, each 16
                      bytes (|error|, 1.0 inside its 90% interval, 0.0 outside, NaN: none)
    outcomes          list: the last keep_outcomes outcomes, oldest first, 16 bytes each
                      (hours, score)
    outcomes:total    outcomes recorded since the store began
    outcomes:batch:{token}  a batch that landed, for a minute: a batch sent twice (a cut
                      connection after EXEC) lands once

A change of the canary is announced on the `served` channel: every replica's watcher reads the
served model and the canary together, so all of them split predictions the same way within
its re-read period. Recording a batch is one transaction that watches the served model and the
canary, so its scores count for the versions that were live; the rule's decision is a second
transaction that ends the canary only if it is still the one judged: replicas that record at
once decide once.
"""

import uuid
from typing import Any

import numpy as np

from service.core import outcomes
from service.core.outcomes import Canary
from service.core.schemas import CanaryRule, Model, OutcomesReceipt, Quality, Rollout
from service.state import jobs, rollouts
from service.state.redis_jobs import Pipeline, RedisJobs, available

BATCH_SECONDS = 60


class Outcomes(RedisJobs):
    """The Store's canary, outcome and quality methods on Redis."""

    _keep_outcomes: int = 100_000
    _quality_window: int = 1000

    # -- what the watcher and the predict path read ----------------------------------------

    @property
    def canary(self) -> Canary | None:
        """The canary as this replica last saw it: an attribute read, never Redis."""
        held: Canary | None = self._watcher.canary  # type: ignore[attr-defined]
        return held

    # -- canaries --------------------------------------------------------------------------

    @available
    def start_canary(self, version: int, rule: CanaryRule) -> Rollout:
        def start(pipe: Pipeline) -> Rollout:
            model, served, canary = self._live(pipe, version)
            rollout = rollouts.started(model, served, canary, rule, jobs.now())
            pipe.multi()
            self._begin(pipe, rollout)
            return rollout

        rollout = self._transact(self._keys("served", "canary", "models"), start)
        self._watcher.refresh()  # type: ignore[attr-defined]
        return rollout

    @available
    def rollback(self, version: int) -> Rollout:
        def roll_back(pipe: Pipeline) -> Rollout:
            canary = rollouts.check_rollback(version, self._running(pipe))
            why = rollouts.ROLLED_BACK_BY_HAND
            ended = self._ended_now(pipe, canary, "rolled_back", why)
            pipe.multi()
            self._end(pipe, ended, promote=None)
            return ended

        ended = self._transact(self._keys("canary", "canary:sums"), roll_back)
        self._watcher.refresh()  # type: ignore[attr-defined]
        return ended

    @available
    def rollout(self, version: int) -> Rollout | None:
        doc = self.redis.hget(self._key("rollouts"), str(version))
        if doc is None:
            return None
        rollout = Rollout.model_validate_json(doc)
        if rollout.state == "running":
            return self._with_sums(rollout, self.redis.hmget(self._key("canary:sums"), *SUMS))
        return rollout

    # -- outcomes and quality --------------------------------------------------------------

    @available
    def quality(self, version: int) -> Quality | None:
        raw = self.redis.lrange(self._key("quality", str(version)), 0, -1)
        if not raw:
            return None
        pairs = np.frombuffer(b"".join(raw), dtype=np.float64).reshape(-1, 2)
        hits = pairs[:, 1]
        known = None if np.isnan(hits).any() else hits > 0.5
        return outcomes.quality(pairs[:, 0], known, self._quality_window)

    @available
    def record_outcomes(
        self, hours: np.ndarray, scores: np.ndarray, named: Model | None = None
    ) -> OutcomesReceipt:
        token = uuid.uuid4().hex
        batch_key = self._key("outcomes", "batch", token)
        packed = np.column_stack((hours, scores)).astype(np.float64)
        rows = [packed[i].tobytes() for i in range(len(packed))]

        def record(pipe: Pipeline) -> tuple[Rollout | None, list[int], list[Any]] | None:
            if pipe.exists(batch_key):  # landed before a cut connection: once only
                return None
            live = self._live_now(pipe, named)
            canary = self._running(pipe)
            scored = {v: outcomes.score(m, hours, scores) for v, m in live.items()}
            pipe.multi()
            pipe.set(batch_key, b"1", ex=BATCH_SECONDS)
            pipe.rpush(self._key("outcomes"), *rows)
            pipe.ltrim(self._key("outcomes"), -self._keep_outcomes, -1)
            pipe.incrby(self._key("outcomes:total"), len(rows))
            for v, s in scored.items():
                key = self._key("quality", str(v))
                hit = np.full(len(s.errors), np.nan) if s.hits is None else s.hits
                pairs = np.column_stack((s.errors, hit)).astype(np.float64)
                pipe.lpush(key, *(pairs[i].tobytes() for i in range(len(pairs))))
                pipe.ltrim(key, 0, self._quality_window - 1)
            if canary is not None:
                sums = self._key("canary:sums")
                pipe.hincrby(sums, "n", len(rows))
                mine = float(np.sum(scored[canary.version].errors))
                pipe.hincrbyfloat(sums, "mine", min(mine, 1e300))
                theirs = float(np.sum(scored[canary.stable_version].errors))
                pipe.hincrbyfloat(sums, "theirs", min(theirs, 1e300))
            return canary, sorted(scored), pipe.execute()

        recorded = self._transact([*self._keys("served", "canary"), batch_key], record)
        if recorded is None:
            return self._receipt(len(rows), [], None)
        canary, versions, replies = recorded
        decision = None
        if canary is not None:
            n, mine_sum, theirs_sum = replies[-3:]
            judged = outcomes.with_figures(canary, int(n), float(mine_sum), float(theirs_sum))
            decision = self._judge(judged)
        return self._receipt(len(rows), versions, decision)

    @available
    def recent_outcomes(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        raw = self.redis.lrange(self._key("outcomes"), -limit, -1)
        pairs = np.frombuffer(b"".join(raw), dtype=np.float64).reshape(-1, 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    # -- the pieces ------------------------------------------------------------------------

    def _receipt(
        self, recorded: int, versions: list[int], decision: Rollout | None
    ) -> OutcomesReceipt:
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self._key("outcomes"))
        pipe.get(self._key("outcomes:total"))
        kept, total = pipe.execute()
        return OutcomesReceipt(
            recorded=recorded,
            kept=int(kept),
            total=int(total or 0),
            versions=versions,
            decision=decision,
        )

    def _judge(self, judged: Rollout) -> Rollout | None:
        """End the canary `judged` as its rule says, if it is still the one running."""
        decided = outcomes.verdict(judged)
        if decided is None:
            return None
        state, reason = decided

        def decide(pipe: Pipeline) -> Rollout | None:
            canary = self._running(pipe)
            if canary is None or canary.started_at != judged.started_at:
                return None  # another replica decided first
            ended = outcomes.ended(judged, state, reason, jobs.now())
            promote = None
            if state == "promoted":
                promote = pipe.hget(self._key("models"), str(judged.version))
            pipe.multi()
            self._end(pipe, ended, promote)
            return ended

        ended = self._transact(self._keys("canary", "served"), decide)
        if ended is None:
            return None
        self._watcher.refresh()  # type: ignore[attr-defined]
        return ended

    def _keys(self, *names: str) -> list[str]:
        return [self._key(name) for name in names]

    def _live(self, pipe: Pipeline, version: int) -> tuple[Model, Model | None, Rollout | None]:
        """A kept version, the served model and the running canary, read under WATCH."""
        doc = pipe.hget(self._key("models"), str(version))
        if doc is None:
            raise jobs.version_not_found(version)
        served_doc = pipe.get(self._key("served"))
        served = None if served_doc is None else Model.model_validate_json(served_doc)
        return Model.model_validate_json(doc), served, self._running(pipe)

    def _live_now(self, pipe: Pipeline, named: Model | None) -> dict[int, Model]:
        """The versions an outcome is scored against: served, canary, and `named`."""
        live: dict[int, Model] = {}
        if named is not None:
            live[named.version] = named
        served_doc = pipe.get(self._key("served"))
        running = self._running(pipe)
        wanted = [] if running is None else [running.version]
        if served_doc is not None:
            served = Model.model_validate_json(served_doc)
            live[served.version] = self._holding(served)
        for v in wanted:
            if v not in live:
                live[v] = self.version(v)  # type: ignore[attr-defined]
        return live

    def _holding(self, model: Model) -> Model:
        """The model with its residuals: the watcher's copy when it is the same version."""
        held: Model | None = self._watcher.model  # type: ignore[attr-defined]
        if held is not None and held.version == model.version:
            return held
        version: Model = self.version(model.version)  # type: ignore[attr-defined]
        return version

    def _running(self, client: Any) -> Rollout | None:
        doc = client.get(self._key("canary"))
        return None if doc is None else Rollout.model_validate_json(doc)

    def _with_sums(self, rollout: Rollout, sums: list[bytes | None]) -> Rollout:
        n, mine, theirs = (float(v) if v is not None else 0.0 for v in sums)
        return outcomes.with_figures(rollout, int(n), mine, theirs)

    def _ended_now(self, pipe: Pipeline, canary: Rollout, state: str, reason: str) -> Rollout:
        figures = self._with_sums(canary, pipe.hmget(self._key("canary:sums"), *SUMS))
        return outcomes.ended(figures, state, reason, jobs.now())

    def _begin(self, pipe: Pipeline, rollout: Rollout) -> None:
        doc = rollout.model_dump_json()
        pipe.set(self._key("canary"), doc)
        pipe.delete(self._key("canary:sums"))
        pipe.hset(self._key("rollouts"), str(rollout.version), doc)
        pipe.publish(self._channels + "served", str(rollout.version))

    def _end(self, pipe: Pipeline, ended: Rollout, promote: bytes | None) -> None:
        """End the canary as `ended` says; with `promote` (its Model JSON), serve it."""
        pipe.delete(self._key("canary"), self._key("canary:sums"))
        pipe.hset(self._key("rollouts"), str(ended.version), ended.model_dump_json())
        if promote is not None:
            pipe.set(self._key("served"), promote)
        pipe.publish(self._channels + "served", str(ended.version))


SUMS = ("n", "mine", "theirs")
