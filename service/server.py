"""The server's lifecycle: uvicorn with our protocol, a drain on SIGTERM, a watchdog."""

import asyncio
import gc
import logging
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn

from service.core.logs import configure_logging
from service.core.settings import Settings, unknown_variables
from service.http.app import create_app
from service.http.connections import protocol
from service.runner.base import Runner

log = logging.getLogger("sgd_service")
WATCHDOG_SECONDS = 0.5


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: refuse fits, cancel jobs, fail /readyz, then stop serving.

    The job runner is the one the app's lifespan yielded in its state: uvicorn keeps that dict
    (self.lifespan.state, which Starlette fills at start-up) and hands a copy to every request.
    """

    def __init__(self, config: uvicorn.Config, drain_seconds: float) -> None:
        super().__init__(config)
        self._drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._watchdog: asyncio.Task[None] | None = None
        self.exit_code = 0

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What is alive now (modules, the app) lives as long as the process: freezing it keeps a
        # full collection to what requests and jobs made since. Unfrozen, one scanned ~70,000
        # objects and held the GIL for 30-120 ms on the machine in the README's Performance.
        gc.freeze()
        self._watchdog = asyncio.create_task(self._watch_runner())  # the loop holds tasks weakly

    async def _watch_runner(self) -> None:
        """A replica that answers but can never train again exits non-zero, so that a supervisor
        (Docker's restart policy, Kubernetes, systemd) replaces it."""
        while not self._draining:
            runner = self._runner()
            reason = runner.broken if runner is not None else None
            if reason is not None:
                log.critical("cannot train any more (%s): draining, then exiting with 1", reason)
                self.exit_code = 1
                self._draining = True
                self._drain()
                return
            await asyncio.sleep(WATCHDOG_SECONDS)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal stops at once
            return
        self._draining = True
        # Signal handlers must not take locks the interrupted code may hold: hand over to the loop.
        self._loop.call_soon_threadsafe(self._drain)

    def _runner(self) -> Runner | None:
        """The lifespan's job runner; None before start-up has run (or if it failed)."""
        lifespan = getattr(self, "lifespan", None)  # uvicorn makes it as serving begins
        state: dict[str, Any] = getattr(lifespan, "state", {})
        runner: Runner | None = state.get("runner")
        return runner

    def _drain(self) -> None:
        runner = self._runner()
        if runner is not None:
            runner.drain()
        log.info("draining: /readyz is 503, stopping in %.1fs", self._drain_seconds)
        assert self._loop is not None
        self._loop.call_later(self._drain_seconds, self._stop)

    def _stop(self) -> None:
        # Not super().handle_exit: uvicorn would re-raise the signal it recorded after serving,
        # and a clean, drained stop would end as "killed by SIGTERM" (143) instead of 0.
        self.should_exit = True


def serve(settings: Settings) -> None:
    """Run one uvicorn worker: the model lives in this process."""
    configure_logging(settings.log_level)
    for line in unknown_variables():
        log.warning(line)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep configure_logging's JSON lines
        access_log=False,  # RequestObserver writes one structured line per request
        timeout_graceful_shutdown=10,
        http=protocol(settings),  # a connection cap and read deadlines (service.connections)
        lifespan="on",  # the app's state, the runner that DrainingServer drains included
    )
    server = DrainingServer(config, settings.drain_seconds)
    server.run()
    if server.exit_code:
        sys.exit(server.exit_code)
