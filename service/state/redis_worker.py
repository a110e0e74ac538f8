"""RedisStore's worker API: what a training worker does with a job besides the Store's fenced
writes (append_history, end_job and succeed_job with its attempt, in service.state.redis): claim
it, read its samples, beat while it runs, look for a cancel, and give it back.

A worker's writes carry its attempt number (the job's `attempts` when it claimed the job): a
worker that lost its job has a stale number, and the transaction refuses it (Fenced) before
anything lands. service.state.base.WorkerStore is this API as a protocol.
"""

import logging

from service.core.errors import JobNotFound
from service.core.schemas import Job, JobStatus
from service.state import jobs
from service.state.redis_jobs import Pipeline, RedisJobs, available

log = logging.getLogger("sgd_service.redis")

# A beat counter goes with its attempt's end; its TTL only collects what a crash left behind, it
# never decides liveness.
BEAT_TTL_MS = 600_000


class WorkerAPI(RedisJobs):
    """Claim, beats, the cancel flag, the samples and the hand-back, on Redis."""

    @available
    def claim(self, job_id: str, worker: str, token: str) -> Job | None:
        """Start the next attempt of a queued job for this worker: the job (its `attempts` is
        the attempt's fencing number), or None if there is nothing to run: ended, cancelled,
        evicted, or running already. A message of a running job is a duplicate (the job
        library delivers again after an outage, or to a worker it thought dead), never a death:
        the owner goes on, and if it is really dead the reconciler queues the job again. The
        token makes a claim sent twice (a cut connection) find itself."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status.ended:
                return None
            if job.status is JobStatus.running:
                if fields.get(b"claim") == token.encode():
                    return job
                log.info("job %s: a duplicate delivery of a running job; dropped", job_id)
                return None
            pipe.multi()
            if b"cancel" in fields:
                self._finish(pipe, jobs.ended(job, JobStatus.cancelled, None, jobs.now()))
                return None
            self._clear_history(pipe, job_id)
            job = self._put(pipe, jobs.started(job, jobs.now()))
            attempt = job.attempts
            key = self._key("job", job_id)
            pipe.hset(key, mapping={"worker": worker, "claim": token, "attempt": attempt})
            self._move(pipe, job_id, "queued", "running")
            pipe.set(self._beat_key(job_id, attempt), 0, px=BEAT_TTL_MS)
            pipe.set(self._key("latest"), job_id)
            return job

        try:
            job = self._change(job_id, change)
        except JobNotFound:
            return None
        if job is None:
            self._evict()
        return job

    @available
    def beat(self, job_id: str, attempt: int) -> None:
        """The owner of this attempt is alive (a counter, not a time: no clock is compared)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(self._beat_key(job_id, attempt))
        pipe.pexpire(self._beat_key(job_id, attempt), BEAT_TTL_MS)
        pipe.execute()

    @available
    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.hexists(self._key("job", job_id), "cancel"))

    @available
    def job_data(self, job_id: str) -> tuple[bytes, bytes]:
        x, y = self.redis.hmget(self._key("data", job_id), ["x", "y"])
        if x is None or y is None:
            raise JobNotFound(f"no data for job {job_id!r}")
        return x, y

    @available
    def requeue_job(self, job_id: str, attempt: int) -> None:
        """Give a running job back to the queue with a new message (its worker is stopping): a
        worker claims it again as its next attempt. Not a death."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> None:
            jobs.check_owner(job, attempt)
            pipe.multi()
            self._requeue(pipe, job)

        self._change(job_id, change)
