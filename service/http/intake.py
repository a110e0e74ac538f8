"""The fit intake: a process of its own parses and checks POST /fit bodies.

A 1,000,000-sample body is ~20 MB of JSON; parsing and validating it takes ~60 ms of CPU
while holding the GIL, and a thread would not help: every /predict in flight would wait for
the GIL. So the server (service.bodies) keeps the body as the chunks it arrived in and sends
them to a helper process over a socket, and gets back the checked fit: the options, and x and
y as float64 bytes. The server never turns the samples into Python objects, nor joins the
chunks; it only passes bytes on.

The answers are those FastAPI gave when it parsed on the event loop: the fast parser (orjson)
is tried first, and whenever it or the validation fails the standard library parses the body
again (`loads`), so that a bad body gets the standard library's error texts and its reading of
NaN and big integers. Where FastAPI read more than the README promises, or called a body that
it could not read "not UTF-8", `loads` says what is wrong: a body that is not UTF-8 (UTF-16,
UTF-32, a byte order mark), an integer longer than the standard library reads (4,300 digits),
lists nested deeper than it goes.

The helper takes one body at a time (an asyncio lock queues the others), runs at the training
worker's priority (SGD_WORKER_NICE, SCHED_IDLE), below the server's, and is started on the
first fit.
If it dies (OOM, kill -9), a new one reads the body in hand again: the fit is not lost.
"""

import asyncio
import hashlib
import json
import logging
import math
import pickle
import signal
import socket
import subprocess
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from service.core.errors import MAX_LISTED_ERRORS, InvalidInput, NotReady, capped
from service.core.processes import lower_priority, name_process
from service.core.schemas import Finite, FitRequest
from service.core.settings import Settings
from service.http.turns import give_way
from service.runner.worker import Samples

_FINITE: TypeAdapter[float] = TypeAdapter(Finite)
log = logging.getLogger("sgd_service")

_END = 0  # the frame length that ends a body
PIECE = 1024 * 1024  # the samples come back in pieces of this many bytes


@dataclass(frozen=True)
class Accepted:
    """A fit body that passed every check: its options, and x and y as float64 bytes."""

    options: dict[str, Any]
    given: frozenset[str]  # the fields the caller sent
    n: int
    x: Samples  # float64, native byte order, in pieces
    y: Samples
    digest: str | None  # of the validated body, for Idempotency-Key; asked for per request

    def request(self) -> FitRequest:
        """The FitRequest the route receives: the options, with x and y only as bytes."""
        req = FitRequest.model_construct(set(self.given), x=[], y=[], **self.options)
        req._accepted = self
        return req


@dataclass(frozen=True)
class Refused:
    """Why a body was refused, in the form the server raises it."""

    # "json": (msg, pos); "unreadable": (); "invalid": (errors,); "input": (detail, issues)
    kind: str
    args: tuple[Any, ...]

    def error(self) -> Exception:
        """What FastAPI or the route raised for this body when it parsed it in the server."""
        # imported here: the intake process never needs the web framework (~0.1 s to import)
        from fastapi.exceptions import RequestValidationError
        from starlette.exceptions import HTTPException

        if self.kind == "json":
            msg, pos = self.args
            return RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": msg},
                    }
                ]
            )
        if self.kind == "unreadable":
            return HTTPException(status_code=400, detail="There was an error parsing the body")
        if self.kind == "invalid":
            return RequestValidationError(self.args[0])
        detail, issues = self.args
        return InvalidInput(detail, issues)


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


class NotRead(Exception):
    """A body that `loads` refuses; `refused` is the answer, in the form the server raises it."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.kind)
        self.refused = refused


NOT_UTF8 = "the body must be JSON encoded as UTF-8, without a byte order mark"
TOO_DEEP = "the body nests arrays or objects too deeply to read; no field takes nested lists"


def loads(body: bytes | bytearray) -> Any:
    """A JSON body as the service reads every one: UTF-8 without a byte order mark, parsed by
    the standard library (its error texts, its reading of NaN); raises NotRead if refused.

    json.loads alone takes UTF-16, UTF-32 and a byte order mark, which the README does not
    promise; at an integer too long to read or lists nested too deeply, it raises no JSON error.
    """
    # by the first 4 bytes, as json.loads guesses: JSON begins with an ASCII character
    encoding = json.detect_encoding(body[:4])
    if encoding != "utf-8":
        if encoding in ("utf-8-sig", "utf-16", "utf-32"):
            why = f"it starts with a {encoding.removesuffix('-sig').upper()} byte order mark"
        else:
            why = f"it looks like {encoding.upper()}, not UTF-8"
        raise NotRead(Refused("input", (NOT_UTF8, [_body_issue(why)])))
    try:
        text = body.decode()
    except UnicodeDecodeError as e:
        why = f"byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8"
        raise NotRead(Refused("input", (NOT_UTF8, [_body_issue(why)]))) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NotRead(Refused("json", (e.msg, e.pos))) from None
    except ValueError:  # the only other ValueError json.loads raises: an integer too long
        raise NotRead(_long_integers(text)) from None
    except RecursionError:
        raise NotRead(Refused("input", (TOO_DEEP, [_body_issue("nested too deeply")]))) from None
    except Exception:
        raise NotRead(Refused("unreadable", ())) from None


def _body_issue(message: str) -> dict[str, str]:
    return {"field": "body", "message": message, "code": "json_invalid"}


class _TooLong:
    """What `_long_integers` reads an integer too long for int() as."""


_TOO_LONG = _TooLong()


def _long_integers(text: str) -> Refused:
    """The refusal of a body holding integers longer than int() reads (4,300 digits unless
    sys.set_int_max_str_digits says otherwise): each named where it is, as a validation error."""
    limit = sys.get_int_max_str_digits()

    def integer(digits: str) -> int | _TooLong:
        return _TOO_LONG if len(digits) - digits.startswith("-") > limit else int(digits)

    try:
        doc = json.loads(text, parse_int=integer)
    except Exception:
        return Refused("unreadable", ())
    found = [loc for loc, value in _leaves(doc) if value is _TOO_LONG]
    if not found:
        return Refused("unreadable", ())
    message = (
        f"an integer of more than {limit} digits: too long to read, and larger than any field takes"
    )
    errors = [
        {"type": "int_parsing_size", "loc": ("body", *loc), "msg": message}
        for loc in found[:MAX_LISTED_ERRORS]
    ]
    return Refused("invalid", (capped(errors, len(found)),))


def _leaves(doc: Any) -> Iterator[tuple[tuple[int | str, ...], Any]]:
    """Every value of a parsed JSON document that is no list or object, with where it is, in
    document order (a loop, not recursion: the document may nest as deep as json.loads goes)."""
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), doc)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*loc, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*loc, i), value[i]) for i in reversed(range(len(value))))
        else:
            yield loc, value


def accept(body: bytes | bytearray, settings: Settings, digest: bool) -> Reply:
    """Parse and check one fit body, as FastAPI and the route did in the server."""
    try:
        doc = orjson.loads(body)
        flood = _flood(doc)
        if flood is not None:
            return Refused("invalid", (flood,))
        req = FitRequest.model_validate(doc, from_attributes=True)
    except (orjson.JSONDecodeError, ValidationError):
        try:
            parsed = loads(body)
        except NotRead as e:
            return e.refused
        flood = _flood(parsed)
        if flood is not None:
            return Refused("invalid", (flood,))
        try:
            # as FastAPI validates a body: from_attributes, which names the error of a
            # body that is not an object
            req = FitRequest.model_validate(parsed, from_attributes=True)
        except ValidationError as e:
            errors = [
                {"type": err["type"], "loc": ("body", *err["loc"]), "msg": err["msg"]}
                for err in e.errors(include_url=False)
            ]
            return Refused("invalid", (capped(errors),))
    return checked(req, settings, digest)


def checked(req: FitRequest, settings: Settings, digest: bool) -> Reply:
    """A valid FitRequest against the settings' limits and its own combinations."""
    try:
        req.check_limits(settings)
        req.check_combinations()
    except InvalidInput as e:
        return Refused("input", (e.detail, e.extra["errors"]))
    return Accepted(
        options=req.model_dump(exclude={"x", "y"}),
        given=frozenset(req.model_fields_set),
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
            reply = Accepted(reply.options, reply.given, reply.n, x, y, reply.digest)
        assert isinstance(reply, Accepted | Refused)
        return reply

    def _start(self) -> socket.socket:
        """`python -m service.intake FD`, its end of a socket pair passed as FD, the settings
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
                header = Accepted(reply.options, reply.given, reply.n, (), (), reply.digest)
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
    # run as service.intake, not __main__: what it pickles must name this module's classes
    from service.http import intake

    intake.main(int(sys.argv[1]))
