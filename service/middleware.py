"""Pure ASGI middleware: the Host check, security headers, and the request body limit."""

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import HostNotAllowed, PayloadTooLarge
from service.problems import problem_response


class AllowedHosts:
    """Answer 400 problem+json to a request whose Host header names no allowed host.

    Starlette's TrustedHostMiddleware does this check but answers in plain text, and it cuts
    the host at the first colon, so "[::1]:8000" never matches "::1". Here the port is cut at
    the last colon after an IPv6 literal's closing bracket. It reads one header: /predict's
    fast path behind it keeps its pace.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        names = set(hosts)
        self.any = "*" in names
        self.exact = frozenset(n.encode() for n in names if not n.startswith("*"))
        self.suffixes = tuple(n[1:].encode() for n in names if n.startswith("*.") and len(n) > 2)
        self.allowed = ", ".join(sorted(names))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope["headers"] if k == b"host"), b"")
        name = _host_name(host.lower())
        if name in self.exact or (self.suffixes and name.endswith(self.suffixes)):
            await self.app(scope, receive, send)
            return
        shown = host.decode("latin-1")[:100]
        error = HostNotAllowed(
            f"Host {shown!r} is not one this service answers to ({self.allowed}); "
            "add the name it is reached by to SGD_ALLOWED_HOSTS"
        )
        await problem_response(error)(scope, receive, send)


def _host_name(host: bytes) -> bytes:
    """b"[::1]:8000" -> b"::1", b"localhost:8000" -> b"localhost", b"example.com" as it is."""
    if host.startswith(b"["):
        return host[1 : host.find(b"]")] if b"]" in host else b""
    name, colon, port = host.rpartition(b":")
    return name if colon and port.isdigit() else host


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
    """Add CSP, X-Frame-Options, X-Content-Type-Options and Referrer-Policy to every answer."""

    def __init__(self, app: ASGIApp, docs_paths: Iterable[str]) -> None:
        self.app = app
        self.docs_paths = frozenset(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = DOCS_CSP if scope["path"] in self.docs_paths else PAGE_CSP
        headers = [*SECURITY_HEADERS, (b"content-security-policy", csp.encode())]

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
