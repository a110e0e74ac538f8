"""How a job lives in Redis: the client, the key layout, and the transactions every change of
a job goes through (RedisJobs, the base of RedisStore, its worker API and its reconciler's
repairs).

What lives where (every key under SGD_REDIS_PREFIX, `sgd:` by default):

    job:{id}          hash: doc (the Job as JSON); while it runs: worker, attempt, claim (the
                      claim's token); cancel ("1" once asked), cancelled_by (the request's
                      token), idem (its Idempotency-Key), msg (its current message), deaths
    data:{id}         hash: x, y (float64 bytes) until the job ends
    rows:{version}    hash: x, y: a kept version's fit rows (SGD_RETRAIN_FIT_ROWS), copied
                      from its job's data as the fit publishes it, dropped with the version
    hist:{id}:{col}   string: the w, loss (and b) columns as raw float64, appended per chunk
    beat:{id}:{n}     a counter the owner of attempt n bumps every lease/5 s: its liveness
    jobs / ended      sorted sets: ids by creation / by end (list, eviction)
    queued / running  sorted sets: the open jobs by state (the queue's limit, the reconciler)
    idem:{key}        "<fingerprint> <job id>"
    models / versions hash: version -> Model JSON; sorted set: the kept versions (eviction)
    version           the last version number given out
    served            the served Model as JSON
    latest            the latest started job's id
    settings          hash: keep_jobs, keep_versions: retention, one setting of the service
    probe             a short-lived key the watcher writes to learn that Redis takes writes
    queue:fits[.msgs] the job library's queue (Dramatiq's Redis layout): message ids, bodies

Channels are server-wide in Redis, so theirs carry the database too: `{prefix}db{n}:served`
announces each change of the served model, `{prefix}db{n}:ended` each job's end, and
`{prefix}db{n}:changed` the id of each job written (its event streams read it then).

Every change of a job is a WATCH/MULTI transaction on its hash (`_change`), so two processes
never overwrite each other's change, and each is safe to run twice: redis-py sends a command
again after a cut connection, when the first one may have landed, and the transaction then
reads what it did (a job that exists, a claim or cancel with its own token, history up to its
own epoch). What a job becomes is decided by service.state.jobs; this module only writes it.
"""

import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.core.errors import StoreUnavailable
from service.core.schemas import Job, Model
from service.state import jobs

log = logging.getLogger("sgd_service.redis")

# The job library's queue and actor (service.runner): its keys are written here, with the job,
# so that a fit and its message exist together.
QUEUE = "fits"
ACTOR = "fit"
# Socket timeouts: a Redis that does not answer is unavailable soon, not after minutes.
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 5.0
# A cut connection is dialled again at once, twice (every transaction here is safe to run
# again); a Redis that hangs is not asked again: its timeout is already the caller's wait.
RETRY = Retry(ExponentialBackoff(cap=0.2, base=0.02), 2, supported_errors=(redis.ConnectionError,))
# The history columns a job may record, each a string of float64.
COLUMNS = ("w", "loss", "b", "val_loss")

P = ParamSpec("P")
T = TypeVar("T")
Pipeline = Any  # redis.client.Pipeline, as loosely typed as the client


def unavailable(exc: redis.RedisError) -> StoreUnavailable:
    """What every Redis failure is to a caller: a lost connection, a timeout, a refused write
    (OOM under maxmemory, MISCONF, READONLY) alike."""
    if isinstance(exc, redis.ResponseError):
        what = f"refuses the command: {str(exc).splitlines()[0][:200]}"
    else:
        what = f"cannot be reached: {exc.__class__.__name__}"
    return StoreUnavailable(
        f"the shared store (Redis) {what}; retry shortly (predictions still work)"
    )


def available(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn any Redis error into StoreUnavailable (503 store-unavailable); the signature kept."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise unavailable(exc) from exc

    return wrapper


def check_config(client: Any) -> None:
    """Warn of a Redis that may evict keys: the service needs every one it writes (a lost
    version counter would give a number out twice)."""
    try:
        reply = client.config_get("maxmemory-policy")
    except redis.ResponseError:  # CONFIG is renamed or refused on some managed Redis
        log.info("cannot read Redis's maxmemory-policy; it must be noeviction (README)")
        return
    policy = reply.get(b"maxmemory-policy", reply.get("maxmemory-policy", b""))
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    if policy != "noeviction":
        log.warning(
            "Redis runs with maxmemory-policy %s, which may evict the service's keys "
            "(jobs, versions, the version counter): set it to noeviction (README)",
            policy,
        )


def columns(job: Job) -> list[str]:
    """The history columns a job records: w and loss, b with an intercept, val_loss with a
    validation split."""
    names = ["w", "loss"]
    if job.params.fit_intercept:
        names.append("b")
    if job.params.validation_fraction:
        names.append("val_loss")
    return names


class RedisJobs:
    """The connection, the keys, and the writes a job's transitions go through."""

    def __init__(
        self,
        url: str,
        prefix: str,
        keep_jobs: int,
        keep_versions: int = 100,
        lease_seconds: float = 10.0,
    ) -> None:
        self.prefix = prefix
        self.queue_namespace = prefix + "queue"  # the job library's keys (service.runner)
        self._keep_jobs = keep_jobs
        self._keep_versions = keep_versions
        self.lease_seconds = lease_seconds
        # Any: redis-py types every reply as bytes | str (for decode_responses) and leaves some
        # commands untyped; this client always answers bytes.
        self.redis: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            health_check_interval=10,
            retry=RETRY,
        )
        db = self.redis.connection_pool.connection_kwargs.get("db", 0)
        self._channels = f"{prefix}db{db}:"

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _queue_key(self, suffix: str = "") -> str:
        return f"{self.queue_namespace}:{QUEUE}{suffix}"

    def _beat_key(self, job_id: str, attempt: int) -> str:
        return self._key("beat", job_id, str(attempt))

    def _retention(self) -> tuple[int, int]:
        """keep_jobs, keep_versions: the service's (set by its replicas), else this process's."""
        keep = self.redis.hmget(self._key("settings"), ["keep_jobs", "keep_versions"])
        return (
            int(keep[0]) if keep[0] else self._keep_jobs,
            int(keep[1]) if keep[1] else self._keep_versions,
        )

    def _change(
        self,
        job_id: str,
        fn: Callable[[Pipeline, Job, dict[bytes, bytes]], T],
        also: Sequence[str] = (),
    ) -> T:
        """WATCH the job's hash (and the keys `also`), hand its doc and fields to fn, which
        reads and queues commands on the pipeline, then run them in one MULTI/EXEC; all again
        if anyone changed a watched key meanwhile, or the connection was cut. fn's result."""
        key = self._key("job", job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, *also)
                    fields: dict[bytes, bytes] = pipe.hgetall(key)
                    if b"doc" not in fields:
                        raise jobs.job_not_found(job_id)
                    out = fn(pipe, Job.model_validate_json(fields[b"doc"]), fields)
                    if pipe.explicit_transaction:  # fn may have nothing to write
                        pipe.execute()
                    return out
                except redis.WatchError:
                    pipe.reset()

    def _transact(self, keys: Sequence[str], fn: Callable[[Pipeline], T]) -> T:
        """WATCH `keys`, let fn read and queue its writes (after pipe.multi()), run them in one
        MULTI/EXEC; all again if anyone changed a watched key meanwhile, or the connection was
        cut. fn's result."""
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*keys)
                    out = fn(pipe)
                    if pipe.explicit_transaction:  # fn may have nothing to write
                        pipe.execute()
                    return out
                except redis.WatchError:
                    pipe.reset()

    def _put(self, pipe: Pipeline, job: Job) -> Job:
        """Write the job's next snapshot (in the transaction being built) and announce it."""
        if not pipe.explicit_transaction:
            pipe.multi()
        pipe.hset(self._key("job", job.id), "doc", job.model_dump_json())
        pipe.publish(self._channels + "changed", job.id)  # in the transaction: after it lands
        return job

    def _finish(self, pipe: Pipeline, job: Job) -> Job:
        """Write a job that has just ended (jobs.ended or jobs.succeeded): it leaves the open
        jobs, its claim, data and beat go, and every replica hears of its end."""
        job = self._put(pipe, job)
        pipe.hdel(self._key("job", job.id), "worker", "claim", "attempt", "cancel")
        pipe.delete(self._key("data", job.id), self._beat_key(job.id, job.attempts))
        pipe.zrem(self._key("queued"), job.id)
        pipe.zrem(self._key("running"), job.id)
        pipe.zadd(self._key("ended"), {job.id: time.time()})
        pipe.publish(self._channels + "ended", job.model_dump_json())
        return job

    def _requeue(self, pipe: Pipeline, job: Job) -> Job:
        """Write a running job back on the queue (jobs.requeued) with a new message: its claim
        and its attempt's beat go."""
        job = self._put(pipe, jobs.requeued(job))
        pipe.hdel(self._key("job", job.id), "worker", "claim", "attempt")
        pipe.delete(self._beat_key(job.id, job.attempts))
        self._move(pipe, job.id, "running", "queued")
        self._enqueue(pipe, job.id)
        return job

    def _move(self, pipe: Pipeline, job_id: str, source: str, target: str) -> None:
        pipe.zrem(self._key(source), job_id)
        pipe.zadd(self._key(target), {job_id: time.time()})

    def _clear_history(self, pipe: Pipeline, job_id: str) -> None:
        pipe.delete(*(self._key("hist", job_id, c) for c in COLUMNS))

    def _enqueue(self, pipe: Pipeline, job_id: str) -> None:
        """Queue a message for the job (in the transaction being built), as Dramatiq's Redis
        broker does, and note it on the job: its id, for the reconciler."""
        from dramatiq import Message

        message_id = str(uuid.uuid4())
        body = Message(
            queue_name=QUEUE,
            actor_name=ACTOR,
            args=(job_id,),
            kwargs={},
            options={"redis_message_id": message_id},
        ).encode()
        pipe.hset(self._queue_key(".msgs"), message_id, body)
        pipe.rpush(self._queue_key(), message_id)
        pipe.hset(self._key("job", job_id), "msg", message_id)

    def _evict(self) -> None:
        """Forget the jobs that ended longest ago beyond the service's keep_jobs, never the
        served model's."""
        ended = [raw.decode() for raw in self.redis.zrange(self._key("ended"), 0, -1)]
        keep_jobs = self._retention()[0]
        if len(ended) <= keep_jobs:
            return
        served_doc = self.redis.get(self._key("served"))
        served = None if served_doc is None else Model.model_validate_json(served_doc).job_id
        for job_id in jobs.evicted_jobs(ended, served, keep_jobs):
            idem = self.redis.hget(self._key("job", job_id), "idem")
            pipe = self.redis.pipeline()
            pipe.delete(self._key("job", job_id), self._key("data", job_id))
            self._clear_history(pipe, job_id)
            pipe.zrem(self._key("jobs"), job_id)
            pipe.zrem(self._key("ended"), job_id)
            if idem is not None:
                pipe.delete(self._key("idem", idem.decode()))
            pipe.publish(self._channels + "changed", job_id)
            pipe.execute()
