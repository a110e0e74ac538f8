"""RedisStore: the Store on Redis, shared by every replica and training worker (SGD_REDIS_URL).

What lives where (every key under SGD_REDIS_PREFIX, `sgd:` by default):

    job:{id}          hash: doc (the Job as JSON), worker (who runs the current attempt),
                      cancel ("1" once asked), idem (its Idempotency-Key)
    data:{id}         hash: x, y (float64 bytes) until the job ends
    hist:{id}:{col}   string: the w, loss (and b) columns as raw float64, appended per chunk
    jobs / ended      sorted sets: ids by creation / by end (list, eviction)
    idem:{key}        "<fingerprint> <job id>"
    models / versions hash: version -> Model JSON; sorted set: the kept versions (eviction)
    version           the last version number given out
    served            the served Model as JSON; `served` (a channel) announces each change
    latest            the latest started job's id

Every change of a job is a WATCH/MULTI transaction on its hash, so two replicas never overwrite
each other's change. A worker's writes carry its attempt number (the job's `attempts` when it
claimed the job): a worker that lost its job (paused past its lease while another re-ran it)
has a stale number, and the transaction refuses it (Fenced) before anything lands.

The served model is also held in memory, as in MemoryStore: `model` is one attribute read, kept
fresh by a thread that listens on the `served` channel and re-reads `served` every
RECHECK_SECONDS in case a message was missed. /predict never waits for Redis.
"""

import contextlib
import logging
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from service.errors import (
    Fenced,
    HistoryNotFound,
    IdempotencyKeyReused,
    JobAlreadyEnded,
    JobNotFound,
    StoreUnavailable,
    VersionNotFound,
    WorkerCrashed,
)
from service.schemas import (
    FitReport,
    History,
    Job,
    JobParams,
    JobResult,
    JobStatus,
    Model,
    Problem,
    Progress,
)
from service.settings import Settings
from service.store import Column, HistoryPage, Page, floats, model_of, now, publication, result_of

log = logging.getLogger("sgd_service.redis")

# How often the served model is re-read even without a message (a missed publication).
RECHECK_SECONDS = 0.5
# Socket timeouts: a Redis that does not answer is unavailable soon, not after minutes.
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 5.0
# Above this many epochs between two picks, a thinned page reads each pick with its own
# GETRANGE (pipelined) instead of the whole range.
PICK_READ_STRIDE = 64

T = TypeVar("T")
Pipeline = Any  # redis.client.Pipeline, as loosely typed as the client


def _available(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn a lost connection into StoreUnavailable (503 store-unavailable)."""

    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise StoreUnavailable(
                f"the shared store (Redis) cannot be reached: {exc.__class__.__name__}; "
                "retry shortly (predictions still work)"
            ) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class RedisStore:
    """The Store protocol on Redis, plus what training workers need: claim, fenced writes."""

    def __init__(
        self,
        url: str,
        prefix: str,
        keep_jobs: int,
        keep_versions: int = 100,
        lease_seconds: float = 10.0,
        watch: bool = True,
        on_end: Callable[[Job], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self.queue_namespace = prefix + "queue"  # the job library's keys (service.fleet)
        self._keep_jobs = keep_jobs
        self._keep_versions = keep_versions
        self._lease_ms = int(lease_seconds * 1000)
        # Any: redis-py types every reply as bytes | str (for decode_responses) and leaves some
        # commands untyped; this client always answers bytes.
        self.redis: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            health_check_interval=10,
        )
        self._on_end = on_end
        self._model: Model | None = None
        self._caught_up = 0  # the highest published version _catch_up has read the model for
        self.loaded = False  # the served model has been read once: the replica can be ready
        self.reachable = False
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        if watch:
            self._watcher = threading.Thread(target=self._watch, name="sgd-served", daemon=True)
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
        )

    def close(self) -> None:
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(5)
        self.redis.close()

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- the served model ------------------------------------------------------------------

    @property
    def model(self) -> Model | None:
        """The served model as this replica last saw it: one attribute read, never Redis."""
        return self._model

    def _adopt(self, raw: bytes | None) -> None:
        model = None if raw is None else Model.model_validate_json(raw)
        current = self._model
        if model is not None and (current is None or current.version != model.version):
            self._model = model  # the one assignment that serves it here
            log.info("serving model version %d", model.version)

    def refresh(self) -> None:
        """Read the served model now (the watcher does this by itself)."""
        self._adopt(self.redis.get(self._key("served")))
        self.loaded = True

    def _watch(self) -> None:
        """Keep `model` fresh: a message per publication, a re-read as the fallback."""
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._key("served"), self._key("ended"))
                self.refresh()
                self.reachable = True
                last = time.monotonic()
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=RECHECK_SECONDS / 2)
                    if msg is not None and msg["channel"] == self._key("ended").encode():
                        self._ended(msg["data"])
                        continue
                    if msg is not None or time.monotonic() - last >= RECHECK_SECONDS:
                        self.refresh()
                        last = time.monotonic()
            except redis.RedisError as exc:
                if self.reachable:
                    log.warning("Redis unreachable (%s); serving the model in memory", exc)
                self.reachable = False
                self._closed.wait(0.2)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _ended(self, raw: bytes) -> None:
        """A job ended, on whichever worker: every replica reports it (metrics, the log)."""
        if self._on_end is None:
            return
        try:
            self._on_end(Job.model_validate_json(raw))
        except Exception:
            log.exception("reporting a job's end failed")

    # -- jobs: what the API needs ----------------------------------------------------------

    @_available
    def create_job(
        self, params: JobParams, n_samples: int, idempotency: tuple[str, str] | None = None
    ) -> tuple[Job, bool]:
        job = Job(
            id=uuid.uuid4().hex,
            status=JobStatus.queued,
            created_at=now(),
            params=params,
            n_samples=n_samples,
            progress=Progress(epoch=0, epochs=params.epochs),
        )
        key = self._key("job", job.id)
        pipe = self.redis.pipeline()
        pipe.hset(key, "doc", job.model_dump_json())
        pipe.zadd(self._key("jobs"), {job.id: time.time()})
        pipe.execute()
        if idempotency is None:
            return job, True
        # The job exists before its key does, so a replica that loses the SET NX below always
        # finds the winner's job; the loser drops its own.
        name, fingerprint = idempotency
        idem_key = self._key("idem", name)
        while True:
            if self.redis.set(idem_key, f"{fingerprint} {job.id}", nx=True):
                self.redis.hset(key, "idem", name)  # discarded or evicted with its job
                return job, True
            seen = self.redis.get(idem_key)
            if seen is None:
                continue  # its job was discarded or evicted meanwhile: the key is free again
            seen_fingerprint, seen_id = seen.decode().split(" ", 1)
            if seen_fingerprint != fingerprint:
                self._drop(job.id)
                raise IdempotencyKeyReused(
                    f"Idempotency-Key {name!r} was used with another body; "
                    "use a new key for a new fit"
                )
            try:
                original = self.get_job(seen_id)
            except JobNotFound:
                continue  # discarded between the two reads: its key went with it
            self._drop(job.id)
            return original, False

    def _drop(self, job_id: str) -> None:
        """Remove a job that was never handed out."""
        pipe = self.redis.pipeline()
        pipe.delete(self._key("job", job_id))
        pipe.zrem(self._key("jobs"), job_id)
        pipe.execute()

    @_available
    def put_data(self, job_id: str, x: bytes, y: bytes) -> None:
        """The samples of a job, for whichever worker runs it."""
        self.redis.hset(self._key("data", job_id), mapping={"x": x, "y": y})

    @_available
    def job_data(self, job_id: str) -> tuple[bytes, bytes]:
        x, y = self.redis.hmget(self._key("data", job_id), ["x", "y"])
        if x is None or y is None:
            raise JobNotFound(f"no data for job {job_id!r}")
        return x, y

    @_available
    def discard_job(self, job_id: str) -> None:
        idem = self.redis.hget(self._key("job", job_id), "idem")
        pipe = self.redis.pipeline()
        pipe.delete(self._key("job", job_id), self._key("data", job_id))
        pipe.zrem(self._key("jobs"), job_id)
        if idem is not None:
            pipe.delete(self._key("idem", idem.decode()))
        pipe.execute()

    @_available
    def get_job(self, job_id: str) -> Job:
        raw = self.redis.hmget(self._key("job", job_id), ["doc", "worker"])
        if raw[0] is None:
            raise JobNotFound(f"no job {job_id!r}; GET /jobs lists the recent ones")
        return self._present([(raw[0], raw[1])])[0]

    @_available
    def list_jobs(self, limit: int) -> list[Job]:
        ids = self.redis.zrevrange(self._key("jobs"), 0, limit - 1)
        return self._jobs([i.decode() for i in ids])

    @_available
    def job_counts(self) -> dict[JobStatus, int]:
        ids = self.redis.zrange(self._key("jobs"), 0, -1)
        return Counter(j.status for j in self._jobs([i.decode() for i in ids]))

    def _jobs(self, ids: list[str]) -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self._key("job", job_id), ["doc", "worker"])
        rows = [(d, w) for d, w in pipe.execute() if d is not None]  # evicted meanwhile
        return self._present(rows)

    def _present(self, rows: list[tuple[bytes, bytes | None]]) -> list[Job]:
        """Jobs as callers see them: a running job whose worker's heartbeat is older than the
        lease has no live worker, and shows as queued until a worker runs it again."""
        jobs = [Job.model_validate_json(doc) for doc, _ in rows]
        running = [(i, w.decode()) for i, (_, w) in enumerate(rows) if w is not None]
        running = [(i, w) for i, w in running if jobs[i].status is JobStatus.running]
        if running:
            beats = self.redis.zmscore(
                self.queue_namespace + ":__heartbeats__", [w for _, w in running]
            )
            limit = time.time() * 1000 - self._lease_ms
            for (i, _), beat in zip(running, beats, strict=True):
                if beat is None or beat < limit:
                    jobs[i] = jobs[i].model_copy(update={"status": JobStatus.queued})
        self._catch_up(jobs)
        return jobs

    def _catch_up(self, jobs: list[Job]) -> None:
        """Read your writes: a caller shown a job that published version N gets N (or a later
        served version) from this replica's /predict from then on, not only within the
        subscription's milliseconds. One read of the served model, once per such version."""
        published = max((j.result.model_version for j in jobs if j.result), default=0)
        current = self._model.version if self._model else 0
        if published > current and published > self._caught_up:
            self._caught_up = published
            self.refresh()

    # -- jobs: what workers need -----------------------------------------------------------

    def _change(self, job_id: str, fn: Callable[[Pipeline, Job, dict[bytes, bytes]], T]) -> T:
        """WATCH the job's hash, hand its doc and fields to fn, which queues commands on the
        pipeline, then run them in one MULTI/EXEC; all again if anyone changed the job
        meanwhile. fn's result."""
        key = self._key("job", job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    fields: dict[bytes, bytes] = pipe.hgetall(key)
                    if b"doc" not in fields:
                        raise JobNotFound(f"no job {job_id!r}; GET /jobs lists the recent ones")
                    pipe.multi()
                    out = fn(pipe, Job.model_validate_json(fields[b"doc"]), fields)
                    pipe.execute()
                    return out
                except redis.WatchError:
                    pipe.reset()

    def _put(self, pipe: Pipeline, job: Job, **changes: Any) -> Job:
        job = job.model_copy(update=changes)
        pipe.hset(self._key("job", job.id), "doc", job.model_dump_json())
        return job

    def _clear_history(self, pipe: Pipeline, job_id: str) -> None:
        pipe.delete(*(self._key("hist", job_id, c) for c in COLUMNS))

    @_available
    def claim(self, job_id: str, worker: str, max_attempts: int) -> Job | None:
        """Start the next attempt of a job for this worker: the job (its `attempts` is the
        attempt's fencing number), or None if there is nothing to run (ended, cancelled,
        evicted, or out of attempts: then it ends failed)."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status.ended:
                return None
            if b"cancel" in fields:
                self._finish(pipe, job, JobStatus.cancelled, None)
                return None
            if job.status is JobStatus.running and job.attempts >= max_attempts:
                problem = WorkerCrashed(
                    f"the training worker died {job.attempts} times running this fit "
                    f"(SGD_JOB_ATTEMPTS={max_attempts}); if it needs more memory than a "
                    "worker has, ask for fewer samples or a smaller batch_size"
                ).problem()
                self._finish(pipe, job, JobStatus.failed, problem)
                return None
            self._clear_history(pipe, job_id)
            job = self._put(
                pipe,
                job,
                status=JobStatus.running,
                started_at=job.started_at or now(),
                attempts=job.attempts + 1,
                progress=Progress(epoch=0, epochs=job.params.epochs),
            )
            pipe.hset(self._key("job", job_id), "worker", worker)
            pipe.set(self._key("latest"), job_id)
            return job

        try:
            job = self._change(job_id, change)
        except JobNotFound:
            return None
        if job is None:
            self._evict()
        return job

    @staticmethod
    def _check(job: Job, attempt: int | None) -> None:
        if job.status.ended:
            raise JobAlreadyEnded(f"job {job.id} already ended as {job.status.value}")
        if attempt is not None and (job.status is not JobStatus.running or job.attempts != attempt):
            raise Fenced(f"attempt {attempt} of job {job.id} no longer owns it")

    @_available
    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.hexists(self._key("job", job_id), "cancel"))

    @_available
    def start_job(self, job_id: str) -> Job | None:
        """Mark a queued job running (attempt 1), as the Store protocol's start."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status is not JobStatus.queued:
                return None
            self._clear_history(pipe, job_id)
            pipe.set(self._key("latest"), job_id)
            return self._put(pipe, job, status=JobStatus.running, started_at=now(), attempts=1)

        try:
            return self._change(job_id, change)
        except JobNotFound:
            return None

    @_available
    def retry_job(self, job_id: str) -> Job:
        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            if job.status is not JobStatus.running:
                raise JobAlreadyEnded(f"job {job_id} is {job.status.value}, not running")
            self._clear_history(pipe, job_id)
            progress = Progress(epoch=0, epochs=job.params.epochs)
            return self._put(pipe, job, attempts=job.attempts + 1, progress=progress)

        return self._change(job_id, change)

    @_available
    def append_history(
        self,
        job_id: str,
        w: Sequence[float],
        b: Sequence[float] | None,
        loss: Sequence[float],
        val_loss: Sequence[float] | None = None,
        attempt: int | None = None,
    ) -> None:
        data = {"w": _raw(w), "loss": _raw(loss)}
        if b is not None:
            data["b"] = _raw(b)
        if val_loss is not None:
            data["val_loss"] = _raw(val_loss)

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> None:
            self._check(job, attempt)
            for name in _columns(job):
                if name in data:
                    pipe.append(self._key("hist", job_id, name), data[name])
            epoch = job.progress.epoch + len(w)
            self._put(pipe, job, progress=Progress(epoch=epoch, epochs=job.params.epochs))

        self._change(job_id, change)

    @_available
    def requeue_job(self, job_id: str, attempt: int) -> None:
        """Give a running job back to the queue (its worker is stopping): a worker claims it
        again as its next attempt."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> None:
            self._check(job, attempt)
            self._put(pipe, job, status=JobStatus.queued)
            pipe.hdel(self._key("job", job_id), "worker")

        self._change(job_id, change)

    @_available
    def succeed_job(self, job_id: str, report: FitReport, attempt: int | None = None) -> Job:
        """End the job and keep its model as the next version, served as the job's `publish`
        says, in one transaction that also watches the version counter (versions are numbered
        in order) and the served model (what "if_better" compared against is still served)."""
        job_key, served_key = self._key("job", job_id), self._key("served")
        counter_key = self._key("version")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(job_key, counter_key, served_key)
                    doc = pipe.hget(job_key, "doc")
                    if doc is None:
                        raise JobNotFound(f"no job {job_id!r}; GET /jobs lists the recent ones")
                    job = Job.model_validate_json(doc)
                    self._check(job, attempt)
                    last = int(pipe.get(counter_key) or 0)
                    served_doc = pipe.get(served_key)
                    current = None if served_doc is None else Model.model_validate_json(served_doc)
                    ended = now()
                    model = model_of(job, last + 1, report, ended)
                    serve, why_not = publication(job, report, current)
                    result = result_of(model, report, serve, why_not)
                    model_doc = model.model_dump_json()
                    pipe.multi()
                    job = self._finish(
                        pipe, job, JobStatus.succeeded, None, result=result, at=ended
                    )
                    pipe.set(counter_key, model.version)
                    pipe.hset(self._key("models"), str(model.version), model_doc)
                    pipe.zadd(self._key("versions"), {str(model.version): model.version})
                    if serve:
                        pipe.set(served_key, model_doc)
                        pipe.publish(served_key, str(model.version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    pipe.reset()
        if serve:
            self._adopt(model_doc.encode())
        self._evict()
        self._evict_versions()
        return job

    # -- model versions --------------------------------------------------------------------

    @_available
    def versions(self, limit: int) -> list[Model]:
        kept = self.redis.zrevrange(self._key("versions"), 0, limit - 1)
        if not kept:
            return []
        docs = self.redis.hmget(self._key("models"), kept)
        return [Model.model_validate_json(d) for d in docs if d is not None]

    @_available
    def version(self, version: int) -> Model:
        doc = self.redis.hget(self._key("models"), str(version))
        if doc is None:
            raise VersionNotFound(f"no model version {version}; GET /models lists the kept ones")
        return Model.model_validate_json(doc)

    @_available
    def serve(self, version: int) -> Model:
        """Serve a kept version: one transaction that watches the kept versions, so that one
        evicted meanwhile is VersionNotFound, never served."""
        models_key, served_key = self._key("models"), self._key("served")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(models_key)
                    doc = pipe.hget(models_key, str(version))
                    if doc is None:
                        raise VersionNotFound(
                            f"no model version {version}; GET /models lists the kept ones"
                        )
                    pipe.multi()
                    pipe.set(served_key, doc)
                    pipe.publish(served_key, str(version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    pipe.reset()
        self._adopt(doc)
        return Model.model_validate_json(doc)

    def _evict_versions(self) -> None:
        """Forget the oldest versions beyond keep_versions, never the served one."""
        kept = [int(v) for v in self.redis.zrange(self._key("versions"), 0, -1)]
        if len(kept) <= self._keep_versions:
            return
        served_doc = self.redis.get(self._key("served"))
        served = None if served_doc is None else Model.model_validate_json(served_doc).version
        old = [v for v in kept if v != served][: len(kept) - self._keep_versions]
        pipe = self.redis.pipeline()
        pipe.hdel(self._key("models"), *map(str, old))
        pipe.zrem(self._key("versions"), *map(str, old))
        pipe.execute()

    @_available
    def end_job(
        self,
        job_id: str,
        status: JobStatus,
        error: dict[str, Any] | None = None,
        attempt: int | None = None,
    ) -> Job:
        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            self._check(job, attempt)
            return self._finish(pipe, job, status, error)

        job = self._change(job_id, change)
        self._evict()
        return job

    @_available
    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job (or one whose worker is gone) now; ask a running one's worker to
        stop after its current block. The job as it is after the request."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            if job.status.ended:
                raise JobAlreadyEnded(f"job {job_id} already ended as {job.status.value}")
            shown = self._present([(fields[b"doc"], fields.get(b"worker"))])[0]
            if shown.status is JobStatus.queued:
                return self._finish(pipe, job, JobStatus.cancelled, None)
            pipe.hset(self._key("job", job_id), "cancel", "1")
            return job

        job = self._change(job_id, change)
        self._evict()
        return job

    def _finish(
        self,
        pipe: Pipeline,
        job: Job,
        status: JobStatus,
        error: dict[str, Any] | None,
        result: JobResult | None = None,
        at: Any = None,
    ) -> Job:
        problem = Problem.model_validate(error) if error is not None else None
        job = self._put(
            pipe, job, status=status, finished_at=at or now(), error=problem, result=result
        )
        pipe.hdel(self._key("job", job.id), "worker", "cancel")
        pipe.delete(self._key("data", job.id))
        pipe.zadd(self._key("ended"), {job.id: time.time()})
        pipe.publish(self._key("ended"), job.model_dump_json())
        return job

    def _evict(self) -> None:
        """Forget the jobs that ended longest ago beyond keep_jobs, never the served model's."""
        ended = [raw.decode() for raw in self.redis.zrange(self._key("ended"), 0, -1)]
        if len(ended) <= self._keep_jobs:
            return
        served_doc = self.redis.get(self._key("served"))
        served = None if served_doc is None else Model.model_validate_json(served_doc).job_id
        others = [j for j in ended if j != served]
        for job_id in others[: max(0, len(others) - self._keep_jobs)]:
            idem = self.redis.hget(self._key("job", job_id), "idem")
            pipe = self.redis.pipeline()
            pipe.delete(self._key("job", job_id), self._key("data", job_id))
            self._clear_history(pipe, job_id)
            pipe.zrem(self._key("jobs"), job_id)
            pipe.zrem(self._key("ended"), job_id)
            if idem is not None:
                pipe.delete(self._key("idem", idem.decode()))
            pipe.execute()

    # -- histories -------------------------------------------------------------------------

    @_available
    def history(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> History:
        return self.history_page(job_id, since, limit, max_points).model()

    def history_page(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> HistoryPage:
        if job_id is None:
            latest = self.redis.get(self._key("latest"))
            if latest is None:
                raise HistoryNotFound("no job has started yet: POST /fit first")
            job_id = latest.decode()
        job = self.get_job(job_id)
        if job.started_at is None:
            raise HistoryNotFound(f"job {job_id} has not started yet; retry when it runs")
        names = _columns(job)
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


COLUMNS = ("w", "loss", "b", "val_loss")


def _columns(job: Job) -> list[str]:
    """The history columns a job records: w and loss, b with an intercept, val_loss with a
    validation split."""
    names = ["w", "loss"]
    if job.params.fit_intercept:
        names.append("b")
    if job.params.validation_fraction:
        names.append("val_loss")
    return names


def _raw(values: Sequence[float]) -> bytes:
    if isinstance(values, memoryview):
        return values.tobytes()

    return array("d", values).tobytes()
