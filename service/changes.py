"""Job changes, told to the event streams that wait on them; and the streams' admission.

An event stream used to poll the store through the threadpool every 50 ms, whether or not
anything had changed: 1,000 subscribers took 87% of a core and /predict's p99 from 9.5 to 51 ms.
Now a store calls `Changes.changed(job_id)` whenever a job changes (in memory: as it writes;
in Redis mode: on the channel its writers publish to), from whatever thread it runs in, and a
stream reads the store only after that. `Streams` bounds how many streams a replica holds, in
all and per job, and how often all of them together read the store.
"""

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import TooManyStreams

# Reads of the store per second that all of a replica's streams share: with a few streams each
# reads at most every 50 ms (about 20 events a second); with many, each reads less often.
STREAM_READS_PER_SECOND = 200
EVENT_INTERVAL = 0.05  # seconds between two reads of one stream, at least


class Changes:
    """Which jobs changed, for the coroutines waiting on them. `changed` is safe from any
    thread and never blocks: it wakes each waiting loop once, which sets its waiters' events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, dict[asyncio.Event, asyncio.AbstractEventLoop]] = {}

    def changed(self, job_id: str | None = None) -> None:
        """Job `job_id` changed (None: any job may have, e.g. after a lost subscription)."""
        with self._lock:
            if job_id is None:
                waiting = [w for job in self._waiting.values() for w in job.items()]
            else:
                waiting = list(self._waiting.get(job_id, {}).items())
        loops: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        for event, loop in waiting:
            loops.setdefault(loop, []).append(event)
        for loop, events in loops.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(_set_all, events)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever `job_id` changes, while the block runs (in a coroutine)."""
        event, loop = asyncio.Event(), asyncio.get_running_loop()
        with self._lock:
            self._waiting.setdefault(job_id, {})[event] = loop
        try:
            yield event
        finally:
            with self._lock:
                waiting = self._waiting.get(job_id, {})
                waiting.pop(event, None)
                if not waiting:
                    self._waiting.pop(job_id, None)


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


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
