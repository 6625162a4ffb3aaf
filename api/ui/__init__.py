"""The dashboard at /ui: server-rendered pages (Jinja2) and a little vanilla JavaScript.

The pages carry no data: the browser asks the public /v1 API for everything with the API
key the user signed in with (kept in sessionStorage, sent as `Authorization: Bearer`, never
put in a URL), so a page shows exactly what that key may see. What the server renders is
the form's choices and defaults, read from the request schema. Every response under /ui
carries a strict Content-Security-Policy: scripts and styles from /ui/static only, no
inline script, images from the origin or blob: URLs (figures are fetched with the key).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from svdforge.api.schemas import AdaLoraAdapter, JobCreate, LoraAdapter, MethodName, NoAdapter, UpdateAdapter
from svdforge.core.methods import get_method
from svdforge.persistence.jobs import API_PREFIX

UI_PREFIX = "/ui"
HERE = Path(__file__).resolve().parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
SOURCES = ("builtin", "file", "hf")
JobId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="A job id.")]

templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)


def form_choices() -> dict[str, Any]:
    """The submit form's choices and placeholders: the request schema's own names and defaults."""
    defaults = JobCreate(model="smollm2-135m", ratio=0.4).model_dump(mode="json")
    methods = [{"name": m, "summary": get_method(m).summary} for m in get_args(MethodName)]
    adapters = [get_args(cls.model_fields["type"].annotation)[0]
                for cls in (NoAdapter, UpdateAdapter, LoraAdapter, AdaLoraAdapter)]
    return {"defaults": defaults, "methods": methods, "adapters": adapters, "sources": SOURCES}


def _page(request: Request, template: str, title: str, **context: Any) -> HTMLResponse:
    context = {"title": title, "api_prefix": API_PREFIX, "ui_prefix": UI_PREFIX, **context}
    return templates.TemplateResponse(request, template, context, headers=SECURITY_HEADERS)


@router.get("", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", "Jobs", page="jobs")


@router.get("/new", response_class=HTMLResponse)
def new_job_page(request: Request) -> HTMLResponse:
    return _page(request, "new.html", "New job", page="new", **form_choices())


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: JobId) -> HTMLResponse:
    return _page(request, "job.html", f"Job {job_id}", page="job", job_id=job_id)


@router.get("/jobs", include_in_schema=False)
def jobs_redirect() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX, status_code=308)


class SecurityHeaders:
    """Adds the dashboard's security headers to every response of the wrapped app (the static files)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                extra = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
                headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Serve the dashboard's pages at /ui and its scripts and styles at /ui/static."""
    app.include_router(router)
    app.mount(f"{UI_PREFIX}/static", SecurityHeaders(StaticFiles(directory=HERE / "static")), name="ui-static")
