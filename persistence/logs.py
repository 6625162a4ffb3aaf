"""Log lines operators can use: one JSON object per line, each carrying its job and request.

`configure_logging(settings)` installs one handler on the root logger (stderr; JSON or text
per `SVDFORGE_LOG_FORMAT`) and routes uvicorn's loggers through it. The API process calls it
when it builds the app, `svdforge serve` before it starts, and a Celery worker instead of
Celery's own set-up (`worker/app.py`).

Context: `log_context(job_id=...)` opens a scope (a context variable holding a dict) whose
fields every record logged inside it carries, in threads started with the scope's context
too (`anyio.to_thread`, which FastAPI's sync routes use, copies it). `bind(...)` adds fields
to the innermost open scope in place, so a route that learns a job id (from its path, or
by creating the job) makes the request's later lines carry it, the access line included.

Secrets: nothing in svdforge logs a header or a request body. As a second guard the
formatter masks anything shaped like an API key (`svdf_...`) or a bearer credential.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_context: ContextVar[dict[str, Any] | None] = ContextVar("svdforge_log_context", default=None)

# API keys (persistence.keys.TOKEN_PREFIX) and `Bearer <credentials>` anywhere in a message
SECRET = re.compile(r"svdf_[A-Za-z0-9_\-]+|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]+")
MASK = "[redacted]"
# attributes every LogRecord has: whatever else a record carries came from `extra=` or a scope
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


@contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """A scope whose fields (over those of the scope around it) every record inside carries."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield _context.get()  # type: ignore[misc]
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the innermost open scope (no scope: nothing to add them to)."""
    scope = _context.get()
    if scope is not None:
        scope.update(fields)


def current() -> dict[str, Any]:
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the open scope's fields onto each record (a record's own `extra=` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def redact(text: str) -> str:
    return SECRET.sub(MASK, text) if ("svdf_" in text or "earer" in text) else text


def _field(value: Any) -> Any:
    """A record's extra field as JSON: numbers as they are, structures as structures, the rest
    as (masked) text. Masking never touches quotes or brackets, so masked JSON stays JSON."""
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.loads(redact(json.dumps(value, default=str)))
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", <scope and extra fields>, "exc_info"?}`, one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": redact(record.getMessage())}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = _field(value)
        if record.exc_info:
            out["exc_info"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack_info"] = redact(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [job_id=... request_id=...] message`, for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={getattr(record, k)}" for k in ("job_id", "request_id") if hasattr(record, k))
        line = super().format(record)
        if fields:
            head, _, rest = line.partition(f" {record.name} ")
            line = f"{head} {record.name} [{fields}] {rest}"
        return redact(line)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is now (test runners swap it), not the one it was built with."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(log_format: str = "json", level: str = "INFO") -> logging.Handler:
    """Install (or replace) svdforge's one root handler; uvicorn's loggers propagate to it."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_svdforge", False)]:
        root.removeHandler(h)
    handler = _StderrHandler()
    handler._svdforge = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # svdforge's own access line (api/observe.py: request id, route, duration) replaces uvicorn's
    logging.getLogger("uvicorn.access").disabled = True
    return handler
