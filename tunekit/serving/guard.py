"""What `tunekit serve` checks before a request reaches the app: the API key, then the body size.

FastAPI reads and parses a whole body before any dependency runs, so a key checked there lets an
unauthenticated client make the server read (and hold) any amount. This ASGI middleware answers
401 from the headers alone, and reads the body, up to a cap, only for a client with the key:
a larger body is refused with 413 as soon as its Content-Length, or its bytes so far, exceed it."""

from __future__ import annotations

import hmac
import json
from typing import Any

from tunekit.serving.openai_format import error_body


class Guard:
    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and not hmac.compare_digest(
                headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
            await refuse(send, 401, "a valid API key is needed: send `Authorization: Bearer KEY`", "invalid_api_key")
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body:
            await refuse(send, 413, self.too_large(), "request_too_large")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:  # a chunked body declares no length
                await refuse(send, 413, self.too_large(), "request_too_large")
                return
            more = message.get("more_body", False)
        body: list[bytes] | None = chunks

        async def replay() -> dict[str, Any]:
            """The body once, then the client's own messages (a disconnect, which answers watch for)."""
            nonlocal body
            if body is not None:
                whole, body = b"".join(body), None
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def too_large(self) -> str:
        return f"the request body is larger than this server takes ({self.max_body} bytes); send a shorter prompt"


async def refuse(send: Any, status: int, message: str, code: str) -> None:
    content = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})
