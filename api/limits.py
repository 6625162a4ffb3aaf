"""Request body limits that answer 413 as problem+json before the body is parsed.

Starlette would otherwise spool a whole multipart upload to disk before the route could
look at its size. A declared Content-Length over the limit is refused at once; a chunked
body is counted as it arrives and refused when it passes the limit.
"""
from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import PROBLEM_JSON, ProblemError


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, default_limit: int, limits: dict[str, int]) -> None:
        self.app, self.default_limit, self.limits = app, default_limit, limits

    def _limit(self, path: str) -> int:
        return self.limits.get(path.rstrip("/"), self.default_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_413(scope, send, limit)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counting_receive, send)


def too_large(limit: int) -> ProblemError:
    return ProblemError(413, "content_too_large", f"the request body is larger than {limit} bytes",
                        limit_bytes=limit)


async def _send_413(scope: Scope, send: Send, limit: int) -> None:
    body = json.dumps({"type": "urn:svdforge:problem:content_too_large", "title": "Content Too Large",
                       "status": 413, "detail": f"the request body is larger than {limit} bytes",
                       "instance": scope["path"], "code": "content_too_large", "limit_bytes": limit}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
