"""The seams of the state package: the Store protocol (the one owner of mutable state: published
model versions, jobs and their histories), the WorkerStore protocol (what a training worker
process needs from the shared store), and the history pages every store returns (Page, Column,
HistoryPage) with their thinning (stride_for).

Readers get immutable snapshots: a job is a frozen model replaced on every transition (see
service.state.jobs), and the served model is one attribute swapped by one assignment, so
/predict never takes a lock nor waits for Redis.
"""

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

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
from service.state.changes import Changes


class Store(Protocol):
    """Everything the routes, the views, the runner and the metrics need from state. Two
    implementations: MemoryStore (service.state.memory, one replica) and RedisStore
    (service.state.redis, shared by every replica and worker); tests/test_store.py runs the
    same suite against both.

    Routes on the event loop and the runner's dispatcher thread call it at the same time: every
    method is safe to call concurrently, and what it returns (jobs, the model, history pages) are
    immutable snapshots. Ended jobs beyond the store's keep_jobs are evicted, those that ended
    longest ago first, never the served model's; an evicted job is then JobNotFound, and its
    idempotency key is forgotten.
    """

    @property
    def model(self) -> Model | None:
        """The served model, None before a fit succeeds; a plain read that never waits."""

    @property
    def unreachable(self) -> str | None:
        """Why this process cannot know whether a model is served (a shared store it has never
        read), or None."""

    @property
    def changes(self) -> Changes:
        """Told of every change of a job (its status, progress, history, eviction)."""

    def create_job(
        self,
        params: JobParams,
        n_samples: int,
        idempotency: tuple[str, str] | None = None,
        max_queued: int | None = None,
        samples: tuple[bytes, bytes] | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job and True, or for a (key, body fingerprint) seen before the original
        job and False; raises IdempotencyKeyReused for a known key with another fingerprint,
        and QueueFull, having created nothing, when max_queued jobs are queued already. The
        job's `samples` (x and y, float64 bytes) are kept with it when given: the version its
        fit makes keeps them as its rows (fit_rows) when the store keeps fit rows."""

    def get_job(self, job_id: str) -> Job:
        """The job as it is now; raises JobNotFound (never created, or evicted)."""

    def list_jobs(self, limit: int) -> list[Job]:
        """At most `limit` kept jobs, newest first."""

    def job_counts(self) -> dict[JobStatus, int]:
        """How many kept jobs are in each status; a status with none may be missing."""

    def start_job(self, job_id: str) -> Job | None:
        """Mark a queued job running (attempt 1) with an empty history; None if it is no longer
        queued (cancelled or evicted meanwhile)."""

    def append_history(
        self,
        job_id: str,
        w: Sequence[float],
        b: Sequence[float] | None,
        loss: Sequence[float],
        val_loss: Sequence[float] | None = None,
    ) -> None:
        """Record the next epochs of a running job (columns of equal length, b only with an
        intercept, val_loss only with a validation split) and advance its progress; only
        after start_job or retry_job."""

    def retry_job(self, job_id: str) -> Job:
        """Start the next attempt of a running job: attempts + 1, progress and history from 0;
        raises JobNotFound, or JobAlreadyEnded if the job is not running."""

    def succeed_job(self, job_id: str, report: FitReport) -> Job:
        """End a job as succeeded and keep the model its fit reports as the next version,
        atomically; the ended job. The version is served as the job's `publish` says (see
        `publication`): "always" by default. Raises JobNotFound, or JobAlreadyEnded if it has
        ended already."""

    def end_job(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> Job:
        """End a job as `status` (failed or cancelled) with its problem, publishing nothing; the
        ended job. Raises JobNotFound, or JobAlreadyEnded if it has ended already."""

    def history(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> History:
        """A page of a job's history (default: the latest started): at most `limit` epochs from
        `since`, thinned evenly to at most max_points, the page's last one kept. Raises
        JobNotFound, or HistoryNotFound if no job (or not this one) has started yet."""

    def history_page(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> "HistoryPage":
        """history(), its columns kept as float64 arrays: what GET /history writes in slices."""

    def versions(self, limit: int) -> list[Model]:
        """At most `limit` kept model versions, newest first. Every publication is kept, up to
        keep_versions: the oldest are evicted first, never the served one."""

    def version(self, version: int) -> Model:
        """A kept version; raises VersionNotFound."""

    def held(self, version: int) -> Model | None:
        """A kept version if this process holds it in memory (a plain read that never waits),
        else None: then version() knows."""

    def serve(self, version: int) -> Model:
        """Serve a kept version from now on, atomically, like a publication (a rollback, or the
        promotion of an older version); raises VersionNotFound. Serving the running canary's
        version promotes it; RolloutConflict while a canary of another version runs."""

    @property
    def canary(self) -> Canary | None:
        """The canary being rolled out (its model and rollout), None when none runs; a plain
        read that never waits, as `model` is."""

    def start_canary(self, version: int, rule: CanaryRule) -> Rollout:
        """Send rule.traffic percent of predictions to a kept version; raises VersionNotFound,
        or RolloutConflict when another canary runs, nothing is served or it is served."""

    def rollback(self, version: int) -> Rollout:
        """End the canary of `version` as rolled back; RolloutConflict if it is not the canary."""

    def rollout(self, version: int) -> Rollout | None:
        """The latest rollout of a kept version (running or ended), None if it had none."""

    def quality(self, version: int) -> Quality | None:
        """A version's live quality over its last quality_window outcomes, None before any."""

    def record_outcomes(
        self, hours: np.ndarray, scores: np.ndarray, named: Model | None = None
    ) -> OutcomesReceipt:
        """Keep these outcomes (the newest keep_outcomes), score them against the versions
        live now (served, canary) and `named`, and apply the canary's rule: promote or roll
        back once it has its outcomes. Atomically: replicas that record at once count each
        outcome once and decide once."""

    def recent_outcomes(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The last `limit` kept outcomes as float64 arrays (hours, scores), oldest first."""

    def fit_rows(self, version: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows a kept version was fitted on (x, y), when the store keeps them
        (SGD_RETRAIN_FIT_ROWS) and the fit was given them; else None."""


class WorkerStore(Protocol):
    """What a training worker process needs from the shared store (Redis mode): claim a queued
    job, read its samples, beat while it runs, look for a cancel, record its history and end
    it, or give it back. Every write carries the attempt number the claim returned (the job's
    `attempts`), and is refused (Fenced) once that attempt no longer owns the job; a write sent
    twice lands once."""

    @property
    def lease_seconds(self) -> float:
        """How long an owner's beat may stand still before its attempt is called dead."""

    def claim(self, job_id: str, worker: str, token: str) -> Job | None:
        """Start the next attempt of a queued job for `worker`: the job, or None if there is
        nothing to run (ended, cancelled, evicted, or running elsewhere: a duplicate). The
        token makes a claim sent twice find itself."""

    def job_data(self, job_id: str) -> tuple[bytes, bytes]:
        """The job's samples, x and y as float64 bytes; JobNotFound once it has ended."""

    def beat(self, job_id: str, attempt: int) -> None:
        """The owner of this attempt is alive."""

    def cancel_requested(self, job_id: str) -> bool:
        """Whether someone asked this running job to stop."""

    def append_history(
        self,
        job_id: str,
        w: Sequence[float],
        b: Sequence[float] | None,
        loss: Sequence[float],
        val_loss: Sequence[float] | None = None,
        attempt: int | None = None,
        at: int | None = None,
    ) -> None:
        """Record the next epochs, starting at epoch `at`: those that landed already land
        once."""

    def end_job(
        self,
        job_id: str,
        status: JobStatus,
        error: dict[str, Any] | None = None,
        attempt: int | None = None,
    ) -> Job:
        """End the job as cancelled or failed (Store.end_job), fenced by `attempt`."""

    def succeed_job(self, job_id: str, report: FitReport, attempt: int | None = None) -> Job:
        """End the job as succeeded and publish its version (Store.succeed_job), fenced by
        `attempt`."""

    def requeue_job(self, job_id: str, attempt: int) -> None:
        """Give the running job back to the queue (its worker is stopping): not a death."""


@dataclass(frozen=True)
class Page:
    """The epochs a history page holds: every stride-th of [start, end), then the page's last
    epoch (`tail`) when the stride skips it. Every store pages and thins the same way."""

    total: int
    start: int
    end: int
    stride: int
    tail: list[int]

    @classmethod
    def of(cls, total: int, since: int, limit: int | None, max_points: int) -> "Page":
        start = min(since, total)
        end = total if limit is None else min(total, start + limit)
        stride = stride_for(end - start, max_points)
        last = end - 1
        tail = [last] if end > start and (last - start) % stride else []
        return cls(total, start, end, stride, tail)

    @property
    def epochs(self) -> list[int]:
        return [*range(self.start, self.end, self.stride), *self.tail]

    def history(
        self,
        job: Job,
        w: list[float],
        b: list[float] | None,
        loss: list[float],
        val_loss: list[float] | None = None,
    ) -> History:
        """The page of `job` with these columns (picked at `epochs`)."""
        more = self.end < self.total or not job.status.ended
        return History(
            job_id=job.id,
            status=job.status,
            total_epochs=self.total,
            since=self.start,
            stride=self.stride,
            count=len(w),
            next_since=self.end if more else None,
            epoch=self.epochs,
            w=w,
            b=b,
            loss=loss,
            val_loss=val_loss,
        )


@dataclass(frozen=True)
class Column:
    """A history page's column: float64 values in pieces, views of what the store holds (a
    1,000,000-epoch page copied would hold the GIL for milliseconds)."""

    pieces: tuple["memoryview[float]", ...]

    def __len__(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def slices(self, size: int) -> Iterator[list[float]]:
        """The values as lists of at most `size`."""
        for piece in self.pieces:
            for i in range(0, len(piece), size):
                part = piece[i : i + size]
                values = array("d")  # array's tolist is twice memoryview's
                values.frombytes(part.cast("B") if part.contiguous else part.tobytes())
                yield values.tolist()

    def tolist(self) -> list[float]:
        return [v for values in self.slices(1 << 20) for v in values]


def floats(values: Sequence[float]) -> "memoryview[float]":
    """A float64 view of a few values."""
    return memoryview(array("d", values).tobytes()).cast("d")


@dataclass(frozen=True)
class HistoryPage:
    """A page of a job's history as float64 columns: w and loss, b and val_loss when the job
    records them, each holding the values at `page.epochs`."""

    job: Job
    page: Page
    columns: dict[str, Column]

    def model(self) -> History:
        cols = {name: values.tolist() for name, values in self.columns.items()}
        b, val_loss = cols.get("b"), cols.get("val_loss")
        return self.page.history(self.job, cols["w"], b, cols["loss"], val_loss)


def stride_for(count: int, max_points: int) -> int:
    """The step that picks at most max_points of count epochs, the last one included."""
    return 1 if count <= max_points else -(-(count - 1) // (max_points - 1))
