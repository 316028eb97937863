"""Pure ASGI middlewares (they leave streaming responses and disconnect notices untouched, unlike
Starlette's BaseHTTPMiddleware): request id (and the last word on unhandled errors), request body
limit, API key."""
from __future__ import annotations

import json
import logging
import re
import uuid

from starlette.exceptions import HTTPException

from engine.logging_context import request_id

from .protocol import APIError

log = logging.getLogger("rattn.server")
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


async def send_error(send, e: APIError, headers: list[tuple[bytes, bytes]] = ()):
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class RequestId:
    """Echo the client's X-Request-Id (or make one) on the response and in every log line of the request.
    Outermost, it also turns an unhandled error into a logged 500 in OpenAI's shape that keeps the id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _header(scope, b"x-request-id")
        if rid is None or not _VALID_ID.fullmatch(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id.set(rid)

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            log.exception("unhandled error")
            if not started:
                await send_error(send_with_id, APIError(500, f"internal error: {type(e).__name__}", "server_error"))
        finally:
            request_id.reset(token)


class BodyTooLarge(HTTPException):
    code = "request_too_large"

    def __init__(self, msg: str):
        super().__init__(413, msg)


class BodyLimit:
    """413 for a request body over `limit` bytes: at once from Content-Length, else while it is read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"the request body is larger than this server's limit of {self.limit} bytes (--max-request-mb)"
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(send, APIError(413, msg, code=BodyTooLarge.code))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(msg)  # FastAPI re-raises HTTPExceptions from the body read
            return message

        await self.app(scope, limited, send)


class ApiKey:
    """Require `Authorization: Bearer KEY` on the API routes (/v1, /tokenize, /detokenize); CORS
    preflights, /health, /metrics, /version and the docs stay open."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    def _authorised(self, scope) -> bool:
        scheme, _, key = (_header(scope, b"authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and key == self.key

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"].startswith(self.PROTECTED) and scope["method"] != "OPTIONS"
                and not self._authorised(scope)):
            return await send_error(send, APIError(401, "invalid or missing API key", "authentication_error",
                                                   code="invalid_api_key"))
        await self.app(scope, receive, send)
