"""Pure ASGI middleware: the request body limit, enforced before and while the body is read."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import PROBLEM_JSON


class BodyLimit:
    """Answer 413 problem+json for a body over max_bytes, with or without Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
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
                if seen > self.max_bytes:
                    if not started:
                        await self._reject(send)
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

    async def _reject(self, send: Send) -> None:
        body = (
            b'{"type":"payload-too-large","title":"Request body too large","status":413,'
            b'"detail":"the body is over SGD_MAX_BODY_BYTES=%d bytes; send less data per request"}'
            % self.max_bytes
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
