"""MemoryStore: the Store in this process's memory (one replica, no Redis). What each job
becomes is service.state.jobs' to decide; this module keeps the results in dicts under one lock,
and each history as float64 chunks."""

import bisect
import threading
from array import array
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core import outcomes
from service.core.outcomes import Canary
from service.core.schemas import (
    CanaryRule,
    FitReport,
    History,
    Job,
    JobParams,
    JobStatus,
    Model,
    OutcomesReceipt,
    Quality,
    Rollout,
)
from service.state import jobs, rollouts
from service.state.base import Column, HistoryPage, Page, floats
from service.state.changes import Changes


class _Column:
    """float64 values of one history column, kept as the chunks they arrived in.

    Appending stores a chunk next to the others and never moves what is already recorded. A
    single growing array('d') did: its reallocations copied the whole history while holding
    the GIL, up to ~10 ms at a time for a 2,000,000-epoch fit, which /predict paid in its p99.
    A read-only float64 memoryview (the runner's, over bytes from the worker) is kept as it is.
    """

    def __init__(self) -> None:
        self._chunks: list[memoryview[float]] = []
        self._starts: list[int] = [0]  # where each chunk starts; the last entry is the length

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> float:
        c = bisect.bisect_right(self._starts, i) - 1
        return self._chunks[c][i - self._starts[c]]

    def extend(self, values: Sequence[float]) -> None:
        if not values:
            return
        if isinstance(values, memoryview) and values.readonly and values.format == "d":
            chunk = values  # immutable: nothing to copy
        else:
            chunk = memoryview(array("d", values))
        self._chunks.append(chunk)
        self._starts.append(len(self) + len(chunk))

    def take(self, start: int, stop: int, step: int) -> list["memoryview[float]"]:
        """The values at range(start, stop, step): views of the chunks, nothing copied."""
        out = []
        i = start
        for chunk, first in zip(self._chunks, self._starts, strict=False):
            end = min(stop, first + len(chunk))
            if i < end:
                part = chunk[i - first : end - first : step]
                out.append(part)
                i += len(part) * step
        return out


@dataclass
class _History:
    """Per-epoch columns: 8 bytes per value, 16-24 bytes per epoch."""

    w: _Column = field(default_factory=_Column)
    loss: _Column = field(default_factory=_Column)
    b: _Column | None = None
    val_loss: _Column | None = None  # created by the first chunk that has it

    @classmethod
    def of(cls, job: Job) -> "_History":
        return cls(
            b=_Column() if job.params.fit_intercept else None,
            val_loss=_Column() if job.params.validation_fraction else None,
        )


class _Window:
    """A version's last `size` outcome errors and whether each was inside its interval."""

    def __init__(self, size: int) -> None:
        self.errors: deque[float] = deque(maxlen=size)
        self.hits: deque[bool] = deque(maxlen=size)

    def add(self, scored: outcomes.Scored) -> None:
        self.errors.extend(scored.errors.tolist())
        if scored.hits is None:
            self.hits.clear()
        else:
            self.hits.extend(scored.hits.tolist())

    def quality(self) -> Quality | None:
        errors = np.fromiter(self.errors, dtype=np.float64, count=len(self.errors))
        hits = np.fromiter(self.hits, dtype=bool, count=len(self.hits)) if self.hits else None
        return outcomes.quality(errors, hits, self.errors.maxlen or 0)


class MemoryStore:
    """In-process state guarded by one lock; the default store."""

    def __init__(
        self,
        keep_jobs: int,
        keep_versions: int = 100,
        keep_outcomes: int = 100_000,
        quality_window: int = 1000,
        keep_fit_rows: bool = False,
    ) -> None:
        self._keep_jobs = keep_jobs
        self._keep_versions = keep_versions
        self._quality_window = quality_window
        self._canary: Canary | None = None
        self._sums = (0, 0.0, 0.0)  # the running canary's outcomes, its and the stable's |e| sums
        self._rollouts: dict[int, Rollout] = {}  # each version's latest rollout
        self._windows: dict[int, _Window] = {}
        self._outcome_hours: deque[float] = deque(maxlen=keep_outcomes)
        self._outcome_scores: deque[float] = deque(maxlen=keep_outcomes)
        self._outcomes_total = 0
        self._keep_fit_rows = keep_fit_rows
        self._samples: dict[str, tuple[bytes, bytes]] = {}  # open jobs' rows, to keep
        self._rows: dict[int, tuple[bytes, bytes]] = {}  # kept versions' fit rows
        self._versions: dict[int, Model] = {}  # kept versions, oldest first
        self._last_version = 0
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # insertion order is creation order
        self._histories: dict[str, _History] = {}
        self._ended: dict[str, None] = {}  # ended job ids in the order they ended
        self._idempotency: dict[str, tuple[str, str]] = {}  # key -> (body fingerprint, job id)
        self._latest_started: str | None = None
        self._model: Model | None = None
        self.changes = Changes()

    @property
    def model(self) -> Model | None:
        """The served model: one attribute read, never a lock."""
        return self._model

    @property
    def canary(self) -> Canary | None:
        """The canary being rolled out: one attribute read, never a lock."""
        return self._canary

    unreachable = None  # in this process: always known

    def create_job(
        self,
        params: JobParams,
        n_samples: int,
        idempotency: tuple[str, str] | None = None,
        max_queued: int | None = None,
        samples: tuple[bytes, bytes] | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job, or (for a repeated Idempotency-Key and body) the original one."""
        with self._lock:
            if idempotency is not None:
                key, fingerprint = idempotency
                seen = self._idempotency.get(key)
                if seen is not None:
                    if seen[0] != fingerprint:
                        raise jobs.key_reused(key)
                    return self._jobs[seen[1]], False
            if max_queued is not None:
                queued = sum(j.status is JobStatus.queued for j in self._jobs.values())
                if queued >= max_queued:
                    raise jobs.queue_full(queued, max_queued)
            job = jobs.new_job(params, n_samples, jobs.now())
            self._jobs[job.id] = job
            if samples is not None and self._keep_fit_rows:
                self._samples[job.id] = samples
            if idempotency is not None:
                self._idempotency[idempotency[0]] = (idempotency[1], job.id)
            return job, True

    def get_job(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise jobs.job_not_found(job_id) from None

    def list_jobs(self, limit: int) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
        return jobs[::-1][:limit]

    def job_counts(self) -> dict[JobStatus, int]:
        """How many kept jobs are in each state (for metrics)."""
        with self._lock:
            return Counter(j.status for j in self._jobs.values())

    def start_job(self, job_id: str) -> Job | None:
        """Mark a queued job running; None if it was cancelled (or evicted) meanwhile."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status is not JobStatus.queued:
                return None
            job = self._put(jobs.started(job, jobs.now()))
            self._histories[job_id] = _History.of(job)
            self._latest_started = job_id
            return job

    def retry_job(self, job_id: str) -> Job:
        """Start the next attempt of a running job whose worker died: its history starts over."""
        with self._lock:
            job = jobs.retried(self.get_job(job_id))
            self._histories[job_id] = _History.of(job)
            return self._put(job)

    def append_history(
        self,
        job_id: str,
        w: Sequence[float],
        b: Sequence[float] | None,
        loss: Sequence[float],
        val_loss: Sequence[float] | None = None,
    ) -> None:
        """Record consecutive epochs of a running job."""
        with self._lock:
            hist = self._histories[job_id]
            hist.w.extend(w)
            hist.loss.extend(loss)
            if hist.b is not None and b is not None:
                hist.b.extend(b)
            if hist.val_loss is not None and val_loss is not None:
                hist.val_loss.extend(val_loss)
            self._put(jobs.progressed(self._jobs[job_id], len(hist.w)))

    def succeed_job(self, job_id: str, report: FitReport) -> Job:
        """End a job successfully and keep its model as the next version, atomically; serve it
        as the job's `publish` says."""
        with self._lock:
            job = self._running(job_id)
            self._last_version += 1
            ended = jobs.now()
            model = jobs.model_of(job, self._last_version, report, ended)
            served, why_not = jobs.publication(job, report, self._model)
            self._versions[model.version] = model
            rows = self._samples.pop(job_id, None)
            if rows is not None:
                self._rows[model.version] = rows
            if job.params.publish == "canary":
                rollout, why_not = rollouts.as_fit_says(model, self._model, self._rolling, ended)
                if rollout is not None:
                    self._begin(model, rollout)
            result = jobs.result_of(model, report, served, why_not)
            job = self._put(jobs.succeeded(job, result, ended))
            if served:
                self._end_canary("rolled_back", rollouts.superseded(model.version), ended)
                self._model = model  # the one assignment that publishes the new version
            self._ended[job_id] = None
            self._evict()
            return job

    def versions(self, limit: int) -> list[Model]:
        with self._lock:
            return list(self._versions.values())[::-1][:limit]

    def version(self, version: int) -> Model:
        try:
            return self._versions[version]
        except KeyError:
            raise jobs.version_not_found(version) from None

    def held(self, version: int) -> Model | None:
        return self._versions.get(version)

    def serve(self, version: int) -> Model:
        with self._lock:
            model = self.version(version)
            if rollouts.check_serve(version, self._rolling):
                self._end_canary("promoted", rollouts.PROMOTED_BY_HAND, jobs.now())
            self._model = model  # the one assignment, as a publication
            return model

    # -- canaries, outcomes and live quality ---------------------------------------------------

    def start_canary(self, version: int, rule: CanaryRule) -> Rollout:
        """Roll `version` out to rule.traffic percent of predictions; RolloutConflict when
        another canary runs, nothing is served or it is served already."""
        with self._lock:
            model = self.version(version)
            rollout = rollouts.started(model, self._model, self._rolling, rule, jobs.now())
            self._begin(model, rollout)
            return rollout

    def rollback(self, version: int) -> Rollout:
        """End the canary of `version`: every prediction goes to the stable version again."""
        with self._lock:
            rollouts.check_rollback(version, self._rolling)
            ended = self._end_canary("rolled_back", rollouts.ROLLED_BACK_BY_HAND, jobs.now())
            assert ended is not None
            return ended

    def rollout(self, version: int) -> Rollout | None:
        """The latest rollout of `version` (running or ended), None if it had none."""
        return self._rollouts.get(version)

    def quality(self, version: int) -> Quality | None:
        """`version`'s live quality over its window, None before its first outcome."""
        with self._lock:
            window = self._windows.get(version)
            return None if window is None else window.quality()

    def record_outcomes(
        self, hours: np.ndarray, scores: np.ndarray, named: Model | None = None
    ) -> OutcomesReceipt:
        """Keep these outcomes, score them against the live versions (the served one, the
        canary) and `named`, and let the canary's rule decide, atomically."""
        with self._lock:
            live = {m.version: m for m in (self._model, named) if m is not None}
            canary = self._canary
            if canary is not None:
                live[canary.model.version] = canary.model
            scored = {v: outcomes.score(m, hours, scores) for v, m in live.items()}
            for v, s in scored.items():
                self._windows.setdefault(v, _Window(self._quality_window)).add(s)
            self._outcome_hours.extend(hours.tolist())
            self._outcome_scores.extend(scores.tolist())
            self._outcomes_total += len(hours)
            decision = None
            if canary is not None:
                decision = self._judge(canary, scored)
            return OutcomesReceipt(
                recorded=len(hours),
                kept=len(self._outcome_hours),
                total=self._outcomes_total,
                versions=sorted(scored),
                decision=decision,
            )

    def recent_outcomes(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The last `limit` kept outcomes, hours and scores, oldest first."""
        with self._lock:
            n = min(limit, len(self._outcome_hours))
            hours = list(self._outcome_hours)[len(self._outcome_hours) - n :]
            scores = list(self._outcome_scores)[len(self._outcome_scores) - n :]
        return np.array(hours, dtype=np.float64), np.array(scores, dtype=np.float64)

    def fit_rows(self, version: int) -> tuple[np.ndarray, np.ndarray] | None:
        rows = self._rows.get(version)
        if rows is None:
            return None
        return np.frombuffer(rows[0], dtype=np.float64), np.frombuffer(rows[1], dtype=np.float64)

    def _judge(self, canary: Canary, scored: dict[int, outcomes.Scored]) -> Rollout | None:
        """Add a batch's errors to the canary's sums; end it if its rule decides now."""
        rollout = canary.rollout
        n, mine, theirs = self._sums
        n += len(scored[rollout.version].errors)
        mine += float(np.sum(scored[rollout.version].errors))
        theirs += float(np.sum(scored[rollout.stable_version].errors))
        self._sums = (n, mine, theirs)
        rollout = outcomes.with_figures(rollout, n, mine, theirs)
        self._canary = Canary(canary.model, rollout)
        self._rollouts[rollout.version] = rollout
        decided = outcomes.verdict(rollout)
        if decided is None:
            return None
        state, reason = decided
        if state == "promoted":
            self._model = canary.model
        return self._end_canary(state, reason, jobs.now())

    @property
    def _rolling(self) -> Rollout | None:
        return None if self._canary is None else self._canary.rollout

    def _begin(self, model: Model, rollout: Rollout) -> None:
        self._sums = (0, 0.0, 0.0)
        self._rollouts[model.version] = rollout
        self._canary = Canary(model, rollout)  # the one assignment that splits predictions

    def _end_canary(self, state: str, reason: str, at: Any) -> Rollout | None:
        canary = self._canary
        if canary is None:
            return None
        ended = outcomes.ended(self._rollouts[canary.model.version], state, reason, at)
        self._rollouts[ended.version] = ended
        self._canary = None
        return ended

    def end_job(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> Job:
        """End a job as failed or cancelled; nothing it produced is served."""
        with self._lock:
            job = self._put(jobs.ended(self._running(job_id), status, error, jobs.now()))
            self._samples.pop(job_id, None)
            self._ended[job_id] = None
            self._evict()
            return job

    def history(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> History:
        """A page of a job's history (the latest started job by default), thinned evenly."""
        return self.history_page(job_id, since, limit, max_points).model()

    def history_page(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> "HistoryPage":
        """history(), its columns kept as float64 arrays."""
        with self._lock:
            job_id = job_id or self._latest_started
            if job_id is None:
                raise jobs.no_history()
            job = self.get_job(job_id)
            hist = self._histories.get(job_id)
            if hist is None:
                raise jobs.no_history(job_id)
            page = Page.of(len(hist.w), since, limit, max_points)

            def pick(col: _Column) -> Column:
                tail = floats([col[i] for i in page.tail])
                return Column((*col.take(page.start, page.end, page.stride), tail))

            columns = {"w": pick(hist.w), "loss": pick(hist.loss)}
            for name, col in (("b", hist.b), ("val_loss", hist.val_loss)):
                if col is not None:
                    columns[name] = pick(col)
        return HistoryPage(job, page, columns)

    def _running(self, job_id: str) -> Job:
        """A job that has not ended yet (queued or running)."""
        job = self.get_job(job_id)
        jobs.check_open(job)
        return job

    def _put(self, job: Job) -> Job:
        """Keep the job's next snapshot and tell its watchers."""
        self._jobs[job.id] = job
        self.changes.changed(job.id)
        return job

    def _evict(self) -> None:
        """Forget the ended jobs and the versions retention lets go (jobs.evicted_*)."""
        served = self._model
        for job_id in jobs.evicted_jobs(
            list(self._ended), served.job_id if served else None, self._keep_jobs
        ):
            del self._ended[job_id]
            del self._jobs[job_id]
            self._histories.pop(job_id, None)
            self.changes.changed(job_id)
        live = set(self._jobs)
        self._idempotency = {k: v for k, v in self._idempotency.items() if v[1] in live}
        canary = self._canary.model.version if self._canary else None
        for v in jobs.evicted_versions(
            list(self._versions), served.version if served else None, self._keep_versions, canary
        ):
            del self._versions[v]
            self._rollouts.pop(v, None)
            self._windows.pop(v, None)
            self._rows.pop(v, None)


if TYPE_CHECKING:
    from service.state.base import Store

    def _is_a_store(m: MemoryStore) -> Store:
        """mypy's check that MemoryStore is a Store."""
        return m
