"""JSON request bodies, the same for every route that reads one: `JsonRoute`.

- Another media type (`text/plain`, a form, multipart, none at all) is a 415 naming
  `application/json`, instead of pydantic's "Input should be a valid dictionary".
- The body is parsed as RFC 8259 JSON (`strict_loads`): the bare `NaN`, `Infinity` and
  `-Infinity` that Python's parser takes are invalid JSON, and an object with a duplicate
  key (at any depth) is refused naming the key, not silently reduced to its last value.
  Both are the 422 that any malformed JSON gets (field `body`, type `json_invalid`).

The routers use it as their `route_class`; routes without a body, or with a form body
(uploads), are left as FastAPI builds them.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.params import Form
from fastapi.routing import APIRoute

from svdforge.api.problems import ProblemError, invalid_json

JSON = "application/json"


class NotJson(ValueError):
    """What RFC 8259 refuses and Python's `json` module accepts."""


def _constant(name: str) -> Any:
    raise NotJson(f"{name} is not valid JSON (RFC 8259 has no NaN or infinite numbers)")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise NotJson(f"duplicate key {json.dumps(key)} in an object")
            seen.add(key)
    return out


def strict_loads(data: bytes | str) -> Any:
    """`json.loads` for RFC 8259 JSON: NaN / Infinity and duplicate keys raise `NotJson`."""
    return json.loads(data, parse_constant=_constant, object_pairs_hook=_unique)


def is_json(content_type: str | None) -> bool:
    """`application/json` or any `application/*+json`, parameters (charset) aside."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return mime == JSON or (mime.startswith("application/") and mime.endswith("+json"))


def unsupported_media_type(content_type: str | None) -> ProblemError:
    given = f"`{content_type}`" if content_type else "no Content-Type"
    return ProblemError(415, "unsupported_media_type", f"the request body must be {JSON}; got {given}",
                        title="Unsupported Media Type", expected=JSON)


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = strict_loads(await self.body())
            except NotJson as e:
                raise invalid_json(str(e)) from None
        return self._json


class JsonRoute(APIRoute):
    """An APIRoute whose JSON body is checked for its media type and parsed strictly."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None or isinstance(self.body_field.field_info, Form):
            return handler

        async def strict_json(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if not is_json(content_type):
                raise unsupported_media_type(content_type)
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_json
