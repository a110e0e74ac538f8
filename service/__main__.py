"""`python -m service` / `sgd-service serve`: run the service under uvicorn with its settings."""

import argparse
import asyncio
import logging
from collections.abc import Sequence
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.main import create_app
from service.settings import Settings

log = logging.getLogger("sgd_service")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: refuse fits, cancel jobs, fail /readyz, then stop serving."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal stops at once
            return
        self._draining = True
        # Signal handlers must not take locks the interrupted code may hold: hand over to the loop.
        self._loop.call_soon_threadsafe(self._drain, sig, frame)

    def _drain(self, sig: int, frame: FrameType | None) -> None:
        runner = getattr(self._app.state, "runner", None)
        if runner is not None:
            runner.drain()
        log.info("draining: /readyz is 503, stopping in %.1fs", self._drain_seconds)
        assert self._loop is not None
        self._loop.call_later(self._drain_seconds, super().handle_exit, sig, frame)


def serve(settings: Settings) -> None:
    """Run one uvicorn worker: the model lives in this process."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    DrainingServer(config, app, settings.drain_seconds).run()


def main(argv: Sequence[str] | None = None) -> None:
    """The `sgd-service` command."""
    parser = argparse.ArgumentParser(prog="sgd-service", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the service (the default); configured by SGD_* env")
    parser.parse_args(argv)
    serve(Settings())


if __name__ == "__main__":
    main()
