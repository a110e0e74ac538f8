"""Bounded connections: uvicorn's HTTP protocol with a cap on connections and read deadlines.

uvicorn keeps a connection open as long as its peer does: a socket that never sends a byte,
headers sent one byte a minute, or a body that never ends each held a file descriptor forever,
and 300 of them made /predict answer nothing under `ulimit -n 256`. uvicorn has a keep-alive
timeout (between requests) but no deadline for a request's headers or body, and its
`limit_concurrency` answers in plain text only once a request has come in. This protocol adds
what is missing, per connection, in the event loop's own timers:

- past SGD_MAX_CONNECTIONS open connections, a new one gets a 503 problem+json and is closed;
- a request's headers must arrive within SGD_HEADER_TIMEOUT of its first byte (or of the
  connection, for its first request), its body within SGD_BODY_TIMEOUT of its headers: else
  a 408 problem+json (or a plain close, if nothing came or the answer has begun);
- uvicorn's own 400 for a request it cannot parse is problem+json too.

Every answer written here carries the security headers the app's answers carry.
"""

import asyncio
import json
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.core.errors import MalformedRequest, RequestTimeout, ServiceError, TooManyConnections
from service.core.settings import Settings
from service.http.middleware import PAGE_CSP, SECURITY_HEADERS
from service.http.problems import PROBLEM_JSON

log = logging.getLogger("sgd_service")
# File descriptors kept for what is not a client connection: the listening socket, logs, pipes
# to the training worker, the intake and the plotter, Redis connections.
SPARE_DESCRIPTORS = 64
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def raw_answer(error: ServiceError) -> bytes:
    """The error as a whole HTTP/1.1 response, problem+json, that closes its connection."""
    body = json.dumps(error.problem()).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
        *SECURITY_HEADERS,
        (b"content-security-policy", PAGE_CSP.encode()),
    ]
    head = b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS[error.status])
    return head + b"".join(b"%s: %s\r\n" % pair for pair in headers) + b"\r\n" + body


class GuardedHttp(HttpToolsProtocol):
    """HttpToolsProtocol with a connection cap and deadlines for headers and bodies; the
    subclass that `protocol(settings)` makes carries the limits."""

    max_connections: int
    header_timeout: float
    body_timeout: float
    refusal: bytes
    header_late: bytes
    body_late: bytes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False  # a request has begun and its headers are not all in

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(self.refusal)
            transport.close()
            return
        self._arm(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None or self.transport.is_closing():
            return
        if self._in_headers:
            self._arm(self.header_timeout, self._headers_late)
        elif self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete:
            self._arm(self.body_timeout, self._body_late)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        error = MalformedRequest(f"{msg.rstrip('.')}: send a well-formed HTTP/1.1 request")
        self.transport.write(raw_answer(error))
        self.transport.close()

    def _arm(self, seconds: float, late: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            if self._in_headers:  # a request has begun: say why it ends
                self.transport.write(self.header_late)
            self.transport.close()

    def _body_late(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        if not cycle.response_started:
            self.transport.write(self.body_late)
        cycle.disconnected = True  # the app reads a disconnect, and what it sends is dropped
        cycle.message_event.set()
        self.transport.close()


def connection_cap(wanted: int) -> int:
    """The most connections this process can hold: `wanted`, or fewer if its file descriptor
    limit (raised to the hard limit first) would run out before, since a server out of
    descriptors cannot even accept a connection to refuse it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or wanted <= soft - SPARE_DESCRIPTORS:
        return wanted
    cap = max(1, soft - SPARE_DESCRIPTORS)
    log.warning(
        "SGD_MAX_CONNECTIONS=%d is over what %d file descriptors (ulimit -n) can hold: %d",
        wanted,
        soft,
        cap,
    )
    return cap


def protocol(settings: Settings) -> type[GuardedHttp]:
    """The protocol class for uvicorn.Config(http=...), with these settings' limits."""
    cap = connection_cap(settings.max_connections)
    limits = {
        "max_connections": cap,
        "header_timeout": settings.header_timeout,
        "body_timeout": settings.body_timeout,
        "refusal": raw_answer(
            TooManyConnections(
                f"the service holds as many connections as it takes ({cap}, "
                "SGD_MAX_CONNECTIONS); "
                "retry in a second, or reuse a connection (keep-alive)"
            )
        ),
        "header_late": raw_answer(
            RequestTimeout(
                f"the request's headers took over SGD_HEADER_TIMEOUT={settings.header_timeout:g}s"
                " to arrive; send them at once"
            )
        ),
        "body_late": raw_answer(
            RequestTimeout(
                f"the request's body took over SGD_BODY_TIMEOUT={settings.body_timeout:g}s to "
                "arrive; send it faster, or in smaller requests"
            )
        ),
    }
    return type("GuardedHttp", (GuardedHttp,), limits)
