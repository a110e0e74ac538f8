"""Pure ASGI middleware: the Host check, security headers, and the request body limit."""

import ipaddress
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import HostNotAllowed, PayloadTooLarge
from service.http.problems import problem_response


class AllowedHosts:
    """Answer 400 problem+json to a request without exactly one well-formed Host header naming
    an allowed host.

    Starlette's TrustedHostMiddleware does this check but answers in plain text, cuts the host
    at the first colon (so "[::1]:8000" never matches "::1") and reads the first of two Host
    headers. Here a Host is exactly `name[:port]` or `[IPv6]:port` (RFC 9112 answers two Host
    headers, or one that is not, with 400) and the name is matched in full. It reads the
    headers once: /predict's fast path behind it keeps its pace.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        names = set(hosts)
        self.any = "*" in names
        self.exact = frozenset(n.encode() for n in names if not n.startswith("*"))
        self.suffixes = tuple(n[1:].encode() for n in names if n.startswith("*.") and len(n) > 2)
        self.allowed = ", ".join(sorted(names))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts = [value for name, value in scope["headers"] if name == b"host"]
        name = host_name(hosts[0].lower()) if len(hosts) == 1 else None
        if name is not None and (
            self.any or name in self.exact or (self.suffixes and name.endswith(self.suffixes))
        ):
            await self.app(scope, receive, send)
            return
        await problem_response(self._refusal(hosts, name))(scope, receive, send)

    def _refusal(self, hosts: list[bytes], name: bytes | None) -> HostNotAllowed:
        if len(hosts) != 1:
            return HostNotAllowed(
                f"a request carries exactly one Host header, not {len(hosts)}: send one"
            )
        shown = hosts[0].decode("latin-1")[:100]
        if name is None:
            return HostNotAllowed(
                f"Host {shown!r} is not a host name or address with an optional port "
                "(name, name:port, or an IPv6 address in brackets: [::1]:8000)"
            )
        return HostNotAllowed(
            f"Host {shown!r} is not one this service answers to ({self.allowed}); "
            "add the name it is reached by to SGD_ALLOWED_HOSTS"
        )


# name[:port] (a DNS name or an IPv4 address: letters, digits, '.', '-', '_') or [IPv6][:port]
_HOST = re.compile(rb"(?:\[([0-9a-f:.]+)\]|([a-z0-9._-]+))(?::[0-9]{1,5})?")


def host_name(host: bytes) -> bytes | None:
    """b"[::1]:8000" -> b"::1", b"localhost:8000" -> b"localhost", b"example.com" as it is;
    None for what is not a host with an optional port (b"[::1]evil.com", b"a b", b"::1")."""
    match = _HOST.fullmatch(host)
    if match is None:
        return None
    if match[1] is None:
        return match[2]
    try:
        ipaddress.IPv6Address(match[1].decode())
    except ValueError:
        return None
    return match[1]


# On every answer the FastAPI app gives (/predict's fast path is in front of this layer). The
# page loads only its own script and style sheet; the API docs (FastAPI's Swagger UI and ReDoc
# pages) start their bundles with an inline script and style their widgets inline.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Add CSP, X-Frame-Options, X-Content-Type-Options and Referrer-Policy to every answer:
    the outermost layer but the request observer's, so that the Host check's 400, both 413s
    and /predict's fast path carry them too (service.http.connections writes them into the answers
    uvicorn would give before the app)."""

    def __init__(self, app: ASGIApp, docs_paths: Iterable[str]) -> None:
        self.app = app
        self.docs_paths = frozenset(docs_paths)
        self.page = [*SECURITY_HEADERS, (b"content-security-policy", PAGE_CSP.encode())]
        self.docs = [*SECURITY_HEADERS, (b"content-security-policy", DOCS_CSP.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = self.docs if scope["path"] in self.docs_paths else self.page

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# The most bytes a number takes in a JSON list: the longest float Python or JavaScript writes
# (-2.2250738585072014e-308) with its comma, and a little room for spaces.
BYTES_PER_NUMBER = 32
ROOM = 1024 * 1024  # for the rest of a body: its keys, options, whitespace, nesting


def _takes_a_batch(method: str, path: str) -> bool:
    """POST /predict and Open Inference Protocol infer: lists of at most SGD_MAX_PREDICT_BATCH."""
    return method == "POST" and (
        path == "/predict" or (path.startswith("/v2/models/") and path.endswith("/infer"))
    )


class BodyLimit:
    """Answer 413 problem+json for a body over its route's limit, with or without
    Content-Length: SGD_MAX_BODY_BYTES, or for a batch of predictions room for
    max_predict_batch numbers (a 64 MiB /predict body is 50 times more than it can take)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_predict_batch: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_predict_batch = max_predict_batch
        self.batch_bytes = max_bytes
        if max_predict_batch is not None:
            self.batch_bytes = min(max_bytes, ROOM + BYTES_PER_NUMBER * max_predict_batch)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        batch = _takes_a_batch(scope["method"], scope["path"])
        max_bytes = self.batch_bytes if batch else self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                await self._reject(scope, receive, send, max_bytes)
                return
        seen = 0
        started = rejected = False

        async def limited_receive() -> Message:
            # Past the limit the app sees a disconnect; whatever it answers then is dropped.
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    if not started:
                        await self._reject(scope, receive, send, max_bytes)
                    rejected = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        if max_bytes == self.max_bytes:
            detail = (
                f"the body is over SGD_MAX_BODY_BYTES={max_bytes} bytes; send less data per request"
            )
        else:
            detail = (
                f"the body is over {max_bytes} bytes, room for the SGD_MAX_PREDICT_BATCH="
                f"{self.max_predict_batch} numbers this route takes; send fewer per request"
            )
        # The rest of the body is never read: the connection cannot carry another request.
        answer = problem_response(PayloadTooLarge(detail), {"connection": "close"})
        await answer(scope, receive, send)
