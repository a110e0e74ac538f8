"""Pure ASGI middleware: the request body limit, enforced before and while the body is read."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge
from service.problems import problem_response


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
                await self._reject(scope, receive, send)
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
                        await self._reject(scope, receive, send)
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

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        too_large = PayloadTooLarge(
            f"the body is over SGD_MAX_BODY_BYTES={self.max_bytes} bytes; "
            "send less data per request"
        )
        # The rest of the body is never read: the connection cannot carry another request.
        await problem_response(too_large, {"connection": "close"})(scope, receive, send)
