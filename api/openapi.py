"""The OpenAPI document: errors are declared as application/problem+json.

FastAPI files every response model under `application/json`; RFC 9457 documents have
their own media type, so responses with a 4xx/5xx status are moved to it here, and
FastAPI's default validation-error schemas (replaced by `Problem`) are dropped.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from svdforge.api.problems import PROBLEM_JSON


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _problem_media_types(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes,
                tags=app.openapi_tags))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _problem_media_types(schema: dict[str, Any]) -> dict[str, Any]:
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content")
                if status[0] in "45" and content and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema
