"""Request body guards that answer as problem+json before the body is parsed.

Starlette would otherwise spool a whole multipart upload to disk before the route could
look at its size. A declared Content-Length over the limit is refused at once (413); a
chunked body is counted as it arrives and refused when it passes the limit. And FastAPI
reads the body before it runs the dependency that checks the API key, so a request that
sends a body without a valid key is refused (401) here, before any of it is read.
"""
from __future__ import annotations

import json

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from svdforge.api.problems import PROBLEM_JSON, ProblemError
from svdforge.persistence.keys import find_key

NO_BODY = ("GET", "HEAD", "OPTIONS")
UNAUTHORIZED = "a valid API key is required (Authorization: Bearer <key>)"  # also what api.deps answers


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, default_limit: int, limits: dict[str, int]) -> None:
        self.app, self.default_limit, self.limits = app, default_limit, limits

    def _limit(self, path: str) -> int:
        return self.limits.get(path.rstrip("/"), self.default_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in NO_BODY:
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_problem(scope, send, 413, "content_too_large", "Content Too Large",
                               f"the request body is larger than {limit} bytes", limit_bytes=limit)
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


class KeyBeforeBodyMiddleware:
    """Requests under `prefix` that carry a body need a valid key before the body is read.

    One indexed lookup in a worker thread; the key it finds goes to `request.state.api_key`,
    where the route's own dependency (`svdforge.api.deps.get_current_key`) takes it instead of
    looking again.
    """

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in NO_BODY or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        db = scope["app"].state.db
        key = None if token is None else await anyio.to_thread.run_sync(lookup_key, db, token)
        if key is None:
            await send_problem(scope, send, 401, "unauthorized", "Unauthorized", UNAUTHORIZED,
                               headers=[(b"www-authenticate", b"Bearer")])
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def bearer_token(scope: Scope) -> str | None:
    """The credentials of `Authorization: Bearer <token>` (as FastAPI's HTTPBearer reads them)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def lookup_key(db, token: str):
    """The active key for `token` or None, from a short read session (the row stays readable)."""
    with db.session() as s:
        return find_key(s, token)


async def send_problem(scope: Scope, send: Send, status: int, code: str, title: str, detail: str, *,
                       headers: tuple[tuple[bytes, bytes], ...] = (), **extensions: object) -> None:
    """A problem+json response from middleware (the app's handlers are not reached)."""
    body = json.dumps({"type": f"urn:svdforge:problem:{code}", "title": title, "status": status, "detail": detail,
                       "instance": scope["path"], "code": code, **extensions}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})
