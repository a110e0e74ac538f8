"""The watcher: one thread per replica that keeps in memory what a request may never wait on
Redis for, in Redis mode.

The served model is held in memory, as in MemoryStore: RedisStore.model is an attribute read,
kept fresh by this thread, which listens on the `served` channel and re-reads `served` every
RECHECK_SECONDS in case a message was missed; /predict never waits for Redis. The same thread
tells the event streams which jobs changed (the `changed` channel), reports each job's end (the
`ended` channel) and keeps `problem` true: whether Redis answers and takes writes (/readyz).
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from service.core.outcomes import Canary
from service.core.schemas import Job, Model, Rollout
from service.state.changes import Changes
from service.state.redis_jobs import check_config

log = logging.getLogger("sgd_service.redis")

# How often the served model is re-read even without a message (a missed publication), and
# how often a replica checks that Redis takes writes (/readyz).
RECHECK_SECONDS = 0.5
PROBE_SECONDS = 1.0


class Watcher:
    """A replica's view of the shared store: the served model, whether Redis can take work, and
    which jobs changed; fed by a thread of its own once started."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        channels: str,
        retention: tuple[int, int],
        on_end: Callable[[Job], None] | None = None,
    ) -> None:
        self.redis = client
        self._prefix = prefix
        self._channels = channels
        self._retention = retention  # this process's keep_jobs, keep_versions
        self._on_end = on_end
        self.model: Model | None = None
        self.canary: Canary | None = None  # the canary rollout, read with the served model
        self._caught_up = 0  # the highest published version catch_up has read the model for
        self.loaded = False  # the served model has been read once: the replica can be ready
        # Why Redis cannot take work now (unreachable, or refusing writes); None when it can.
        self.problem: str | None = "Redis has not answered yet"
        self.changes = Changes()  # told from the `changed` channel
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sgd-served", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(5)

    def adopt(self, raw: bytes | None, residuals: bytes | None = None) -> None:
        """Serve this Model JSON here, unless it is the version served already; with its
        conformal residuals (read from Redis unless given)."""
        model = None if raw is None else Model.model_validate_json(raw)
        current = self.model
        if model is not None and (current is None or current.version != model.version):
            conformal = model.intervals is not None and model.intervals.conformal is not None
            if conformal and residuals is None:
                residuals = self.redis.get(f"{self._prefix}residuals:{model.version}")
            self.model = model.holding(residuals)  # the one assignment that serves it here
            log.info("serving model version %d", model.version)

    def refresh(self) -> None:
        """Read the served model and the canary now (the thread does this by itself)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self._prefix + "served")
        pipe.get(self._prefix + "canary")
        served, canary = pipe.execute()
        self.adopt(served)
        self._adopt_canary(canary)
        self.loaded = True

    def _adopt_canary(self, raw: bytes | None) -> None:
        """Split predictions as this Rollout JSON says (None: no canary runs)."""
        if raw is None:
            self.canary = None
            return
        rollout = Rollout.model_validate_json(raw)
        held = self.canary
        if held is not None and (held.rollout.version, held.rollout.started_at) == (
            rollout.version,
            rollout.started_at,
        ):
            return
        doc = self.redis.hget(self._prefix + "models", str(rollout.version))
        if doc is None:  # evicted: nothing to send predictions to
            self.canary = None
            return
        model = Model.model_validate_json(doc)
        residuals = None
        if model.intervals is not None and model.intervals.conformal is not None:
            residuals = self.redis.get(f"{self._prefix}residuals:{model.version}")
        self.canary = Canary(model.holding(residuals), rollout)
        log.info("rolling out version %d to %d%%", rollout.version, rollout.traffic)

    def catch_up(self, shown: list[Job]) -> None:
        """Read your writes: a caller shown a job that published version N gets N (or a later
        served version) from this replica's /predict from then on, not only within the
        subscription's milliseconds. One read of the served model, once per such version."""
        published = max((j.result.model_version for j in shown if j.result), default=0)
        current = self.model.version if self.model else 0
        if published > current and published > self._caught_up:
            self._caught_up = published
            self.refresh()

    def _run(self) -> None:
        """Keep `model` fresh: a message per publication, a re-read as the fallback; and keep
        `problem` true: Redis answers and takes writes."""
        announced = False
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*(self._channels + c for c in ("served", "ended", "changed")))
                self.changes.changed()  # what changed unheard meanwhile is read again
                self.refresh()
                if not announced:
                    check_config(self.redis)
                    self._share_retention()
                    announced = True
                self._probe()
                last = probed = time.monotonic()
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=RECHECK_SECONDS / 2)
                    channel = b"" if msg is None else msg["channel"]
                    if channel.endswith(b":changed"):
                        self.changes.changed(msg["data"].decode())
                    elif channel.endswith(b":ended"):
                        self._ended(msg["data"])
                    if channel.endswith(b":served") or time.monotonic() - last >= RECHECK_SECONDS:
                        self.refresh()
                        last = time.monotonic()
                    if time.monotonic() - probed >= PROBE_SECONDS:
                        self._probe()
                        probed = time.monotonic()
            except redis.RedisError as exc:
                if self.problem is None:
                    log.warning("Redis unreachable (%s); serving the model in memory", exc)
                self.problem = f"Redis cannot be reached ({exc.__class__.__name__})"
                self._closed.wait(0.2)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _probe(self) -> None:
        """Write a short-lived key: a Redis out of memory, read-only or unable to persist
        refuses it, and the replica is not ready until it takes writes again."""
        try:
            self.redis.set(self._prefix + "probe", b"1", px=10_000)
        except redis.ResponseError as exc:
            problem = f"Redis refuses writes: {str(exc).splitlines()[0][:200]}"
            if self.problem != problem:
                log.warning("%s", problem)
            self.problem = problem
            return
        if self.problem is not None:
            log.info("Redis takes writes")
        self.problem = None

    def _share_retention(self) -> None:
        """Make this replica's SGD_KEEP_JOBS and SGD_KEEP_VERSIONS the service's: every
        process evicts by what is in Redis, not by its own environment."""
        keep_jobs, keep_versions = self._retention
        ours = {b"keep_jobs": str(keep_jobs).encode()}
        ours[b"keep_versions"] = str(keep_versions).encode()
        theirs = self.redis.hgetall(self._prefix + "settings")
        changed = {k.decode(): v.decode() for k, v in theirs.items() if ours.get(k, v) != v}
        if changed:
            log.warning(
                "this replica's retention replaces the service's: %s",
                ", ".join(f"{k} {v} -> {ours[k.encode()].decode()}" for k, v in changed.items()),
            )
        self.redis.hset(self._prefix + "settings", mapping=ours)

    def _ended(self, raw: bytes) -> None:
        """A job ended, on whichever worker: every replica reports it (metrics, the log)."""
        if self._on_end is None:
            return
        try:
            self._on_end(Job.model_validate_json(raw))
        except Exception:
            log.exception("reporting a job's end failed")
