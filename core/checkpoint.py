"""Checkpoint folders, read and written one tensor at a time (the streaming path's I/O).

- `CheckpointReader`: tensors of a safetensors folder by name (memory-mapped by safetensors,
  then copied into anonymous memory, so that the mapping dies with the copy);
- `build_skeleton`: the model on the meta device (no memory) with only the embeddings,
  final norm, `lm_head` and the rotary buffers materialised; `materialize` / `release`
  bring one module's tensors in and send them back to meta;
- `ShardWriter`: size-capped safetensors shards written as tensors come, named like
  transformers' (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`, or
  one `model.safetensors`), tied `lm_head` left out as `save_pretrained` does.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from svdforge.core.errors import UserError
from svdforge.core.layers import decoder_layers

MAX_SHARD_BYTES = 2 * 10**9   # as save_pretrained's max_shard_size="2GB"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- reading

class CheckpointReader:
    """Tensors of a safetensors checkpoint folder by name, one shard file opened per read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise UserError(f"{folder}: streaming needs safetensors weights, found none")
            self.weight_map = {}
            for name in files:
                with safe_open(self.folder / name, framework="pt") as f:
                    self.weight_map.update({k: name for k in f.keys()})  # noqa: SIM118 - safe_open is not iterable

    @property
    def files(self) -> list[Path]:
        return [self.folder / f for f in sorted(set(self.weight_map.values()))]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str], dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
        """Copies (anonymous memory, on `device`, floating tensors cast to `dtype`) of the named tensors."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise UserError(f"checkpoint {self.folder} has no tensor {n!r}: this architecture's "
                                "weight names differ from its modules; use streaming='off'")
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for fname, keys in by_file.items():
            with safe_open(self.folder / fname, framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)   # backed by the file mapping until copied
                    out[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
                    del t
        return out


def is_streamable(source: str) -> bool:
    p = Path(source)
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def _rebuild_meta_buffers(module: nn.Module, config, device, skip: str | None = None) -> None:
    """Non-persistent buffers (rotary `inv_freq`) are not in checkpoints: re-create the modules
    that own them on `device` from the config (modules under `skip.` are left alone)."""
    for name, sub in list(module.named_modules()):
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        if not any(b.is_meta for b in sub.buffers(recurse=False)):
            continue
        if hasattr(sub, "scalar_embed_scale"):  # Gemma's scaled embedding keeps its scale as a float too
            sub.embed_scale = torch.tensor(sub.scalar_embed_scale, device=device)
            continue
        try:
            fresh = type(sub)(config=config, device=device)
        except TypeError:
            fresh = type(sub)(config=config).to(device)
        parent, _, child = name.rpartition(".")
        if not child:
            raise UserError(f"streaming cannot re-create the buffers of {type(sub).__name__}; use streaming='off'")
        setattr(module.get_submodule(parent) if parent else module, child, fresh)
    left = [n for n, b in module.named_buffers()
            if b.is_meta and not (skip is not None and n.startswith(skip + "."))]
    if left:
        raise UserError(f"streaming cannot re-create buffers {left[:3]}; use streaming='off'")


def build_skeleton(source: str | Path, dtype: str = "float32", device="cpu", trust_remote_code: bool = False):
    """(model, reader, prefix): the model on meta with embeddings, norms, head and rotary
    buffers materialised; decoder layers stay on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    reader = CheckpointReader(source)
    _, prefix = decoder_layers(model)
    names = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    tied = tied_names(model)
    wanted = [k for k in names if k in reader or k not in tied]
    sd = reader.read(wanted, torch_dtype, device)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if left:
        raise UserError(f"checkpoint {source} lacks {left[:3]}; use streaming='off'")
    _rebuild_meta_buffers(model, model.config, device, skip=prefix)
    return model, reader, prefix


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier tensor (save_pretrained drops them)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        if out is not None:
            tied |= {f"{n}.weight" for n, m in model.named_modules() if m is out}
    return tied


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, dtype: torch.dtype, device,
                config=None) -> None:
    """Load `module`'s parameters and persistent buffers (named `prefix.*` in the checkpoint)."""
    local = list(module.state_dict().keys())
    sd = reader.read([f"{prefix}.{k}" for k in local], dtype, device)
    module.load_state_dict({k: sd[f"{prefix}.{k}"] for k in local}, strict=True, assign=True)
    if config is not None and any(b.is_meta for b in module.buffers()):
        _rebuild_meta_buffers(module, config, device)


def release(module: nn.Module) -> None:
    """Back to the meta device: the memory of its tensors is freed."""
    module.to("meta")


# ----------------------------------------------------------------------------- writing

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class ShardWriter:
    """Writes tensors into size-capped safetensors shards as they come, named like
    transformers' (`model-00001-of-0000N.safetensors` + index, or one `model.safetensors`).

    Nothing is buffered in memory: each tensor's bytes are appended to the open shard's data
    file at once; when the shard is full, its header (which safetensors wants first) is
    written and the data copied behind it (sequential I/O, kernel-side where possible).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 10**9):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0
        self._data = None            # open data file of the current shard
        self._entries: dict[str, dict] = {}
        self._size = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            nb = t.numel() * t.element_size()
            if self._entries and self._size + nb > self.max:
                self.flush()
            if self._data is None:
                # open across add() calls until the shard is full; flush() closes it
                self._data = open(self.out / f".shard-{len(self.shards):05d}.data", "w+b")  # noqa: SIM115 - open until flush()
            if t.dtype not in _ST_DTYPES:
                raise UserError(f"cannot write tensor {name} of dtype {t.dtype}")
            if nb:
                self._data.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            self._entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                                   "data_offsets": [self._size, self._size + nb]}
            self._size += nb
            self.total += nb

    def flush(self) -> None:
        if self._data is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path = self.out / f".shard-{len(self.shards):05d}.safetensors.tmp"
        self._data.flush()
        self._data.seek(0)
        with open(path, "wb") as fh:
            fh.write(len(header).to_bytes(8, "little"))
            fh.write(header)
            fh.flush()
            shutil.copyfileobj(self._data, fh, 16 << 20)
        self._data.close()
        os.unlink(self._data.name)
        self.shards.append((path, list(self._entries)))
        self._data, self._entries, self._size = None, {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            final = self.out / "model.safetensors"
            os.replace(self.shards[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (tmp, keys) in enumerate(self.shards):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, final)
            finals.append(final)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return finals


def non_layer_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The model's tensors outside the decoder layers, tied duplicates left out."""
    tied = tied_names(model)
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(prefix + ".") and k not in tied}


def save_config(model: nn.Module, tokenizer, out_dir: Path) -> None:
    model.config.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
