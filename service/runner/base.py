"""The Runner protocol: what every runner of fits offers the routes, the metrics and the server."""

from typing import Protocol

from service.core.errors import NotReady, ServiceError, ShuttingDown
from service.core.schemas import Job, JobParams
from service.runner import worker


class Runner(Protocol):
    """What the routes, the metrics and the server need from a runner of fits: JobRunner
    (service.runner.local: a worker process of its own, the store in memory) or QueueRunner
    (service.runner.fleet: a shared queue and store in Redis)."""

    @property
    def ready(self) -> bool:
        """Can take fits now (/readyz)."""

    def not_ready(self) -> ServiceError:
        """Why it cannot take fits now, when it cannot: the error /readyz answers."""

    @property
    def broken(self) -> str | None:
        """Why this replica can never train again (the process should exit), or None."""

    @property
    def queue_depth(self) -> int: ...

    def start(self) -> None: ...

    def submit(
        self,
        params: JobParams,
        n_samples: int,
        x: worker.Samples,
        y: worker.Samples,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Job, bool]:
        """Create a job with its samples (float64 bytes) and queue it, all or nothing; or, for
        an Idempotency-Key (key, body fingerprint) seen before, the original job and False.
        Raises QueueFull or ShuttingDown having created nothing."""

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now or ask a running one to stop; raises JobNotFound or
        JobAlreadyEnded."""

    def drain(self) -> None:
        """Refuse new fits from now on."""

    def stop(self, timeout: float = 10.0) -> None: ...


# What both runners answer while they cannot take a fit: one wording in both modes.


def draining() -> NotReady:
    """/readyz once the replica drains."""
    return NotReady("the service is shutting down; send requests to another replica")


def shutting_down() -> ShuttingDown:
    """A fit sent to a draining replica."""
    return ShuttingDown("the service is shutting down; send the fit to another replica")


def starting() -> NotReady:
    """/readyz before a training worker of this replica has said hello."""
    return NotReady("the training worker is starting; retry shortly")
