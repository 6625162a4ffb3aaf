"""What operators see of the API: request ids, one access line per request, Prometheus metrics.

`install(app, settings)` wraps the whole app (outside Starlette's error middleware, so that a
500 is measured and carries its request id too) in `ObserveMiddleware`, a pure ASGI
middleware: per request a clock read, a header scan, one histogram observation and one log
line. The route label is the route's template (`/v1/jobs/{job_id}`), never the raw path, so
the series stay bounded; a path no route matches is `unmatched`.

`GET /metrics` (prometheus_client's text format) reads a per-app registry: the HTTP
histogram, the database's figures (`persistence.metrics.ServiceCollector`: jobs, queue,
outcomes, stage timings, artifact bytes) and this process's CPU and memory. Settings:
`metrics_enabled` (off: 404), `metrics_port` (served there by prometheus_client's own HTTP
server, started and stopped with the app, and not on the API port), `metrics_token`.
"""
from __future__ import annotations

import hmac
import logging
import re
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import start_http_server as start_metrics_server
from prometheus_client.process_collector import ProcessCollector
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from svdforge.api.limits import bearer_token
from svdforge.api.problems import ProblemError
from svdforge.persistence.logs import log_context
from svdforge.persistence.metrics import ServiceCollector
from svdforge.persistence.settings import Settings

access = logging.getLogger("svdforge.api.access")
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
QUIET = frozenset({"/healthz", "/readyz", "/metrics"})  # polled by machines: their access lines at DEBUG
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")  # what a client's X-Request-ID may be; else a new one


def request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return secrets.token_hex(16)


class RouteTemplates:
    """Path -> the template of the route that serves it, matched against every route's template
    (the OpenAPI paths, and the routes outside the schema), literal segments first. Built at the
    first request, so routes added after `install` count; independent of how FastAPI nests
    included routers (whose route objects may know only their path below the prefix)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._table: list[tuple[re.Pattern, str]] | None = None
        self._by_route: dict[int, tuple[re.Pattern, str]] = {}  # routes live as long as the app

    def _build(self) -> list[tuple[re.Pattern, str]]:
        table: dict[str, re.Pattern] = {t: compile_path(t)[0] for t in (self.app.openapi().get("paths") or {})}
        for r in self.app.routes:
            fmt, regex = getattr(r, "path_format", None), getattr(r, "path_regex", None)
            if isinstance(fmt, str) and fmt and regex is not None:
                table.setdefault(fmt, regex)
        return sorted(((regex, t) for t, regex in table.items()), key=lambda e: (e[1].count("{"), -len(e[1])))

    def __call__(self, path: str, route: object = None) -> str:
        """The template for `path`; `route`, the route object that served it, if any, makes
        it one regex match once that route has been seen (verified: a route included twice,
        under two prefixes, falls back to the table)."""
        if self._table is None:
            self._table = self._build()
        known = self._by_route.get(id(route)) if route is not None else None
        if known is not None and known[0].match(path):
            return known[1]
        for regex, template in self._table:
            if regex.match(path):
                if route is not None:
                    self._by_route[id(route)] = (regex, template)
                return template
        return "unmatched"


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, routes: RouteTemplates, histogram: Histogram | None, access_log: bool) -> None:
        self.app, self.route_of, self.histogram, self.access_log = app, routes, histogram, access_log
        self._series: dict[tuple[str, str, int], object] = {}  # the histogram's children, by labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        rid = request_id(scope)
        status = 500  # what an exception that escapes before the response started amounts to
        header = (b"x-request-id", rid.encode("ascii"))

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        with log_context(request_id=rid) as fields:
            try:
                await self.app(scope, receive, observed_send)
            finally:
                self._record(scope, status, time.perf_counter() - began, fields)

    def _record(self, scope: Scope, status: int, seconds: float, fields: dict) -> None:
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = self.route_of(scope["path"], scope.get("route"))
        if self.histogram is not None:
            key = (method, route, status)
            child = self._series.get(key)
            if child is None:
                child = self._series[key] = self.histogram.labels(method, route, str(status))
            child.observe(seconds)
        if self.access_log:
            job_id = (scope.get("path_params") or {}).get("job_id")
            if job_id is not None and "job_id" not in fields:
                fields["job_id"] = job_id
            level = logging.DEBUG if scope["path"] in QUIET else logging.INFO
            if access.isEnabledFor(level):  # the record made directly: no caller lookup (a third of the cost)
                access.handle(access.makeRecord(
                    access.name, level, __file__, 0, "%s %s %s", (method, scope["path"], status), None,
                    extra={"method": method, "route": route, "status": status,
                           "duration_ms": round(seconds * 1000, 2)}))


def build_registry(app: FastAPI) -> tuple[CollectorRegistry, Histogram]:
    disable_created_metrics()  # no `_created` series: they double the text and Prometheus ignores them
    registry = CollectorRegistry(auto_describe=False)
    histogram = Histogram("svdforge_http_request_duration_seconds", "HTTP requests by route template and status",
                          ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=registry)
    registry.register(ServiceCollector(app.state.db))
    ProcessCollector(registry=registry)
    return registry, histogram


def install(app: FastAPI, settings: Settings) -> None:
    """The middleware around everything and, if enabled, the metrics (route or port)."""
    histogram = None
    app.state.metrics_registry = None
    if settings.metrics_enabled:
        app.state.metrics_registry, histogram = build_registry(app)
        if settings.metrics_port is None:
            app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: ObserveMiddleware(build(), RouteTemplates(app), histogram,
                                                           settings.access_log)


def metrics(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    if settings.metrics_token is not None:
        given = bearer_token(request.scope) or ""
        if not hmac.compare_digest(given.encode(), settings.metrics_token.get_secret_value().encode()):
            raise ProblemError(401, "unauthorized", "/metrics needs `Authorization: Bearer <SVDFORGE_METRICS_TOKEN>`",
                               headers={"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def start_port(app: FastAPI) -> object | None:
    """prometheus_client's HTTP server on `metrics_port`, if one is set; `stop_port` ends it."""
    settings: Settings = app.state.settings
    if not settings.metrics_enabled or settings.metrics_port is None:
        return None
    server, _thread = start_metrics_server(settings.metrics_port, addr=settings.metrics_host,
                                           registry=app.state.metrics_registry)
    app.state.metrics_server = server
    return server


def stop_port(server) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
