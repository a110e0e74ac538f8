"""The protocol's errors: its error classes, the error answers declared in OpenAPI, and
ProtocolErrors, which gives every error on a /v2 path the protocol's form, `{"error": "..."}`.

The routes raise domain errors like every route, and ProtocolErrors, a pure ASGI layer in front
of the Host check and the body limit, rewrites each problem+json answer on a /v2 path into that
form. So the Host check's 400, the body limit's 413 and routing's 404 and 405 take it too, while
every other path keeps problem+json.
"""

import json
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import ServiceError
from service.http.oip.models import JSON_TYPE, ProtocolError
from service.http.problems import PROBLEM_JSON


class InvalidInferenceRequest(ServiceError):
    type = "invalid-inference-request"
    title = "The inference request is not valid"
    status = 400


class ModelNotFound(ServiceError):
    type = "model-not-found"
    title = "No such model"
    status = 404


# Why each error comes, for the OpenAPI document. Every /v2 route can answer 400: the Host
# check is in front of them all.
CAUSES = {
    400: "The Host header names no host of SGD_ALLOWED_HOSTS",
    404: "Another model name, or a version that is not kept",
    409: "The version cannot answer the interval asked for (parameter coverage): a conformal "
    "one of a fit without validation_fraction, or one unbounded for want of held-out rows",
    413: "The body is over SGD_MAX_BODY_BYTES, or over room for SGD_MAX_PREDICT_BATCH numbers "
    "(32 bytes each, and 1 MiB) when that is less",
    503: "No fit has succeeded yet (in Redis mode, also: Redis cannot be reached)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the protocol's error answers a route can give."""
    return {code: {"model": ProtocolError, "description": CAUSES[code]} for code in codes}


def is_protocol_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class ProtocolErrors:
    """Pure ASGI: on /v2 paths, answer each problem+json error as the protocol's error object.

    The problem's detail becomes the message; its status stays, but for 422: the protocol calls
    an invalid request 400. Its headers (Allow, Retry-After, Connection) stay too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protocol_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and _is_problem(message):
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                status, headers, body = _protocol_error(start, b"".join(chunks))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def _is_problem(start: Message) -> bool:
    headers: Sequence[tuple[bytes, bytes]] = start.get("headers", [])
    return any(k.lower() == b"content-type" and v == PROBLEM_JSON.encode() for k, v in headers)


def _protocol_error(start: Message, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    problem = json.loads(body)
    message = str(problem.get("detail") or problem.get("title") or "error")
    issues = problem.get("errors") or []
    if issues:  # a validation problem: its fields say what is wrong
        message += ": " + "; ".join(f"{i['field']}: {i['message']}" for i in issues[:5])
    status = 400 if start["status"] == 422 else start["status"]
    answer = json.dumps({"error": message}).encode()
    kept = [
        (k, v)
        for k, v in start.get("headers", [])
        if k.lower() not in (b"content-type", b"content-length")
    ]
    headers = [
        *kept,
        (b"content-type", JSON_TYPE.encode()),
        (b"content-length", str(len(answer)).encode()),
    ]
    return status, headers, answer
