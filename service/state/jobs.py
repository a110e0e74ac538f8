"""The job state machine, written once: each transition is a pure function from a Job (and its
inputs) to the next Job, or the domain error that refuses it. Both stores call these and then
persist what they return (MemoryStore in a dict under its lock, RedisStore in a transaction), so
the two can only differ in how they store a job, never in what it becomes.

    queued --started--> running --ended--> cancelled | failed
       ^                  |  |  --succeeded--> succeeded
       +----requeued------+  +--retried--> running (the next attempt)

Also here: what a succeeded job's fit makes (model_of, publication, result_of), which ended jobs
and versions retention lets go, and the errors both stores raise, worded once.
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service.core.errors import (
    Fenced,
    HistoryNotFound,
    IdempotencyKeyReused,
    JobAlreadyEnded,
    JobNotFound,
    QueueFull,
    VersionNotFound,
)
from service.core.schemas import (
    FitReport,
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


# -- transitions ---------------------------------------------------------------------------


def progress(params: JobParams, epoch: int = 0) -> Progress:
    """A job's progress at `epoch` (0: a new job, or an attempt starting over)."""
    return Progress(epoch=epoch, epochs=params.epochs)


def new_job(params: JobParams, n_samples: int, at: datetime) -> Job:
    """A queued job, not started yet."""
    return Job(
        id=uuid.uuid4().hex,
        status=JobStatus.queued,
        created_at=at,
        params=params,
        n_samples=n_samples,
        progress=progress(params),
    )


def started(job: Job, at: datetime) -> Job:
    """A queued job's next attempt running, its progress from 0; it started when its first
    attempt did."""
    return job.model_copy(
        update={
            "status": JobStatus.running,
            "started_at": job.started_at or at,
            "attempts": job.attempts + 1,
            "progress": progress(job.params),
        }
    )


def retried(job: Job) -> Job:
    """A running job's next attempt, its progress from 0 (its worker died); JobAlreadyEnded if
    it is not running."""
    if job.status is not JobStatus.running:
        raise JobAlreadyEnded(f"job {job.id} is {job.status.value}, not running")
    return job.model_copy(update={"attempts": job.attempts + 1, "progress": progress(job.params)})


def requeued(job: Job) -> Job:
    """A running job back on the queue (its worker stopped or died): the next claim starts it
    over as its next attempt."""
    return job.model_copy(update={"status": JobStatus.queued})


def progressed(job: Job, epoch: int) -> Job:
    """A running job with `epoch` epochs recorded."""
    return job.model_copy(update={"progress": progress(job.params, epoch)})


def ended(job: Job, status: JobStatus, error: dict[str, Any] | None, at: datetime) -> Job:
    """A job ended as `status` (cancelled or failed) with its problem, if any."""
    problem = Problem.model_validate(error) if error is not None else None
    return job.model_copy(
        update={"status": status, "finished_at": at, "error": problem, "result": None}
    )


def succeeded(job: Job, result: JobResult, at: datetime) -> Job:
    """A job ended as succeeded with its result."""
    return job.model_copy(
        update={
            "status": JobStatus.succeeded,
            "finished_at": at,
            "error": None,
            "result": result,
        }
    )


# -- what a transition may be refused for ----------------------------------------------------


def check_open(job: Job) -> None:
    """JobAlreadyEnded unless the job is queued or running: nothing ends a job twice."""
    if job.status.ended:
        raise JobAlreadyEnded(f"job {job.id} already ended as {job.status.value}")


def check_owner(job: Job, attempt: int | None) -> None:
    """check_open, and for a worker's write (its attempt number), Fenced unless that attempt
    is the job's current one and still running."""
    check_open(job)
    if attempt is not None and (job.status is not JobStatus.running or job.attempts != attempt):
        raise Fenced(f"attempt {attempt} of job {job.id} no longer owns it")


def replayed(job: Job, status: JobStatus, attempt: int | None) -> bool:
    """The job already ended as `status` by this very attempt: an end sent twice (a cut
    connection), whose first send landed."""
    return job.status is status and attempt is not None and job.attempts == attempt


# -- what a succeeded fit makes --------------------------------------------------------------


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
        intervals=report.intervals,
    ).holding(report.residuals)


def publication(job: Job, report: FitReport, served: Model | None) -> tuple[bool, str | None]:
    """Whether a fit's new version is served, per the job's `publish`, and if not, why not.

    "if_better" compares validation MSEs on the job's held-out rows: the new version's against
    the model served at this moment (the caller holds its lock or transaction), which is
    evaluated on the same rows in O(1) (schemas.Quadratic).
    """
    publish = job.params.publish
    if publish == "canary":
        return False, None  # the store rolls it out (or says why not)
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
        **report.model_dump(exclude={"val", "intervals", "residuals"}),
        published=served,
        not_published_because=why_not,
    )


# -- retention -------------------------------------------------------------------------------


def evicted_jobs(ended: Sequence[str], served: str | None, keep_jobs: int) -> list[str]:
    """Which ended jobs go: those that ended longest ago (`ended` is in the order they ended)
    beyond keep_jobs, never the served model's job, which is not counted.

    By the order they ended, not the order they were created: the job whose end is being
    recorded is the newest ended one, so it is never evicted while that end is handled.
    """
    others = [j for j in ended if j != served]
    return others[: max(0, len(others) - keep_jobs)]


def evicted_versions(
    kept: Sequence[int], served: int | None, keep_versions: int, canary: int | None = None
) -> list[int]:
    """Which versions go: the oldest (`kept` is oldest first) beyond keep_versions, the served
    one and the canary counted but never evicted."""
    return [v for v in kept if v not in (served, canary)][: max(0, len(kept) - keep_versions)]


# -- the errors both stores raise ------------------------------------------------------------


def job_not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r}; GET /jobs lists the recent ones")


def version_not_found(version: int) -> VersionNotFound:
    return VersionNotFound(f"no model version {version}; GET /models lists the kept ones")


def key_reused(key: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"Idempotency-Key {key!r} was used with another body; use a new key for a new fit"
    )


def no_history(job_id: str | None = None) -> HistoryNotFound:
    """No job has started yet (job_id None), or this one has not."""
    if job_id is None:
        return HistoryNotFound("no job has started yet: POST /fit first")
    return HistoryNotFound(f"job {job_id} has not started yet; retry when it runs")


def queue_full(queued: int, limit: int) -> QueueFull:
    return QueueFull(
        f"{queued} jobs are queued (SGD_MAX_QUEUED_JOBS={limit}); retry later or cancel one",
        retry_after=2,
    )
