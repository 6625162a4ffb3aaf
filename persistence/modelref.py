"""Which `model` values a job may name: an alias, a hub id, or a path inside the allowed root.

The API checks this before accepting a job (422 on `model`), and the worker checks it
again before loading (the root may have changed while the job waited). A path must
resolve, symlinks followed, inside `SVDFORGE_MODEL_ROOT`, so `..` or a link cannot reach
the rest of the disk. Kept free of torch so that the API does not import it.
"""
from __future__ import annotations

import re
from pathlib import Path

from persistence.settings import Settings

ALIASES = frozenset({"smollm2-135m"})  # core.models.ALIASES (a test keeps the two equal)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelRefError(ValueError):
    """The model reference is not allowed; the message is for the user."""


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or "\\" in model or model.endswith(".gguf")


def check_model_ref(model: str, settings: Settings) -> str:
    """Return the reference to load (a resolved path for local models) or raise ModelRefError."""
    if model in ALIASES:
        return model
    if looks_like_path(model):
        return _check_path(model, settings)
    if HUB_ID.match(model) and ".." not in model:
        if not settings.allow_hub_models:
            raise ModelRefError("hub models are disabled on this server; use an alias or a local path")
        return model
    raise ModelRefError(f"{model!r} is not an alias ({', '.join(sorted(ALIASES))}), a hub id like org/name, "
                        "or an absolute path")


def _check_path(model: str, settings: Settings) -> str:
    if settings.model_root is None:
        raise ModelRefError("local model paths are disabled on this server (set SVDFORGE_MODEL_ROOT)")
    path = Path(model)
    if not path.is_absolute():
        raise ModelRefError("a local model path must be absolute")
    root = Path(settings.model_root).resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ModelRefError("the path is outside the allowed model root")
    if not resolved.exists():
        raise ModelRefError("no such model folder or file under the allowed model root")
    return str(resolved)
