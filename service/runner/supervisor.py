"""Training worker processes as both runners supervise them: start, hello, back-off, stop.

A worker is a fork of the fork server (service.core.processes.fork_context) with a pipe to the
runner that started it, on which it says Hello once it can take fits: one that dies before that
failed to start. Failed starts in a row are spaced out by START_BACKOFF and, at
MAX_START_FAILURES, the runner is broken: this replica can never train, and the server exits so
that its own supervisor replaces it. A worker is stopped by asking it, then killed after a grace.

What a runner waits on besides differs, so each keeps its loop and adapts WorkerProcess: the
in-memory runner's dispatcher waits on its one worker's pipe and sentinel and feeds it fits down
the pipe (service.runner.local); Redis mode's runner polls its SGD_WORKERS workers, which take
their fits from Redis (service.runner.fleet).
"""

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from service.runner.worker import Hello

log = logging.getLogger("sgd_service.workers")

# Failed starts in a row (a fork that failed, a death before the hello) after which the worker
# cannot start at all (a broken install, no memory) and the runner says it is broken.
MAX_START_FAILURES = 5
# Seconds before each new start after consecutive failures: a crash loop must not spin.
START_BACKOFF = (0.0, 0.5, 1.0, 2.0, 4.0)
# How long a killed worker gets to be reaped; one that takes longer is stuck in the kernel.
REAP_SECONDS = 5.0


class StartFailed(Exception):
    """A worker process could not be started: the fork server died, or could not fork."""


class WorkerProcess:
    """One training worker process, forked from the fork server, and this side of its pipe."""

    def __init__(
        self, ctx: Any, target: Callable[..., None], args: tuple[Any, ...], name: str
    ) -> None:
        """Start target(pipe, *args) in a new process; raises StartFailed."""
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), name=name, daemon=True)
        try:
            self.proc.start()
        except (OSError, EOFError) as exc:  # the fork server died, or could not start
            self.conn.close()
            raise StartFailed(f"the training worker could not be started: {exc!r}") from exc
        finally:
            child.close()
        self.pid: int = self.proc.pid
        self.sentinel: int = self.proc.sentinel

    def hello(self) -> Hello | None:
        """Its hello, once the pipe has something to read; None if it died before saying it."""
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            return None
        assert isinstance(msg, Hello), msg
        return msg

    def exit_code(self, wait: float) -> int | None:
        """Its exit code, given `wait` seconds to exit: its pipe may close just before it does."""
        self.proc.join(wait)
        code: int | None = self.proc.exitcode
        return code

    def ask_to_stop(self) -> None:
        """SIGTERM; a worker that ignores it is asked another way (an override)."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.terminate()

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # reaped, or closed, meanwhile
            self.proc.kill()

    def close(self) -> None:
        """Close its pipe (it stops when the pipe closes) and, once it has exited, the process."""
        self.conn.close()
        if self.proc.exitcode is not None:
            self.proc.close()


def stop(workers: Sequence[WorkerProcess], grace: float) -> None:
    """Ask each worker to stop, give them `grace` seconds together to exit, kill those still
    running, and close them."""
    for w in workers:
        if w.proc.is_alive():
            w.ask_to_stop()
    deadline = time.monotonic() + grace
    for w in workers:
        w.proc.join(max(0.1, deadline - time.monotonic()))
        if w.proc.exitcode is None:
            log.error("training worker %d did not stop within %.0fs; killing it", w.pid, grace)
            w.kill()
            w.proc.join(REAP_SECONDS)
        w.close()


class StartFailures:
    """A runner's failed starts in a row: the back-off before its next start, and whether it
    should give up."""

    def __init__(self) -> None:
        self.count = 0
        self.broken: str | None = None  # why this replica can never train, once it cannot

    def backoff(self) -> float:
        return START_BACKOFF[min(self.count, len(START_BACKOFF) - 1)]

    def succeeded(self) -> None:
        self.count = 0

    def failed(self, reason: str) -> None:
        self.count += 1
        log.error("%s during start-up (%d in a row)", reason, self.count)
        if self.count >= MAX_START_FAILURES and self.broken is None:
            self.broken = f"the training worker failed to start {self.count} times in a row"
            log.critical("%s; this replica can no longer train", self.broken)
