"""FastAPI dependencies, as `Annotated` aliases (the full-stack-fastapi-template style).

The app's services (database, storage, Celery app, settings) live on `app.state`, built
once by `svdforge.api.main.create_app`, so tests build an app around a temporary data folder
without monkeypatching globals.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from celery import Celery
from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from svdforge.api.limits import UNAUTHORIZED, lookup_key
from svdforge.api.problems import ProblemError, field_error
from svdforge.persistence.db import Database
from svdforge.persistence.settings import Settings
from svdforge.persistence.storage import Storage
from svdforge.persistence.tables import ApiKey


# The trivial dependencies are `async def`: FastAPI runs sync ones in the threadpool, and
# each such hop costs more than the work they do.
async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; requests that change things write through the writer pool.

    Creating a session does no I/O (it connects at its first query, in the endpoint's
    thread); closing it is a quick rollback at most.
    """
    write = request.method not in ("GET", "HEAD", "OPTIONS")
    session = request.app.state.db.session(write=write)
    try:
        yield session
    finally:
        session.close()


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="An API key from `svdforge keys create`, sent as `Authorization: Bearer <key>`.")


async def get_current_key(request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
    """The caller's API key; anything else is a 401 that does not say which part was wrong.

    Requests with a body were authenticated by `KeyBeforeBodyMiddleware` before their body
    was read; its key (found for the same Authorization header) is taken from
    `request.state`. Others look the key up here, in a short read session on a worker
    thread: this dependency is async so that a request pays one thread hop for its
    endpoint, not one more for authentication.
    """
    key = getattr(request.state, "api_key", None)
    if key is None and credentials is not None:
        key = await anyio.to_thread.run_sync(lookup_key, request.app.state.db, credentials.credentials)
    if key is None:
        raise ProblemError(401, "unauthorized", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    return key


CurrentKey = Annotated[ApiKey, Depends(get_current_key)]


def _query_names(route: APIRoute) -> frozenset[str]:
    names = getattr(route, "_svdforge_query_names", None)
    if names is None:
        found, todo = set(), [route.dependant]
        while todo:  # the route's own query parameters and those of its dependencies
            dependant = todo.pop()
            found |= {p.alias for p in dependant.query_params}
            todo.extend(dependant.dependencies)
        names = route._svdforge_query_names = frozenset(found)  # type: ignore[attr-defined]
    return names


async def reject_unknown_query(request: Request) -> None:
    """Unknown query parameters are a 422, as unknown body fields are: a typo never goes unnoticed."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    unknown = sorted(set(request.query_params) - _query_names(route))
    if unknown:
        raise field_error(unknown[0], "unknown query parameter", "extra_forbidden")
