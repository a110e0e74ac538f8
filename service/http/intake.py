"""The fit intake: a process of its own parses and checks POST /fit bodies.

A 1,000,000-sample body is ~20 MB of JSON; parsing and validating it takes ~60 ms of CPU
while holding the GIL, and a thread would not help: every /predict in flight would wait for
the GIL. So the server (service.http.bodies) keeps the body as the chunks it arrived in and sends
them to a helper process over a socket, and gets back the checked fit: the options, and x and
y as float64 bytes. The server never turns the samples into Python objects, nor joins the
chunks; it only passes bytes on.

The answers are those FastAPI gave when it parsed on the event loop: the fast parser (orjson)
is tried first, and whenever it or the validation fails the standard library parses the body
again (service.http.reading.loads), so that a bad body gets the standard library's error texts
and its reading of NaN and big integers. A refusal comes back as one of service.http.reading's
variants, which the server raises.

The helper takes one body at a time (an asyncio lock queues the others), runs at the training
worker's priority (SGD_WORKER_NICE, SCHED_IDLE), below the server's, and is started on the
first fit.
If it dies (OOM, kill -9), a new one reads the body in hand again: the fit is not lost.
"""

import asyncio
import hashlib
import logging
import math
import pickle
import signal
import socket
import subprocess
import sys
from array import array
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from service.core.errors import MAX_LISTED_ERRORS, InvalidInput, NotReady, capped
from service.core.numbers import Finite
from service.core.processes import lower_priority, name_process
from service.core.schemas import FitRequest, InitFrom, Publish
from service.core.settings import Settings
from service.http.reading import NotAccepted, NotRead, NotValid, Refused, loads
from service.http.turns import give_way
from service.runner.worker import Samples

_FINITE: TypeAdapter[float] = TypeAdapter(Finite)
log = logging.getLogger("sgd_service")

_END = 0  # the frame length that ends a body
PIECE = 1024 * 1024  # the samples come back in pieces of this many bytes


@dataclass(frozen=True)
class FitOptions:
    """A checked fit's options: FitRequest's fields but its samples."""

    epochs: int
    learning_rate: float
    init_w: float
    batch_size: int | None
    fit_intercept: bool
    seed: int | None
    validation_fraction: float
    tol: float | None
    n_iter_no_change: int
    publish: Publish
    init_from: InitFrom | None

    @classmethod
    def of(cls, req: FitRequest) -> "FitOptions":
        return cls(
            epochs=req.epochs,
            learning_rate=req.learning_rate,
            init_w=req.init_w,
            batch_size=req.batch_size,
            fit_intercept=req.fit_intercept,
            seed=req.seed,
            validation_fraction=req.validation_fraction,
            tol=req.tol,
            n_iter_no_change=req.n_iter_no_change,
            publish=req.publish,
            init_from=req.init_from,
        )


@dataclass(frozen=True)
class Accepted:
    """A fit body that passed every check: its options, and x and y as float64 bytes."""

    options: FitOptions
    n: int
    x: Samples  # float64, native byte order, in pieces
    y: Samples
    digest: str | None  # of the validated body, for Idempotency-Key; asked for per request


Reply = Accepted | Refused


def _flood(doc: Any) -> list[dict[str, Any]] | None:
    """The listed errors of a body whose x and y hold more than MAX_LISTED_ERRORS values that
    are no finite numbers (a body of nulls), found without validating the rest: pydantic would
    build an error for every one of them. None for any other body."""
    if not isinstance(doc, dict):
        return None
    bad: list[tuple[str, int, Any]] = []
    total = 0
    for name in ("x", "y"):
        values = doc.get(name)
        if not isinstance(values, list) or len(values) <= MAX_LISTED_ERRORS:
            continue
        try:
            array("d", values)  # at C speed: a list of numbers (true is one) passes
            continue
        except TypeError:
            pass
        for i, v in enumerate(values):
            if not _number(v):
                total += 1
                if len(bad) < MAX_LISTED_ERRORS:
                    bad.append((name, i, v))
    if total <= MAX_LISTED_ERRORS:
        return None
    errors = []
    for name, i, v in bad:
        try:
            _FINITE.validate_python(v)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            errors.append({"type": err["type"], "loc": ("body", name, i), "msg": err["msg"]})
    return capped(errors, total)


def _number(v: Any) -> bool:
    """A finite JSON number, as FitRequest takes it (an int of any size is left to pydantic)."""
    if type(v) is float:
        return math.isfinite(v)
    return type(v) is int


def accept(body: bytes | bytearray, settings: Settings, digest: bool) -> Reply:
    """Parse and check one fit body, as FastAPI and the route did in the server."""
    try:
        doc = orjson.loads(body)
        flood = _flood(doc)
        if flood is not None:
            return NotValid(flood)
        req = FitRequest.model_validate(doc, from_attributes=True)
    except (orjson.JSONDecodeError, ValidationError):
        try:
            parsed = loads(body)
        except NotRead as e:
            return e.refused
        flood = _flood(parsed)
        if flood is not None:
            return NotValid(flood)
        try:
            # as FastAPI validates a body: from_attributes, which names the error of a
            # body that is not an object
            req = FitRequest.model_validate(parsed, from_attributes=True)
        except ValidationError as e:
            errors = [
                {"type": err["type"], "loc": ("body", *err["loc"]), "msg": err["msg"]}
                for err in e.errors(include_url=False)
            ]
            return NotValid(capped(errors))
    return _checked(req, settings, digest)


def _checked(req: FitRequest, settings: Settings, digest: bool) -> Reply:
    """A valid FitRequest against the settings' limits and its own combinations."""
    try:
        req.check_limits(settings)
        req.check_combinations()
    except InvalidInput as e:
        return NotAccepted(e.detail, e.extra["errors"])
    return Accepted(
        options=FitOptions.of(req),
        n=len(req.x),
        x=(array("d", req.x).tobytes(),),
        y=(array("d", req.y).tobytes(),),
        digest=hashlib.sha256(req.model_dump_json().encode()).hexdigest() if digest else None,
    )


def lost() -> NotReady:
    """The answer to a fit whose body two helpers in a row died reading: retry it later."""
    error = NotReady("the process that reads fit bodies stopped twice while reading this one")
    error.headers["Retry-After"] = "1"
    return error


class Intake:
    """The server's side: one helper process, one body at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = asyncio.Lock()
        self._process: Any = None
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    async def accept(self, chunks: list[bytes], digest: bool) -> Reply:
        """Send a body (as it arrived, in chunks) to the helper; its verdict.

        The server keeps the chunks until the reply is in, so a helper that died (idle, or
        while it read this body) costs nothing: a new one reads the body again. Only if that
        one dies too (the body itself kills it) is the answer a 503.
        """
        async with self._lock:
            for attempt in (1, 2):
                try:
                    return await self._exchange(chunks, digest)
                except OSError as e:
                    self.close()
                    if attempt == 2:
                        raise lost() from e
                    log.warning("the fit intake process died (%s); starting another", e)
                except BaseException:  # cancelled mid-exchange: the channel is out of step
                    self.close()
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, chunks: list[bytes], digest: bool) -> Reply:
        loop = asyncio.get_running_loop()
        sock = self._sock
        if sock is None:
            sock = await asyncio.to_thread(self._start)
        await loop.sock_sendall(sock, b"D" if digest else b"-")
        for chunk in chunks:
            await give_way()
            await loop.sock_sendall(sock, len(chunk).to_bytes(4, "little"))
            await loop.sock_sendall(sock, chunk)
        await loop.sock_sendall(sock, _END.to_bytes(4, "little"))
        return await self._reply(loop, sock)

    async def _reply(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Reply:
        size = int.from_bytes(await _recv(loop, sock, 8), "little")
        reply = pickle.loads(await _recv(loop, sock, size))  # noqa: S301 - our own child's
        if isinstance(reply, Accepted):  # the samples follow the header, as raw bytes
            x = await _pieces(loop, sock, 8 * reply.n)  # kept as received: no copy here
            y = await _pieces(loop, sock, 8 * reply.n)
            reply = Accepted(reply.options, reply.n, x, y, reply.digest)
        assert isinstance(reply, Accepted | Refused)
        return reply

    def _start(self) -> socket.socket:
        """`python -m service.http.intake FD`, its end of a socket pair passed as FD, the settings
        its first message. A plain subprocess, not multiprocessing's: it imports only this
        module, and `ps` tells it from the training worker."""
        ours, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "service.http.intake", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        settings = pickle.dumps(self._settings)
        ours.sendall(len(settings).to_bytes(8, "little") + settings)
        ours.setblocking(False)
        self._process, self._sock = process, ours
        log.info("fit intake process %d started", process.pid)
        return ours

    def close(self) -> None:
        """Stop the helper (a new one starts with the next fit)."""
        sock, process = self._sock, self._process
        self._sock = self._process = None
        if sock is not None:
            sock.close()
        if process is not None:
            process.kill()
            process.wait(5)


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        await give_way()
        k = await loop.sock_recv_into(sock, view[got:])
        if not k:
            raise ConnectionResetError("the intake process closed its socket")
        got += k
    return buf


async def _pieces(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> Samples:
    """n bytes in pieces of PIECE: bytearray(n) zeroes all of it with the GIL held (~4 ms for
    8 MB, which /predict would wait for); a piece takes ~0.3 ms, between other requests."""
    return tuple([await _recv(loop, sock, min(PIECE, n - i)) for i in range(0, n, PIECE)])


# -- the helper process ---------------------------------------------------------------------


def main(fd: int) -> None:
    """The helper's loop: a body in, its reply out, until the server closes the socket."""
    name_process("sgd-intake")
    # the server decides when the helper stops; a Ctrl-C to the process group is the server's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=fd) as sock:
        size = int.from_bytes(_exactly(sock, 8), "little")
        settings = pickle.loads(_exactly(sock, size))  # noqa: S301 - the server's own
        assert isinstance(settings, Settings)
        # the training worker's priority: /predict's event loop wins the CPU from it at once
        lower_priority(settings.worker_nice, settings.worker_sched_idle)
        while True:
            flag = sock.recv(1)
            if not flag:
                return  # the server closed the socket
            body = _body(sock)
            reply = accept(body, settings, digest=flag == b"D")
            del body
            if isinstance(reply, Accepted):
                header = Accepted(reply.options, reply.n, (), (), reply.digest)
                head = pickle.dumps(header)
                sock.sendall(len(head).to_bytes(8, "little") + head)
                for piece in (*reply.x, *reply.y):
                    sock.sendall(piece)
            else:
                head = pickle.dumps(reply)
                sock.sendall(len(head).to_bytes(8, "little") + head)


def _body(sock: socket.socket) -> bytearray:
    """The frames of one body, joined."""
    body = bytearray()
    while True:
        size = int.from_bytes(_exactly(sock, 4), "little")
        if size == _END:
            return body
        body += _exactly(sock, size)


def _exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise SystemExit(0)  # the server went away
        got += k
    return buf


if __name__ == "__main__":
    # run as service.http.intake, not __main__: what it pickles must name this module's classes
    from service.http import intake

    intake.main(int(sys.argv[1]))
