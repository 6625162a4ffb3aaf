"""Calibration cache: the per-layer input statistics of one calibration, kept on disk.

A second job on the same model and data skips calibration entirely (no forward pass):
the layer loop's `Statistics` handler reads every layer's Grams from it. The statistics are stored
under `$SVDFORGE_CACHE/stats/<sha256 of the key>/layer_XXXXX.safetensors` (fp64, each
distinct linear input once) and the key holds everything they depend on:

- the model revision: resolved path, sha256 of config.json, name, size and mtime of every
  weight file (hashing 100 GB of weights per job would cost minutes; a rewritten file
  changes its mtime);
- the data: the calibration spec (source, path, samples, seq_len, seed, ...) and the sha256
  of the token windows themselves (so the text and the tokenizer are covered);
- how they were computed: method (and the statistics it needs), targets, calibration mode,
  batch size, forward dtype, device type, the closed-form update flag;
- in `sequential` mode also ratio, allocation and rank_multiple (when not 1), since layer l's
  inputs come from the already compressed layers before it. `parallel` statistics depend on
  the dense model only.

A cache folder appears atomically (written under a temporary name, renamed when the last
layer is in), so an interrupted job leaves nothing half-written behind. A calibration whose
statistics would exceed `max_bytes` is not cached (a 70B model's fp64 Grams are ~0.5 TB).

The rank plan's passes (`svdforge.core.allocation.plan_spectra`: every linear's whitened
spectrum from one dense pass, and for loss-aware allocation every component's loss score from
one forward + backward) depend on the dense model and the windows only, not on the ratio or
the calibration mode. `PlanCache` keeps their result, a few MB even for a 70B model, in one
file `$SVDFORGE_CACHE/plans/<sha256 of the key>.safetensors` (written atomically), so a second
job on the same model and data at any ratio skips them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from svdforge.core.methods import InputStats
from svdforge.core.statistics import CrossMoments, StatsCollector

FORMAT = "svdforge-stats-v1"
PLAN_FORMAT = "svdforge-plan-v1"
DEFAULT_MAX_BYTES = 8 * 2**30


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def model_identity(source: str | Path) -> dict:
    """What identifies a model revision without reading its weights."""
    p = Path(source).resolve()
    if p.is_file():   # a .gguf
        st = p.stat()
        return {"path": str(p), "files": [[p.name, st.st_size, st.st_mtime_ns]]}
    cfg = p / "config.json"
    files = []
    for f in sorted(p.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf") or f.name.endswith(".index.json"):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    return {"path": str(p), "config_sha256": _sha256_bytes(cfg.read_bytes()) if cfg.is_file() else None,
            "files": files}


def _windows_key(config, source: str, calib_ids: torch.Tensor, forward_dtype: torch.dtype, device: str) -> dict:
    """What any pass over the calibration windows depends on: model revision, data, method, dtypes."""
    return {
        "model": model_identity(source),
        "data": dataclasses.asdict(config.calibration),
        "windows_sha256": _sha256_bytes(calib_ids.to(torch.int64).contiguous().numpy().tobytes()),
        "windows_shape": list(calib_ids.shape),
        "method": config.method,
        "targets": config.targets,
        "batch_size": config.calibration_batch_size,
        "forward_dtype": str(forward_dtype),
        "device_type": torch.device(device).type,
        "dtype": config.dtype,
    }


def stats_key(config, source: str, calib_ids: torch.Tensor, needs, forward_dtype: torch.dtype,
              device: str, update: bool) -> dict:
    """The full key (a JSON-able dict) of a calibration's statistics."""
    key = {"format": FORMAT, **_windows_key(config, source, calib_ids, forward_dtype, device),
           "needs": sorted(needs), "calibration_mode": config.calibration_mode, "update": bool(update)}
    if config.calibration_mode == "sequential":
        key["ratio"] = config.ratio
        key["allocation"] = config.allocation
        key["method_options"] = config.method_options.to_dict()
        if config.rank_multiple != 1:   # the ranks of the layers before; absent at 1, so older keys still hit
            key["rank_multiple"] = config.rank_multiple
    return key


def plan_key(config, source: str, calib_ids: torch.Tensor, forward_dtype: torch.dtype, device: str) -> dict:
    """The key of a rank plan's passes: the dense model and windows (no ratio, no mode), the method's
    options (its scaling; FWSVD's Fisher samples) and, for loss-aware allocation, the score."""
    return {"format": PLAN_FORMAT, **_windows_key(config, source, calib_ids, forward_dtype, device),
            "method_options": config.method_options.to_dict(),
            "loss_score": config.loss_score if config.allocation == "loss" else None}


def key_digest(key: dict) -> str:
    return _sha256_bytes(json.dumps(key, sort_keys=True, default=str).encode())


class StatsCache:
    """One key's folder. `complete` -> `load(li, ...)` per layer; else `save` then `commit`."""

    def __init__(self, root: str | Path, key: dict, max_bytes: int = DEFAULT_MAX_BYTES):
        self.key = key
        self.digest = key_digest(key)
        self.dir = Path(root) / "stats" / self.digest
        self.complete = (self.dir / "done.json").is_file()
        self.max_bytes = max_bytes
        self.status = "hit" if self.complete else "miss"
        self.reason: str | None = None
        self.bytes = json.loads((self.dir / "done.json").read_text())["bytes"] if self.complete else 0
        self._tmp: Path | None = None

    # -- reading
    def load(self, index: int, linears, needs, update: bool):
        """(StatsCollector, CrossMoments | None) for layer `index`, as the forward left them."""
        from safetensors import safe_open


        path = self.dir / f"layer_{index:05d}.safetensors"
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["svdforge"])
            device = linears[0][1].weight.device if linears else "cpu"   # where the layer is
            tensors = {k: f.get_tensor(k).to(device, copy=True) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        col = StatsCollector(linears, needs)
        col.group_of = {n: int(g) for n, g in meta["group_of"].items()}
        col.stats = [InputStats(gram=tensors.get(f"g{i}.gram"), abs_sum=tensors.get(f"g{i}.abs_sum"), tokens=t)
                     for i, t in enumerate(meta["tokens"])]
        cross = None
        if update:
            cross = CrossMoments(linears)
            cross.key_of = meta["key_of"]
            cross.moments = {k[2:]: v for k, v in tensors.items() if k.startswith("x.")}
        return col, cross

    # -- writing
    def save(self, index: int, collector, cross, n_layers: int) -> None:
        from safetensors.torch import save_file

        if self.status != "miss":
            return
        if self._tmp is None:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.dir.parent / f".{self.digest}.tmp-{os.getpid()}"
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp.mkdir()
        tensors = {}
        for i, st in enumerate(collector.stats):
            if st.gram is not None:
                tensors[f"g{i}.gram"] = st.gram.detach().to("cpu").contiguous()
            if st.abs_sum is not None:
                tensors[f"g{i}.abs_sum"] = st.abs_sum.detach().to("cpu").contiguous()
        if cross is not None:
            tensors.update({f"x.{k}": v.detach().to("cpu").contiguous() for k, v in cross.moments.items()})
        layer_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if index == 0 and layer_bytes * n_layers > self.max_bytes:
            self.discard(f"statistics would take ~{layer_bytes * n_layers / 2**30:.1f} GiB "
                         f"(> {self.max_bytes / 2**30:.1f} GiB cache limit)")
            return
        meta = {"group_of": collector.group_of, "tokens": [st.tokens for st in collector.stats],
                "key_of": getattr(cross, "key_of", {})}
        save_file(tensors, str(self._tmp / f"layer_{index:05d}.safetensors"),
                  metadata={"svdforge": json.dumps(meta)})
        self.bytes += layer_bytes

    def commit(self, n_layers: int) -> None:
        if self.status != "miss" or self._tmp is None:
            return
        (self._tmp / "key.json").write_text(json.dumps(self.key, indent=1, sort_keys=True, default=str))
        (self._tmp / "done.json").write_text(json.dumps({"layers": n_layers, "bytes": self.bytes}))
        try:
            os.rename(self._tmp, self.dir)
            self.status = "stored"
        except OSError:   # another job stored the same key meanwhile
            shutil.rmtree(self._tmp, ignore_errors=True)
            self.status = "stored"
        self._tmp = None

    def discard(self, reason: str) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.status, self.reason = "skipped", reason

    def report(self) -> dict:
        out = {"status": self.status, "key": self.digest, "bytes": self.bytes}
        if self.reason:
            out["reason"] = self.reason
        return out


class PlanCache:
    """One rank plan's spectra (and loss scores) under `root/plans/<digest>.safetensors`."""

    def __init__(self, root: str | Path, key: dict):
        self.key = key
        self.digest = key_digest(key)
        self.path = Path(root) / "plans" / f"{self.digest}.safetensors"
        self.status = "hit" if self.path.is_file() else "miss"
        self.reason: str | None = None

    def load(self) -> tuple[dict, dict | None] | None:
        """(spectra, scores or None) as `plan_spectra` returned them (this job's seconds: the read);
        None, and status `miss`, where the file cannot be read."""
        import time

        from safetensors import safe_open

        t0 = time.perf_counter()
        try:
            with safe_open(self.path, framework="pt") as f:
                meta = json.loads(f.metadata()["svdforge"])
                spectra = {n: (m, k, f.get_tensor(f"s.{n}")) for n, (m, k) in meta["shapes"].items()}
                scores = None if meta["scores"] is None else dict(
                    meta["scores"], scores={n: f.get_tensor(f"g.{n}") for n in meta["shapes"]})
        except Exception as e:   # noqa: BLE001 - a damaged entry is recomputed, not fatal
            self.status, self.reason = "miss", f"unreadable ({type(e).__name__}), recomputed"
            return None
        if scores is not None:
            scores.update(spectra_seconds=time.perf_counter() - t0, gradient_seconds=0.0)
        return spectra, scores

    def save(self, spectra: dict, scores: dict | None) -> None:
        from safetensors.torch import save_file

        tensors = {f"s.{n}": sigma.contiguous() for n, (_, _, sigma) in spectra.items()}
        meta = {"shapes": {n: [m, k] for n, (m, k, _) in spectra.items()}, "scores": None}
        if scores is not None:
            tensors.update({f"g.{n}": g.contiguous() for n, g in scores["scores"].items()})
            meta["scores"] = {k: v for k, v in scores.items() if k != "scores"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.digest}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"svdforge": json.dumps(meta)})
        os.replace(tmp, self.path)
        self.status = "stored"

    def report(self) -> dict:
        out = {"status": self.status, "key": self.digest}
        if self.reason:
            out["reason"] = self.reason
        return out
