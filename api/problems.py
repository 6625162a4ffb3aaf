"""RFC 9457 problem details: every error leaves the API as `application/problem+json`.

`ProblemError` is raised by the routes; the handlers below turn it, FastAPI's validation
errors, Starlette's HTTP errors (404 route, 405 method) and anything unexpected (500,
logged, never a traceback in the body) into the same document shape, the `Problem` schema.
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from svdforge.api.schemas import FieldIssue, Problem

log = logging.getLogger("svdforge.api")

PROBLEM_JSON = "application/problem+json"
# Tags of the request's tagged unions: they appear in pydantic's error locations but are no field.
_UNION_TAGS = {"none", "update", "lora", "adalora", "builtin", "file", "hf"}
_UNION_FIELDS = {"adapter", "calibration", "evaluation", "data"}


class ProblemError(StarletteHTTPException):
    """An HTTP error with a machine-readable `code` (and optional extension members).

    A subclass of Starlette's HTTPException so that it passes unchanged through FastAPI's
    body parsing (which wraps other exceptions into a 400).
    """

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 errors: list[FieldIssue] | None = None, headers: dict[str, str] | None = None,
                 **extensions: Any) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.code, self.title, self.errors, self.extensions = code, title, errors, extensions


def field_error(field: str, message: str, type_: str = "value_error") -> ProblemError:
    """A 422 about one request field, shaped like pydantic's own validation errors."""
    return ProblemError(422, "validation_error", f"{field}: {message}", title="Request validation failed",
                        errors=[FieldIssue(field=field, message=message, type=type_)])


def invalid_json(message: str) -> ProblemError:
    """The 422 of a body that is not JSON: the same shape as FastAPI's malformed-JSON error
    (see `_issue`), raised where the strict parser refuses what Python's accepts."""
    return ProblemError(422, "validation_error", f"body: invalid JSON: {message}", title="Request validation failed",
                        errors=[FieldIssue(field="body", message=f"invalid JSON: {message}", type="json_invalid")])


def _issue(error: dict[str, Any]) -> FieldIssue:
    """One pydantic / FastAPI error as a FieldIssue. A malformed body (`json_invalid`, located
    at a character offset) names `body` and says what the parser found, and where."""
    if error.get("type") == "json_invalid":
        loc = list(error.get("loc", ()))
        at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        why = (error.get("ctx") or {}).get("error") or error.get("msg", "malformed")
        return FieldIssue(field="body", message=f"invalid JSON: {why}{at}", type="json_invalid")
    return FieldIssue(field=field_name(error.get("loc", ())), message=str(error.get("msg", "invalid")),
                      type=str(error.get("type", "value_error")))


def problem_response(request: Request, status: int, code: str, detail: str | None = None, *,
                     title: str | None = None, errors: list[FieldIssue] | None = None,
                     headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    body = Problem(type=f"urn:svdforge:problem:{code}", title=title or HTTPStatus(status).phrase, status=status,
                   detail=detail, instance=request.url.path, code=code, errors=errors, **extensions)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status,
                        media_type=PROBLEM_JSON, headers=headers)


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's error location as the dotted field name a user wrote.

    ("body", "adapter", "lora", "rank") -> "adapter.rank"; ("query", "limit") -> "limit".
    """
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out: list[str] = []
    for i, part in enumerate(parts):
        if i > 0 and part in _UNION_TAGS and parts[i - 1] in _UNION_FIELDS:
            continue
        out.append(f"[{part}]" if isinstance(part, int) else str(part))
    return ".".join(out).replace(".[", "[") or "body"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (for a 405's Allow header). Asked of the
    routes themselves: an included router keeps its routes (and their prefix) to itself."""
    methods = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            methods.append(method)
    return methods


def _code_for(status: int) -> str:
    return {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "content_too_large",
            415: "unsupported_media_type", 416: "range_not_satisfiable", 422: "validation_error",
            429: "too_many_requests", 503: "unavailable"}.get(status, "error" if status < 500 else "internal_error")


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [_issue(e) for e in exc.errors()]
        detail = "; ".join(f"{i.field}: {i.message}" for i in issues[:5])
        return problem_response(request, 422, "validation_error", detail, title="Request validation failed",
                                errors=issues)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, ProblemError):
            return problem_response(request, exc.status_code, exc.code, exc.detail, title=exc.title,
                                    errors=exc.errors, headers=exc.headers, **exc.extensions)
        detail = exc.detail if isinstance(exc.detail, str) else None
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's method
            headers["Allow"] = ", ".join(allowed_methods(request))
        return problem_response(request, exc.status_code, _code_for(exc.status_code), detail,
                                headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal_error", "an internal error occurred; it has been logged")
