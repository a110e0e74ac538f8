"""The reconciler: what no single process can see go wrong in Redis mode, repaired from any
replica or worker with no leader (Reconciler), and the two repairs it makes, each a transaction
that checks its cause again (Repairs, a base of RedisStore).

Who owns a running job is decided by beats, not clocks: the owner bumps a counter, and the
Reconciler of every replica and worker, which watches the counters with its own monotonic clock,
calls an owner dead once its counter has stood still for a whole lease of unbroken watching. A
delivery of a running job's message is a duplicate, never a death (see WorkerAPI.claim). The
same reconciler puts a message back for a queued job whose message is no longer queued.
"""

import contextlib
import logging
import threading
import time

import redis

from service.core.errors import JobNotFound, ServiceError, StoreUnavailable, WorkerCrashed
from service.core.schemas import Job, JobStatus
from service.state import jobs
from service.state.redis_jobs import Pipeline, RedisJobs, available

log = logging.getLogger("sgd_service.redis")


class Repairs(RedisJobs):
    """The reconciler's view of the open jobs, and its two repairs: bury a dead owner's attempt,
    send a lost message again."""

    def open_jobs(self) -> tuple[dict[str, tuple[int, bytes | None]], dict[str, str]]:
        """What the reconciler watches, read now: each running job's attempt and beat counter,
        and each queued job's message that is no longer on the queue (fetched by a worker that
        has not claimed it, or lost with it). Jobs created without a message (the Store
        protocol's create_job alone) are none of its business."""
        running = [i.decode() for i in self.redis.zrange(self._key("running"), 0, -1)]
        queued = [i.decode() for i in self.redis.zrange(self._key("queued"), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in running:
            pipe.hget(self._key("job", job_id), "attempt")
        for job_id in queued:
            pipe.hget(self._key("job", job_id), "msg")
        replies = pipe.execute()
        attempts = {j: int(a) for j, a in zip(running, replies, strict=False) if a is not None}
        messages = {
            j: m.decode() for j, m in zip(queued, replies[len(running) :], strict=True) if m
        }
        pipe = self.redis.pipeline(transaction=False)
        for job_id, attempt in attempts.items():
            pipe.get(self._beat_key(job_id, attempt))
        for message in messages.values():
            pipe.lpos(self._queue_key(), message)
        replies = pipe.execute()
        beats = {j: (a, b) for (j, a), b in zip(attempts.items(), replies, strict=False)}
        positions = replies[len(attempts) :]
        lost = {j: m for (j, m), at in zip(messages.items(), positions, strict=True) if at is None}
        return beats, lost

    @available
    def bury(self, job_id: str, attempt: int, beat: bytes | None, max_attempts: int) -> Job | None:
        """The owner of this attempt is dead (its beat stood still for a lease): count the
        death, then end the job (cancelled if asked, failed after max_attempts deaths) or queue
        it again with a new message. Nothing if the attempt beat, ended or moved on meanwhile."""
        beat_key = self._beat_key(job_id, attempt)

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status is not JobStatus.running or fields.get(b"attempt") != b"%d" % attempt:
                return None
            if pipe.get(beat_key) != beat:
                return None
            deaths = int(fields.get(b"deaths", b"0")) + 1
            pipe.multi()
            pipe.hset(self._key("job", job_id), "deaths", deaths)
            if b"cancel" in fields:
                return self._finish(pipe, jobs.ended(job, JobStatus.cancelled, None, jobs.now()))
            if deaths >= max_attempts:
                last = f"its beat stood still for SGD_LEASE_SECONDS={self.lease_seconds:g}"
                problem = WorkerCrashed.every_attempt(
                    deaths, max_attempts, job.attempts, last
                ).problem()
                return self._finish(pipe, jobs.ended(job, JobStatus.failed, problem, jobs.now()))
            return self._requeue(pipe, job)

        try:
            job = self._change(job_id, change, also=[beat_key])
        except JobNotFound:
            return None
        if job is not None:
            log.warning(
                "job %s: the worker of attempt %d stopped beating for %gs; %s",
                job_id,
                attempt,
                self.lease_seconds,
                "queued again" if not job.status.ended else f"ended {job.status.value}",
            )
            self._evict()
        return job

    @available
    def resend(self, job_id: str, message: str) -> bool:
        """Queue a new message for a queued job whose message `message` has been off the queue
        for a lease; False if the job moved on meanwhile."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> bool:
            if job.status is not JobStatus.queued or fields.get(b"msg") != message.encode():
                return False
            if pipe.lpos(self._queue_key(), message) is not None:
                return False
            pipe.multi()
            self._enqueue(pipe, job_id)
            return True

        try:
            sent = self._change(job_id, change, also=[self._queue_key()])
        except JobNotFound:
            return False
        if sent:
            log.warning("job %s: its message left the queue without a claim; sent again", job_id)
        return sent


class Reconciler:
    """Repairs what no single process can see go wrong, from any replica or worker, with no
    leader: every process runs one, and each repair is a transaction that checks its cause
    again, so two reconcilers never repair one thing twice.

    - An owner is dead when the beat counter of its attempt stood still for a whole lease of
      this reconciler's watching (its own monotonic clock; no two hosts' clocks are compared).
      Watching counts only while unbroken: a pass that fails or takes long (Redis down or hung,
      this process paused) starts the watch again, so an outage never makes a live owner look
      dead. Its job is queued again (or ends: cancelled, or failed after SGD_JOB_ATTEMPTS
      deaths).
    - A queued job's message that has been off the queue for a lease (fetched by a worker that
      died or lost Redis before it claimed the job) is sent again.

    Both happen within lease + 2 x interval of their cause; a message sent twice is harmless
    (a claim drops a running job's duplicate).
    """

    def __init__(self, store: Repairs, max_attempts: int) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.lease = store.lease_seconds
        self.interval = min(1.0, self.lease / 4)
        # A pass longer than this, or this long after the last one, breaks the watch.
        self._max_gap = 2 * self.interval + 0.25
        self._seen: dict[tuple[str, ...], tuple[bytes | None, float]] = {}
        self._last_end: float | None = None

    def run(self, stop: threading.Event) -> None:
        """Pass every interval until stop is set; no exception ends the loop."""
        while not stop.wait(self.interval):
            try:
                self.reconcile()
            except Exception:
                if stop.is_set():  # the store closed under this pass
                    return
                log.exception("reconciling failed; trying again")

    def reconcile(self) -> None:
        """One pass: read, then repair what has stood still for a lease of unbroken watching."""
        start = time.monotonic()
        try:
            beats, lost = self.store.open_jobs()
        except (redis.RedisError, ServiceError):
            self._seen.clear()
            self._last_end = None
            return
        end = time.monotonic()
        unbroken = (
            self._last_end is not None
            and start - self._last_end <= self._max_gap
            and end - start <= self._max_gap
        )
        self._last_end = end
        now_seen: dict[tuple[str, ...], bytes | None] = {}
        for job_id, (attempt, beat) in beats.items():
            now_seen[("run", job_id, str(attempt))] = beat
        for job_id, message in lost.items():
            now_seen[("msg", job_id, message)] = None
        if not unbroken:
            self._seen = {k: (v, end) for k, v in now_seen.items()}
            return
        seen: dict[tuple[str, ...], tuple[bytes | None, float]] = {}
        for key, value in now_seen.items():
            before = self._seen.get(key)
            if before is None or before[0] != value:
                seen[key] = (value, end)
                continue
            seen[key] = before
            if start - before[1] < self.lease:
                continue
            with contextlib.suppress(StoreUnavailable):
                if key[0] == "run":
                    self.store.bury(key[1], int(key[2]), value, self.max_attempts)
                else:
                    self.store.resend(key[1], key[2])
            seen.pop(key)
        self._seen = seen
