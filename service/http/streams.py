"""The event streams' admission: how many a replica holds, and how often they read."""

from collections.abc import Iterator
from contextlib import contextmanager

from service.core.errors import TooManyStreams

# Reads of the store per second that all of a replica's streams share: with a few streams each
# reads at most every 50 ms (about 20 events a second); with many, each reads less often.
STREAM_READS_PER_SECOND = 200
EVENT_INTERVAL = 0.05  # seconds between two reads of one stream, at least


class Streams:
    """The event streams a replica holds: at most `most` in all and `most_per_job` per job
    (TooManyStreams past either), and how long each waits between two reads of the store."""

    def __init__(self, most: int, most_per_job: int) -> None:
        self.most, self.most_per_job = most, most_per_job
        self._open: dict[str, int] = {}
        self.count = 0

    def check(self, job_id: str) -> None:
        """Raise TooManyStreams if a stream of `job_id` would be one too many."""
        if self.count >= self.most:
            raise TooManyStreams(
                f"this replica holds SGD_MAX_STREAMS={self.most} event streams; retry later, "
                "or poll GET /jobs/{id}"
            )
        if self._open.get(job_id, 0) >= self.most_per_job:
            raise TooManyStreams(
                f"job {job_id} has SGD_MAX_JOB_STREAMS={self.most_per_job} event streams open "
                "on this replica; retry later, or poll GET /jobs/{id}"
            )

    @contextmanager
    def admit(self, job_id: str) -> Iterator[None]:
        """Hold a place for a stream of `job_id` while the block runs (on the event loop)."""
        self.check(job_id)
        self.count += 1
        self._open[job_id] = self._open.get(job_id, 0) + 1
        try:
            yield
        finally:
            self.count -= 1
            self._open[job_id] -= 1
            if not self._open[job_id]:
                del self._open[job_id]

    def pause(self) -> float:
        """Seconds a stream waits after a read: all streams together read the store at most
        STREAM_READS_PER_SECOND times a second, and each at most every EVENT_INTERVAL."""
        return max(EVENT_INTERVAL, self.count / STREAM_READS_PER_SECOND)
