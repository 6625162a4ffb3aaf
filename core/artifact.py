"""The compressed artifact (format 2): a Hugging Face model folder that plain transformers
(once the user opts in to its remote code), vLLM and svdforge all load.

    model.safetensors            (or model-0000x-of-0000y.safetensors + index, past 2 GB)
    config.json                  the base model's config under model_type `svdforge_<base>`,
                                 with `auto_map`, `architectures`, a factor-level
                                 `base_model_tp_plan` and `svdforge` (base type, ranks)
    configuration_svdforge.py    the remote code (`svdforge.core.hf`), the same bytes in
    modeling_svdforge.py         every artifact of one svdforge version
    generation_config.json, tokenizer files
    svdforge.json                manifest: method, ratio, per-linear ranks, calibration spec,
                                 metrics, package versions, sha256 of every other file and of
                                 the remote code
    report.json, samples.md      the run's full report

Compressed linears are stored as `<name>.u.weight` (m x k) and `<name>.v.weight` (k x n),
under the module names of the transformers version that wrote them (no checkpoint renaming).
`load_artifact(dir)` rebuilds the base architecture from config.json without running the
folder's code, swaps in `LowRankLinear`s with the manifest's ranks and loads the safetensors
with strict key checking; it also opens format-1 folders (config.json of the base model
unchanged, no remote code). No pickle is ever read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from svdforge.core import architectures
from svdforge.core.checkpoint import tied_names
from svdforge.core.errors import UserError
from svdforge.core.lowrank import LowRankLinear, apply_ranks

MANIFEST = "svdforge.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
REMOTE_CODE = ("configuration_svdforge.py", "modeling_svdforge.py")
_HF_DIR = Path(__file__).parent / "hf"


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


def remote_code_sha256() -> dict[str, str]:
    """sha256 of the two remote-code files this svdforge version puts in every artifact."""
    return {name: sha256_file(_HF_DIR / name) for name in REMOTE_CODE}


def ranks_of(model: torch.nn.Module) -> dict[str, int]:
    """Rank of every compressed linear of a model, by module name."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_model(model, tokenizer, out_dir: Path, max_shard_size: str = "2GB") -> None:
    """Weights (under the model's own module names), tokenizer, then the format-2 files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size,
                          save_original_format=False)
    tokenizer.save_pretrained(out_dir)
    make_loadable(out_dir, ranks_of(model))


def factored_tp_plan(plan: dict[str, str], ranks: dict[str, int], prefix: str) -> dict[str, str]:
    """The base model's tensor-parallel plan at factor level: a linear split by its output
    (`colwise*`) splits `u`, one split by its input (`rowwise*`) splits `v`; the other factor
    is replicated. A kind of linear that is compressed in any layer gets only its factor
    entry (its layers kept dense are then replicated), so that no pattern matches both a
    dense linear and a factor. Untested without several GPUs."""
    names = [n.removeprefix(prefix + ".") for n in ranks]
    out: dict[str, str] = {}
    for pattern, style in plan.items():
        factor = "u" if style.startswith("colwise") else "v" if style.startswith("rowwise") else None
        rx = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
        if factor is None or not any(rx.match(n) for n in names):
            out[pattern] = style
            continue
        out[f"{pattern}.{factor}"] = style
    return out


def make_loadable(out_dir: Path, ranks: dict[str, int]) -> None:
    """Turn a saved folder (base config.json + weights) into format 2: the remote code and a
    config.json that names it. `ranks`: rank of each compressed linear."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    base_type = cfg["model_type"]
    arch = architectures.require(base_type)
    from transformers import AutoConfig

    base_plan = type(AutoConfig.for_model(base_type)).base_model_tp_plan or {}
    prefix = arch.base_model_prefix
    cfg.update(
        model_type=f"svdforge_{base_type}",
        architectures=[arch.remote_class("ForCausalLM")],
        auto_map={"AutoConfig": f"configuration_svdforge.{arch.remote_class('Config')}",
                  "AutoModel": f"modeling_svdforge.{arch.remote_class('Model')}",
                  "AutoModelForCausalLM": f"modeling_svdforge.{arch.remote_class('ForCausalLM')}"},
        base_model_tp_plan=factored_tp_plan(base_plan, ranks, prefix),
        svdforge={"format_version": FORMAT_VERSION, "base_model_type": base_type,
                  "base_architectures": cfg.get("architectures"), "ranks": dict(sorted(ranks.items()))})
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in REMOTE_CODE:
        shutil.copyfile(_HF_DIR / name, out_dir / name)


def write_manifest(out_dir: Path, manifest: dict) -> dict:
    """Write svdforge.json with the sha256 of every other file in the folder (last step)."""
    files = {}
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(out_dir).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": "svdforge", "format_version": FORMAT_VERSION, **manifest,
                "remote_code": remote_code_sha256(), "files": files}
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
    if m.get("format") != "svdforge" or m.get("format_version") not in READABLE_FORMATS:
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
    # the folder's config names its remote code: without an answer, transformers would ask on a
    # terminal whether to run it; the tokenizer needs none of it
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def base_config(path: Path):
    """The base model's config of an artifact folder (format 2: without running its code)."""
    from transformers import AutoConfig

    cfg = json.loads((path / "config.json").read_text())
    meta = cfg.pop("svdforge", None)
    if meta is None:  # format 1, or a plain model folder
        return AutoConfig.from_pretrained(path)
    for key in ("auto_map", "base_model_tp_plan", "model_type", "architectures"):
        cfg.pop(key, None)
    return AutoConfig.for_model(meta["base_model_type"], **cfg, architectures=meta["base_architectures"])


def load_weights(path: str | Path, ranks: dict[str, int | None] | None = None, device: str = "cpu"):
    """The model of a folder holding config.json and the safetensors, with `LowRankLinear`s at
    `ranks` (what `load_artifact` reads from the manifest; a resumed run has them from its
    checkpoint, before any manifest is written; format 2 has them in config.json too).
    Strict key checking; eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(path)
    config = base_config(path)
    if ranks is None:
        ranks = json.loads((path / "config.json").read_text()).get("svdforge", {}).get("ranks", {})
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


class ArtifactCheckError(RuntimeError):
    """The artifact just written does not reproduce the model that was compressed."""


@torch.no_grad()
def check_saved(out_dir: Path, model: torch.nn.Module, ids: torch.Tensor, device: str) -> dict:
    """Reload the artifact just written (as `load_artifact` does) and compare its logits on
    `ids` (a few tokens) with the model in memory. Raises ArtifactCheckError when they differ."""
    reloaded = load_weights(out_dir, device=device)
    ids = ids.to(device)
    a = model(input_ids=ids).logits.float()
    b = reloaded(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    tol = 1e-4 * max(1.0, a.abs().max().item())
    del reloaded
    if not diff <= tol:
        raise ArtifactCheckError(f"the saved artifact in {out_dir} does not reproduce the compressed model: "
                                 f"logits differ by {diff:.3g} (tolerance {tol:.3g}) on {ids.numel()} tokens")
    return {"tokens": ids.numel(), "max_abs_logit_diff": diff, "tolerance": tol, "passed": True}


def check_saved_keys(out_dir: Path) -> dict:
    """For a streamed artifact (the whole model never in memory): the names and shapes of the
    written tensors are exactly those of the model its config.json describes."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out_dir / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config(out_dir))
        apply_ranks(model, cfg["svdforge"]["ranks"])
    tied = tied_names(model)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    got = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            got.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118 - not iterable
    if want != got:
        bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise ArtifactCheckError(f"the saved artifact in {out_dir} does not match its config: {bad[:5]}")
    return {"tensors": len(got), "logits": "not compared: a streamed model is never whole in memory "
                                           "(the streamed evaluation reads its student from this artifact)",
            "passed": True}
