"""Which `model` values a job may name: an alias, a hub id, or a path inside the allowed root.

The API checks this before accepting a job (422 on `model`), and the worker checks it
again before loading (the root may have changed while the job waited). A path must
resolve, symlinks followed, inside `SVDFORGE_MODEL_ROOT`, so `..` or a link cannot reach
the rest of the disk. A hub id (model or dataset) must not name a path that exists
relative to the process's working folder: transformers and datasets load such a folder
instead of asking the hub, which would bypass the root. Pickle checkpoints are refused
unless `SVDFORGE_ALLOW_PICKLE` is set (remote code is refused by the loader itself unless
`SVDFORGE_TRUST_REMOTE_CODE` is set: telling needs transformers). A local folder's
config.json must name an architecture svdforge compresses (`svdforge.core.architectures`);
`local_config` gives the API that config, to check window lengths against its positions.
Kept free of torch so that the API does not import it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from svdforge.core import architectures
from svdforge.persistence.settings import Settings

ALIASES = frozenset({"smollm2-135m"})  # core.models.ALIASES (a test keeps the two equal)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # core.models refuses the same ones


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
        return check_hub_name(model)
    raise ModelRefError(f"{model!r} is not an alias ({', '.join(sorted(ALIASES))}), a hub id like org/name, "
                        "or an absolute path")


def check_hub_name(name: str) -> str:
    """A hub id (`org/name` or `name`) that cannot be read as a local path; returns it unchanged."""
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ModelRefError(f"{name!r} is not a valid hub id")
    if Path(name).exists() or Path(name).is_symlink():
        raise ModelRefError(f"{name!r} names a path relative to the server's working folder; "
                            "local models and data must be absolute paths inside the allowed root")
    return name


def _pickle_only(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir()]
    has_safetensors = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    return not has_safetensors and any(n.endswith(PICKLE_SUFFIXES) for n in names)


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
    if not settings.allow_pickle and (resolved.suffix in PICKLE_SUFFIXES if resolved.is_file()
                                      else resolved.is_dir() and _pickle_only(resolved)):
        raise ModelRefError("pickle weights (.bin/.pt) can run code when loaded and are refused on this server "
                            "(convert to safetensors, or an operator sets SVDFORGE_ALLOW_PICKLE)")
    _check_architecture(resolved)
    return str(resolved)


def local_config(model: str) -> dict | None:
    """The config.json of a local model folder (a reference `check_model_ref` returned), or
    None for an alias, a hub id, a .gguf file or a folder without one (the loader judges those)."""
    config = Path(model) / "config.json"
    if not looks_like_path(model) or not config.is_file():
        return None
    try:
        value = json.loads(config.read_text())
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise ModelRefError("the model folder's config.json is not a valid JSON object")
    return value


def _check_architecture(folder: Path) -> None:
    """A local folder's architecture must be one svdforge compresses (its config.json says)."""
    config = local_config(str(folder)) if folder.is_dir() else None
    if config is None:
        return  # a .gguf file, or a folder the loader will refuse with its own message
    why = architectures.refusal(config.get("model_type"))
    if why is not None:
        raise ModelRefError(why)
