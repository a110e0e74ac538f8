"""RedisStore: the Store on Redis, shared by every replica and training worker (SGD_REDIS_URL).

The Store's methods are here; the rest of RedisStore is in modules of one concern each:

    service.state.redis_jobs   the client, the key layout, the transaction every change of a
                               job goes through (RedisJobs, the base class)
    service.state.redis_worker what a training worker does besides the fenced writes: claim,
                               beat, the cancel flag, the samples, the hand-back (WorkerAPI)
    service.state.reconcile    the reconciler's view and repairs (Repairs), and its loop
    service.state.watch        the thread that keeps the served model in memory (Watcher)

A fit is created with its key, its samples and its queue message in one transaction: a job
exists whole, with a message, or not at all. The writes a worker makes through the Store's
methods (append_history, end_job, succeed_job) carry its attempt number and are refused
(Fenced) once that attempt no longer owns the job. What a job becomes is decided by
service.state.jobs, the same functions MemoryStore calls.
"""

import struct
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from service.core.errors import Fenced, JobNotFound
from service.core.schemas import FitReport, History, Job, JobParams, JobStatus, Model
from service.core.settings import Settings
from service.state import jobs, rollouts
from service.state.base import Column, HistoryPage, Page, floats
from service.state.reconcile import Repairs
from service.state.redis_jobs import (
    Pipeline,
    available,
    check_config,
    columns,
)
from service.state.redis_outcomes import Outcomes
from service.state.redis_worker import WorkerAPI
from service.state.watch import Watcher

# Above this many epochs between two picks, a thinned page reads each pick with its own
# GETRANGE (pipelined) instead of the whole range.
PICK_READ_STRIDE = 64


class RedisStore(WorkerAPI, Repairs, Outcomes):
    """The Store protocol on Redis, plus what training workers need (WorkerStore: claim, beats,
    fenced writes, hand-backs) and the reconciler's two repairs; outcomes, live quality and
    canaries are service.state.redis_outcomes'."""

    def __init__(
        self,
        url: str,
        prefix: str,
        keep_jobs: int,
        keep_versions: int = 100,
        lease_seconds: float = 10.0,
        watch: bool = True,
        on_end: Callable[[Job], None] | None = None,
        keep_outcomes: int = 100_000,
        quality_window: int = 1000,
        keep_fit_rows: bool = False,
    ) -> None:
        super().__init__(url, prefix, keep_jobs, keep_versions, lease_seconds)
        self._keep_outcomes = keep_outcomes
        self._quality_window = quality_window
        self._keep_fit_rows = keep_fit_rows
        retention = (keep_jobs, keep_versions)
        self._watcher = Watcher(self.redis, prefix, self._channels, retention, on_end)
        self.changes = self._watcher.changes
        if watch:
            self._watcher.start()

    @classmethod
    def from_settings(
        cls, settings: Settings, watch: bool = True, on_end: Callable[[Job], None] | None = None
    ) -> "RedisStore":
        """The store SGD_REDIS_URL and its companions describe."""
        assert settings.redis_url is not None
        return cls(
            settings.redis_url.get_secret_value(),
            settings.redis_prefix,
            settings.keep_jobs,
            keep_versions=settings.keep_versions,
            lease_seconds=settings.lease_seconds,
            watch=watch,
            on_end=on_end,
            keep_outcomes=settings.keep_outcomes,
            quality_window=settings.quality_window,
            keep_fit_rows=settings.retrain_fit_rows,
        )

    def close(self) -> None:
        self._watcher.close()
        self.redis.close()

    # -- the served model, and whether Redis can take work (kept by the watcher) -------------

    @property
    def model(self) -> Model | None:
        """The served model as this replica last saw it: an attribute read, never Redis."""
        return self._watcher.model

    def held(self, version: int) -> Model | None:
        """The served model, when it is this version: every other one is read from Redis,
        which knows whether it is still kept."""
        model = self._watcher.model
        return model if model is not None and model.version == version else None

    @property
    def unreachable(self) -> str | None:
        """Why this replica may not know the served model (it has never read it), or None."""
        return None if self._watcher.loaded else self._watcher.problem

    @property
    def loaded(self) -> bool:
        """The served model has been read once: the replica can be ready."""
        return self._watcher.loaded

    @property
    def problem(self) -> str | None:
        """Why Redis cannot take work now (unreachable, or refusing writes); None when it can."""
        return self._watcher.problem

    def refresh(self) -> None:
        """Read the served model now (the watcher does this by itself)."""
        self._watcher.refresh()

    def check_config(self) -> None:
        """Warn of a Redis that may evict keys (see redis_jobs.check_config)."""
        check_config(self.redis)

    # -- jobs ----------------------------------------------------------------------------------

    @available
    def create_job(
        self,
        params: JobParams,
        n_samples: int,
        idempotency: tuple[str, str] | None = None,
        max_queued: int | None = None,
        samples: tuple[bytes, bytes] | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job and True, or the Idempotency-Key's original and False; with
        `samples`, the job's data and its queue message too: all of it in one transaction.
        A full queue (max_queued) raises QueueFull having written nothing, so a refusal never
        takes away a job that another request was handed."""
        job = jobs.new_job(params, n_samples, jobs.now())
        key, queued_key = self._key("job", job.id), self._key("queued")
        idem_key = None if idempotency is None else self._key("idem", idempotency[0])
        watched = [key, queued_key] + ([idem_key] if idem_key else [])
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*watched)
                    mine = pipe.hget(key, "doc")
                    if mine is not None:  # this very call ran before its answer was lost
                        return Job.model_validate_json(mine), True
                    if idempotency is not None and idem_key is not None:
                        original = self._original(pipe, idem_key, idempotency)
                        if original is not None:
                            return original, False
                    if max_queued is not None:
                        queued = int(pipe.zcard(queued_key))
                        if queued >= max_queued:
                            raise jobs.queue_full(queued, max_queued)
                    pipe.multi()
                    fields = {"doc": job.model_dump_json()}
                    if idempotency is not None:
                        fields["idem"] = idempotency[0]
                        pipe.set(idem_key, f"{idempotency[1]} {job.id}")
                    pipe.hset(key, mapping=fields)
                    pipe.zadd(self._key("jobs"), {job.id: time.time()})
                    pipe.zadd(queued_key, {job.id: time.time()})
                    if samples is not None:
                        x, y = samples
                        pipe.hset(self._key("data", job.id), mapping={"x": x, "y": y})
                        self._enqueue(pipe, job.id)
                    pipe.execute()
                    return job, True
                except redis.WatchError:
                    pipe.reset()

    def _original(self, pipe: Pipeline, idem_key: str, idempotency: tuple[str, str]) -> Job | None:
        """The job an Idempotency-Key already names, or None if it names none (never used, or
        its job was evicted: the key is free again); IdempotencyKeyReused for another body."""
        seen = pipe.get(idem_key)
        if seen is None:
            return None
        fingerprint, job_id = seen.decode().split(" ", 1)
        doc = pipe.hget(self._key("job", job_id), "doc")
        if doc is None:
            return None
        if fingerprint != idempotency[1]:
            raise jobs.key_reused(idempotency[0])
        return Job.model_validate_json(doc)

    @available
    def get_job(self, job_id: str) -> Job:
        doc = self.redis.hget(self._key("job", job_id), "doc")
        if doc is None:
            raise jobs.job_not_found(job_id)
        return self._present([doc])[0]

    @available
    def list_jobs(self, limit: int) -> list[Job]:
        ids = self.redis.zrevrange(self._key("jobs"), 0, limit - 1)
        return self._jobs([i.decode() for i in ids])

    @available
    def job_counts(self) -> dict[JobStatus, int]:
        ids = self.redis.zrange(self._key("jobs"), 0, -1)
        return Counter(j.status for j in self._jobs([i.decode() for i in ids]))

    @available
    def queued_count(self) -> int:
        return int(self.redis.zcard(self._key("queued")))

    def _jobs(self, ids: list[str]) -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self._key("job", job_id), "doc")
        return self._present([d for d in pipe.execute() if d is not None])  # evicted meanwhile

    def _present(self, docs: list[bytes]) -> list[Job]:
        shown = [Job.model_validate_json(doc) for doc in docs]
        self._watcher.catch_up(shown)
        return shown

    @available
    def start_job(self, job_id: str) -> Job | None:
        """Mark a queued job running (attempt 1), as the Store protocol's start."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status is not JobStatus.queued:
                return None
            pipe.multi()
            self._clear_history(pipe, job_id)
            pipe.set(self._key("latest"), job_id)
            self._move(pipe, job_id, "queued", "running")
            return self._put(pipe, jobs.started(job, jobs.now()))

        try:
            return self._change(job_id, change)
        except JobNotFound:
            return None

    @available
    def retry_job(self, job_id: str) -> Job:
        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            job = jobs.retried(job)
            pipe.multi()
            self._clear_history(pipe, job_id)
            return self._put(pipe, job)

        return self._change(job_id, change)

    @available
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
        """Record the next epochs; with `at` (the epoch they start at), epochs that landed
        already (a write sent twice, or a write whose answer was lost and which the worker
        sends again with more epochs) land once."""
        data = {"w": _bytes(w), "loss": _bytes(loss)}
        if b is not None:
            data["b"] = _bytes(b)
        if val_loss is not None:
            data["val_loss"] = _bytes(val_loss)

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> None:
            jobs.check_owner(job, attempt)
            landed = 0 if at is None else job.progress.epoch - at
            if not 0 <= landed <= len(w):
                raise Fenced(f"job {job_id} is at epoch {job.progress.epoch}, not {at}")
            if landed == len(w):
                return
            pipe.multi()
            for name in columns(job):
                if name in data:
                    pipe.append(self._key("hist", job_id, name), data[name][landed * 8 :])
            self._put(pipe, jobs.progressed(job, job.progress.epoch + len(w) - landed))

        self._change(job_id, change)

    @available
    def end_job(
        self,
        job_id: str,
        status: JobStatus,
        error: dict[str, Any] | None = None,
        attempt: int | None = None,
    ) -> Job:
        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            if jobs.replayed(job, status, attempt):
                return job
            jobs.check_owner(job, attempt)
            pipe.multi()
            return self._finish(pipe, jobs.ended(job, status, error, jobs.now()))

        job = self._change(job_id, change)
        self._evict()
        return job

    @available
    def request_cancel(self, job_id: str, token: str | None = None) -> Job:
        """Cancel a queued job now; ask a running one's worker to stop after its current block
        (or, if that worker is dead, the reconciler ends it). The job as it is after the
        request. The token makes a request sent twice (a cut connection) find itself."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            mine = token is not None and fields.get(b"cancelled_by") == token.encode()
            if job.status.ended and mine:
                return job  # this very request, sent twice
            jobs.check_open(job)
            pipe.multi()
            if token is not None:
                pipe.hset(self._key("job", job_id), "cancelled_by", token)
            if job.status is JobStatus.queued:
                return self._finish(pipe, jobs.ended(job, JobStatus.cancelled, None, jobs.now()))
            pipe.hset(self._key("job", job_id), "cancel", "1")
            return job

        job = self._change(job_id, change)
        self._evict()
        return job

    @available
    def succeed_job(self, job_id: str, report: FitReport, attempt: int | None = None) -> Job:
        """End the job and keep its model as the next version, served as the job's `publish`
        says, in one transaction that also watches the version counter (versions are numbered
        in order), the served model (what "if_better" compared against is still served) and the
        kept versions, the oldest of which it evicts: nobody sees more than keep_versions."""
        job_key, served_key = self._key("job", job_id), self._key("served")
        counter_key, versions_key = self._key("version"), self._key("versions")
        canary_key = self._key("canary")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(job_key, counter_key, served_key, versions_key, canary_key)
                    doc = pipe.hget(job_key, "doc")
                    if doc is None:
                        raise jobs.job_not_found(job_id)
                    job = Job.model_validate_json(doc)
                    if jobs.replayed(job, JobStatus.succeeded, attempt):
                        return job
                    jobs.check_owner(job, attempt)
                    last = int(pipe.get(counter_key) or 0)
                    served_doc = pipe.get(served_key)
                    current = None if served_doc is None else Model.model_validate_json(served_doc)
                    ended = jobs.now()
                    model = jobs.model_of(job, last + 1, report, ended)
                    serve, why_not = jobs.publication(job, report, current)
                    running = self._running(pipe)
                    started = superseded = None
                    if job.params.publish == "canary":
                        started, why_not = rollouts.as_fit_says(model, current, running, ended)
                    elif serve and running is not None:
                        why = rollouts.superseded(model.version)
                        superseded = self._ended_now(pipe, running, "rolled_back", why)
                    result = jobs.result_of(model, report, serve, why_not)
                    model_doc = model.model_dump_json()
                    kept = [int(v) for v in pipe.zrange(versions_key, 0, -1)] + [model.version]
                    served = model.version if serve else current.version if current else None
                    canary = started or (running if superseded is None else None)
                    old = jobs.evicted_versions(
                        kept, served, self._retention()[1], canary.version if canary else None
                    )
                    pipe.multi()
                    if self._keep_fit_rows:  # before _finish drops the job's data
                        pipe.copy(self._key("data", job_id), self._rows_key(model.version))
                    job = self._finish(pipe, jobs.succeeded(job, result, ended))
                    pipe.set(counter_key, model.version)
                    pipe.hset(self._key("models"), str(model.version), model_doc)
                    if report.residuals is not None:
                        pipe.set(self._residuals_key(model.version), report.residuals)
                    pipe.zadd(versions_key, {str(model.version): model.version})
                    if old:
                        self._forget(pipe, old)
                    if started is not None:
                        self._begin(pipe, started)
                    if superseded is not None:
                        self._end(pipe, superseded, promote=None)
                    if serve:
                        pipe.set(served_key, model_doc)
                        pipe.publish(self._channels + "served", str(model.version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    pipe.reset()
        if serve:
            self._watcher.adopt(model_doc.encode(), report.residuals)
        if started is not None or superseded is not None:
            self._watcher.refresh()
        self._evict()
        return job

    def _forget(self, pipe: Pipeline, versions: list[int]) -> None:
        """Evict kept versions, and what is kept beside them."""
        pipe.hdel(self._key("models"), *map(str, versions))
        pipe.hdel(self._key("rollouts"), *map(str, versions))
        pipe.delete(*map(self._residuals_key, versions))
        pipe.delete(*(self._key("quality", str(v)) for v in versions))
        pipe.delete(*map(self._rows_key, versions))
        pipe.zrem(self._key("versions"), *map(str, versions))

    # -- model versions --------------------------------------------------------------------

    @available
    def versions(self, limit: int) -> list[Model]:
        kept = self.redis.zrevrange(self._key("versions"), 0, limit - 1)
        if not kept:
            return []
        docs = self.redis.hmget(self._key("models"), kept)
        return [Model.model_validate_json(d) for d in docs if d is not None]

    @available
    def version(self, version: int) -> Model:
        doc = self.redis.hget(self._key("models"), str(version))
        if doc is None:
            raise jobs.version_not_found(version)
        model = Model.model_validate_json(doc)
        return model.holding(StoredResiduals(self.redis, self._residuals_key(version), version))

    @available
    def fit_rows(self, version: int) -> tuple[np.ndarray, np.ndarray] | None:
        x, y = self.redis.hmget(self._rows_key(version), ["x", "y"])
        if x is None or y is None:
            return None
        return np.frombuffer(x, dtype=np.float64), np.frombuffer(y, dtype=np.float64)

    def _rows_key(self, version: int) -> str:
        return self._key("rows", str(version))

    def _residuals_key(self, version: int) -> str:
        return self._key("residuals", str(version))

    @available
    def serve(self, version: int) -> Model:
        """Serve a kept version: one transaction that watches the kept versions, so that one
        evicted meanwhile is VersionNotFound, never served."""
        models_key, served_key = self._key("models"), self._key("served")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(models_key, self._key("canary"), self._key("canary:sums"))
                    doc = pipe.hget(models_key, str(version))
                    if doc is None:
                        raise jobs.version_not_found(version)
                    running = self._running(pipe)
                    promoted = None
                    if rollouts.check_serve(version, running):
                        assert running is not None
                        why = rollouts.PROMOTED_BY_HAND
                        promoted = self._ended_now(pipe, running, "promoted", why)
                    pipe.multi()
                    if promoted is not None:
                        self._end(pipe, promoted, promote=None)
                    pipe.set(served_key, doc)
                    pipe.publish(self._channels + "served", str(version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    pipe.reset()
        self._watcher.refresh() if promoted is not None else self._watcher.adopt(doc)
        served = self._watcher.model
        if served is not None and served.version == version:
            return served
        return self.version(version)

    # -- histories -------------------------------------------------------------------------

    @available
    def history(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> History:
        return self.history_page(job_id, since, limit, max_points).model()

    @available
    def history_page(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> HistoryPage:
        if job_id is None:
            latest = self.redis.get(self._key("latest"))
            if latest is None:
                raise jobs.no_history()
            job_id = latest.decode()
        job = self.get_job(job_id)
        if job.started_at is None:
            raise jobs.no_history(job_id)
        names = columns(job)
        keys = [self._key("hist", job_id, n) for n in names]
        # the shortest column: a chunk being appended is whole in all of them or in none
        total = min(self.redis.strlen(k) for k in keys) // 8
        page = Page.of(total, since, limit, max_points)
        cols = {name: self._read(key, page) for name, key in zip(names, keys, strict=True)}
        return HistoryPage(job, page, cols)

    def _read(self, key: str, page: Page) -> Column:
        """A float64 column's values at the page's epochs: one GETRANGE of the page's range, or,
        for a sparse page, one small GETRANGE per epoch (pipelined)."""
        if page.end <= page.start:
            return Column(())
        if page.stride < PICK_READ_STRIDE:
            raw = self.redis.getrange(key, page.start * 8, page.end * 8 - 1)
            values = memoryview(raw).cast("d")
            tail = floats([values[i - page.start] for i in page.tail])
            return Column((values[:: page.stride], tail))  # views, nothing copied
        pipe = self.redis.pipeline(transaction=False)
        for i in page.epochs:
            pipe.getrange(key, i * 8, i * 8 + 7)
        return Column((memoryview(b"".join(pipe.execute())).cast("d"),))


class StoredResiduals:
    """A kept version's sorted residuals where they are kept, in Redis: each read is one
    GETRANGE of 8 bytes, whatever their number (a 1,000,000-row fit keeps 1.9 MiB of them)."""

    remote = True

    def __init__(self, client: Any, key: str, version: int) -> None:
        self.redis, self.key, self.version = client, key, version

    def item(self, i: int, /) -> float:
        raw = self.redis.getrange(self.key, 8 * i, 8 * i + 7)
        if len(raw) != 8:  # evicted meanwhile
            raise jobs.version_not_found(self.version)
        value: float = struct.unpack("<d", raw)[0]
        return value

    def tobytes(self) -> bytes:
        raw: bytes = self.redis.get(self.key) or b""
        return raw


def _bytes(values: Sequence[float]) -> bytes:
    if isinstance(values, memoryview):
        return values.tobytes()
    return array("d", values).tobytes()


if TYPE_CHECKING:
    from service.state.base import Store, WorkerStore

    def _is_a_store(r: RedisStore) -> tuple[Store, WorkerStore]:
        """mypy's check that RedisStore is a Store and a WorkerStore."""
        return r, r
