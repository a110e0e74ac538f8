"""The one owner of mutable state: published model versions, jobs and their histories.

Readers get immutable snapshots: a job is a frozen model replaced on every transition, and the
served model is one attribute swapped by one assignment, so /predict never takes the lock.
"""

import bisect
import threading
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from service.changes import Changes
from service.errors import (
    HistoryNotFound,
    IdempotencyKeyReused,
    JobAlreadyEnded,
    JobNotFound,
    QueueFull,
    VersionNotFound,
)
from service.schemas import (
    FitReport,
    History,
    Job,
    JobParams,
    JobResult,
    JobStatus,
    Model,
    ModelMetrics,
    Problem,
    Progress,
)


def now() -> datetime:
    return datetime.now(UTC)


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


class Store(Protocol):
    """Everything the routes, the views, the runner and the metrics need from state; MemoryStore
    is the one implementation today, and a shared (Redis) store would be another.

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
    ) -> tuple[Job, bool]:
        """A new queued job and True, or for a (key, body fingerprint) seen before the original
        job and False; raises IdempotencyKeyReused for a known key with another fingerprint,
        and QueueFull, having created nothing, when max_queued jobs are queued already."""

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

    def serve(self, version: int) -> Model:
        """Serve a kept version from now on, atomically, like a publication (a rollback, or the
        promotion of an older version); raises VersionNotFound."""


class MemoryStore:
    """In-process state guarded by one lock; the default store."""

    def __init__(self, keep_jobs: int, keep_versions: int = 100) -> None:
        self._keep_jobs = keep_jobs
        self._keep_versions = keep_versions
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

    unreachable = None  # in this process: always known

    def create_job(
        self,
        params: JobParams,
        n_samples: int,
        idempotency: tuple[str, str] | None = None,
        max_queued: int | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job, or (for a repeated Idempotency-Key and body) the original one."""
        with self._lock:
            if idempotency is not None:
                key, fingerprint = idempotency
                seen = self._idempotency.get(key)
                if seen is not None:
                    if seen[0] != fingerprint:
                        raise IdempotencyKeyReused(
                            f"Idempotency-Key {key!r} was used with another body; "
                            "use a new key for a new fit"
                        )
                    return self._jobs[seen[1]], False
            if max_queued is not None:
                queued = sum(j.status is JobStatus.queued for j in self._jobs.values())
                if queued >= max_queued:
                    raise queue_full(queued, max_queued)
            job = Job(
                id=uuid.uuid4().hex,
                status=JobStatus.queued,
                created_at=now(),
                params=params,
                n_samples=n_samples,
                progress=Progress(epoch=0, epochs=params.epochs),
            )
            self._jobs[job.id] = job
            if idempotency is not None:
                self._idempotency[idempotency[0]] = (idempotency[1], job.id)
            return job, True

    def get_job(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFound(f"no job {job_id!r}; GET /jobs lists the recent ones") from None

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
            job = self._replace(job, status=JobStatus.running, started_at=now(), attempts=1)
            self._histories[job_id] = _History.of(job)
            self._latest_started = job_id
            return job

    def retry_job(self, job_id: str) -> Job:
        """Start the next attempt of a running job whose worker died: its history starts over."""
        with self._lock:
            job = self.get_job(job_id)
            if job.status is not JobStatus.running:
                raise JobAlreadyEnded(f"job {job_id} is {job.status.value}, not running")
            self._histories[job_id] = _History.of(job)
            progress = Progress(epoch=0, epochs=job.params.epochs)
            return self._replace(job, attempts=job.attempts + 1, progress=progress)

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
            job = self._jobs[job_id]
            self._replace(job, progress=Progress(epoch=len(hist.w), epochs=job.params.epochs))

    def succeed_job(self, job_id: str, report: FitReport) -> Job:
        """End a job successfully and keep its model as the next version, atomically; serve it
        as the job's `publish` says."""
        with self._lock:
            job = self._running(job_id)
            self._last_version += 1
            ended = now()
            model = model_of(job, self._last_version, report, ended)
            served, why_not = publication(job, report, self._model)
            result = result_of(model, report, served, why_not)
            job = self._replace(job, status=JobStatus.succeeded, finished_at=ended, result=result)
            if served:
                self._model = model  # the one assignment that publishes the new version
            self._versions[model.version] = model
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
            raise VersionNotFound(
                f"no model version {version}; GET /models lists the kept ones"
            ) from None

    def serve(self, version: int) -> Model:
        with self._lock:
            model = self.version(version)
            self._model = model  # the one assignment, as a publication
            return model

    def end_job(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> Job:
        """End a job as failed or cancelled; nothing it produced is served."""
        with self._lock:
            job = self._running(job_id)
            problem = Problem.model_validate(error) if error is not None else None
            job = self._replace(job, status=status, finished_at=now(), error=problem)
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
                raise HistoryNotFound("no job has started yet: POST /fit first")
            job = self.get_job(job_id)
            hist = self._histories.get(job_id)
            if hist is None:
                raise HistoryNotFound(f"job {job_id} has not started yet; retry when it runs")
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
        if job.status.ended:
            raise JobAlreadyEnded(f"job {job_id} already ended as {job.status.value}")
        return job

    def _replace(self, job: Job, **changes: Any) -> Job:
        job = job.model_copy(update=changes)
        self._jobs[job.id] = job
        self.changes.changed(job.id)
        return job

    def _evict(self) -> None:
        """Forget the jobs that ended longest ago beyond keep_jobs, never the served model's.

        By the order they ended, not the order they were created: the job whose end is being
        recorded is the newest ended one, so it is never evicted while that end is handled.
        """
        served = self._model.job_id if self._model else None
        others = [j for j in self._ended if j != served]
        for job_id in others[: max(0, len(others) - self._keep_jobs)]:
            del self._ended[job_id]
            del self._jobs[job_id]
            self._histories.pop(job_id, None)
            self.changes.changed(job_id)
        live = set(self._jobs)
        self._idempotency = {k: v for k, v in self._idempotency.items() if v[1] in live}
        served_version = self._model.version if self._model else None
        old = [v for v in self._versions if v != served_version]
        for v in old[: max(0, len(self._versions) - self._keep_versions)]:
            del self._versions[v]


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


def queue_full(queued: int, limit: int) -> QueueFull:
    return QueueFull(
        f"{queued} jobs are queued (SGD_MAX_QUEUED_JOBS={limit}); retry later or cancel one",
        retry_after=2,
    )


def model_of(job: Job, version: int, report: FitReport, at: datetime) -> Model:
    """The version a succeeded job's fit makes."""
    metrics = ModelMetrics(
        final_loss=report.final_loss,
        mse=report.mse,
        train_mse=report.train_mse,
        train_r2=report.train_r2,
        val_mse=report.val_mse,
        val_r2=report.val_r2,
    )
    return Model(
        version=version,
        w=report.w,
        b=report.b,
        job_id=job.id,
        trained_at=at,
        params=job.params,
        metrics=metrics,
    )


def publication(job: Job, report: FitReport, served: Model | None) -> tuple[bool, str | None]:
    """Whether a fit's new version is served, per the job's `publish`, and if not, why not.

    "if_better" compares validation MSEs on the job's held-out rows: the new version's against
    the model served at this moment (the caller holds its lock or transaction), which is
    evaluated on the same rows in O(1) (schemas.Quadratic).
    """
    publish = job.params.publish
    if publish == "never":
        return False, 'publish is "never": serve it with POST /models/{version}/serve'
    if publish == "always" or served is None or report.val is None or report.val_mse is None:
        return True, None
    theirs = report.val.mse(served.w, served.b)
    if report.val_mse < theirs:
        return True, None
    return False, (
        f"its validation MSE {report.val_mse:.6g} is not lower than that of the served "
        f"version {served.version}, {theirs:.6g}, on the same held-out rows"
    )


def result_of(model: Model, report: FitReport, served: bool, why_not: str | None) -> JobResult:
    return JobResult(
        model_version=model.version,
        **report.model_dump(exclude={"val"}),
        published=served,
        not_published_because=why_not,
    )


def stride_for(count: int, max_points: int) -> int:
    """The step that picks at most max_points of count epochs, the last one included."""
    return 1 if count <= max_points else -(-(count - 1) // (max_points - 1))
