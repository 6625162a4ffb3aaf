"""The compressed artifact: a folder that transformers and svdforge both understand.

    model.safetensors            (or model-0000x-of-0000y.safetensors + index, past 2 GB)
    config.json                  the base architecture's config, unchanged
    generation_config.json, tokenizer files
    svdforge.json                manifest: method, ratio, per-linear ranks, calibration spec,
                                 metrics, package versions, sha256 of every other file
    report.json                  the run's full report

Compressed linears are stored as `<name>.u.weight` (m x k) and `<name>.v.weight` (k x n).
`load_artifact(dir)` rebuilds the architecture from config.json, swaps in `LowRankLinear`s
with the manifest's ranks and loads the safetensors with strict key checking. No pickle
is ever read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from svdforge.core.errors import UserError
from svdforge.core.lowrank import apply_ranks

MANIFEST = "svdforge.json"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("svdforge", "torch", "transformers", "peft", "safetensors", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def save_model(model, tokenizer, out_dir: Path, max_shard_size: str = "2GB") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)


def write_manifest(out_dir: Path, manifest: dict) -> dict:
    """Write svdforge.json with the sha256 of every other file in the folder (last step)."""
    files = {}
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(out_dir).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": "svdforge", "format_version": FORMAT_VERSION, **manifest, "files": files}
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise UserError(f"{path} is not an svdforge artifact (no {MANIFEST})")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: {e}") from None
    if m.get("format") != "svdforge" or m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p}: unsupported artifact format {m.get('format')!r} v{m.get('format_version')}")
    return m


def verify_files(path: str | Path, manifest: dict | None = None) -> None:
    """Raise UserError if any file's sha256 differs from the manifest."""
    manifest = manifest or read_manifest(path)
    for rel, meta in manifest["files"].items():
        p = Path(path) / rel
        if not p.is_file() or sha256_file(p) != meta["sha256"]:
            raise UserError(f"artifact file {rel} is missing or does not match its sha256")


def _state_dict_from_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    sd: dict[str, torch.Tensor] = {}
    for s in shards:
        sd.update(load_file(path / s))
    return sd


def load_artifact(path: str | Path, device: str = "cpu", verify: bool = False):
    """(model, tokenizer) from an artifact folder; the model is in eval mode.

    With plain transformers the same works in one line:
    `model, tok = core.load_artifact("DIR")` - it needs only torch, transformers and
    safetensors at load time (no peft, no pickle).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    model = load_weights(path, {name: e["rank"] for name, e in manifest["ranks"].items()}, device)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_weights(path: str | Path, ranks: dict[str, int | None], device: str = "cpu"):
    """The model of a folder holding config.json and the safetensors, with `LowRankLinear`s at
    `ranks` (what `load_artifact` reads from the manifest; a resumed run has them from its
    checkpoint, before any manifest is written). Strict key checking; eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_ranks(model, ranks)
    sd = _state_dict_from_safetensors(path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise UserError(f"artifact weights do not match its manifest: missing {real_missing[:5]}, "
                        f"unexpected {list(unexpected)[:5]}")
    model.eval()
    model.config.use_cache = False
    return model.to(device)
