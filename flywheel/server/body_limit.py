"""A limit on request bodies (--max_request_mb) that holds whether or not the client states their length."""

from __future__ import annotations

from typing import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before any route sees it.

    A stated Content-Length is checked first; a chunked body is read up to the limit, then handed on
    whole (routes read the whole body anyway to parse it). `error_response(path, status, message)`
    answers in the format of the route's API.
    """

    def __init__(self, app: ASGIApp, limit: int, error_response: Callable[[str, int, str], Response]) -> None:
        self.app, self.limit, self.error_response = app, limit, error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stated = dict(scope["headers"]).get(b"content-length")
        if stated is not None:
            if not stated.isdigit():
                message = f"content-length: not a number ({stated.decode(errors='replace')!r})"
                await self.error_response(scope["path"], 400, message)(scope, receive, send)
                return
            if int(stated) > self.limit:
                await self._refuse(f"{int(stated)} bytes", scope, receive, send)
                return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(f"more than {self.limit} bytes", scope, receive, send)
                return
        await self.app(scope, _replaying(bytes(body), receive), send)

    async def _refuse(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"body: {size} is over this server's limit of {self.limit} bytes (--max_request_mb)"
        await self.error_response(scope["path"], 413, message)(scope, receive, send)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` that first gives the body already read, then whatever comes next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
