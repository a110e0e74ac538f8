"""The plotting process: matplotlib draws /history/plot in a process of its own.

Drawing a figure takes 30-100 ms of CPU while holding the GIL; in the server's threadpool two
clients looping on the plot raised /predict's p99 tenfold. A process of its own (spawned on
the first plot, at the training worker's priority, below the server's) draws instead; the
server sends it the thinned history (a few thousand points) and gets the image's bytes back.
If the process dies (OOM, kill -9), a new one draws the plot in hand.
"""

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from service.core.errors import NotReady, TooManyPlots
from service.core.processes import lower_priority, name_process
from service.core.schemas import History

log = logging.getLogger("sgd_service")


def _start(nice: int, sched_idle: bool, server: int) -> None:
    name_process("sgd-plotter")
    # the training worker's priority: /predict's event loop wins the CPU from it at once
    lower_priority(nice, sched_idle)
    threading.Thread(target=_exit_with, args=(server,), daemon=True).start()


def _exit_with(server: int) -> None:
    """Exit once the server is gone. A pool's process holds both ends of its queue's pipe, so
    it never reads an end of file; without this, a server killed with -9 would leave it behind."""
    while os.getppid() == server:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)


def _draw(history: History, image_format: str, log_scale: bool) -> bytes:
    from service.core.render import render_history  # imported in the plotting process only

    return render_history(history, image_format, log_scale)


PARENT_POLL_SECONDS = 0.5
# Drawings that may wait for the plotting process or run (30-100 ms each): a caller past them
# would wait seconds, and abandoned requests used to keep it drawing for nobody.
MAX_WAITING = 4


class Plotter:
    """One plotting process, started on the first plot; a new one if it dies."""

    def __init__(self, nice: int, sched_idle: bool) -> None:
        self._priority = (nice, sched_idle)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._waiting = 0  # drawings submitted and not done

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start,
                    initargs=(*self._priority, os.getpid()),
                )
            return self._pool

    async def draw(
        self, history: History, image_format: str, log_scale: bool, gone: Awaitable[None]
    ) -> bytes | None:
        """The image, or None if the caller left first (`gone` is done): a drawing not begun
        yet is then dropped. At most MAX_WAITING drawings wait or run; another is a 503. If
        the process died (OOM, kill -9) a new one draws it; only if that one dies too is the
        answer a 503."""
        leaving = asyncio.ensure_future(gone)
        try:
            return await self._draw(history, image_format, log_scale, leaving)
        finally:
            leaving.cancel()

    async def _draw(
        self, history: History, image_format: str, log_scale: bool, leaving: asyncio.Future[None]
    ) -> bytes | None:
        for attempt in (1, 2):
            pool = self._executor()
            try:
                future = self._submit(pool, history, image_format, log_scale)
                drawing = asyncio.wrap_future(future)
                await asyncio.wait((drawing, leaving), return_when=asyncio.FIRST_COMPLETED)
                if not drawing.done():  # the caller left: not begun, it is never drawn
                    drawing.cancel()
                    return None
                return drawing.result()
            except BrokenProcessPool as e:
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt == 2:
                    error = NotReady("the process that draws plots stopped twice drawing this one")
                    error.headers["Retry-After"] = "1"
                    raise error from e
                log.warning("the plotting process died; starting another")
        raise AssertionError("unreachable")

    def _submit(
        self, pool: ProcessPoolExecutor, history: History, image_format: str, log_scale: bool
    ) -> "Future[bytes]":
        with self._lock:
            if self._waiting >= MAX_WAITING:
                error = TooManyPlots(
                    f"{MAX_WAITING} plots are being drawn or wait for the plotting process; "
                    "retry in a second"
                )
                error.headers["Retry-After"] = "1"
                raise error
            self._waiting += 1
        future = pool.submit(_draw, history, image_format, log_scale)
        future.add_done_callback(self._done)  # run, failed or cancelled
        return future

    def _done(self, future: "Future[bytes]") -> None:
        with self._lock:
            self._waiting -= 1

    def pid(self) -> int:
        """The plotting process's pid (starting it if need be); blocks, for tests and tools."""
        return self._executor().submit(os.getpid).result(timeout=60)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
