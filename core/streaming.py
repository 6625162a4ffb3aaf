"""Streaming: compress (and evaluate) a model that does not fit in host or device memory.

The layer loop is `svdforge.core.calibrate.compress_layers`, the same one the in-memory path uses;
this module gives it

- a **skeleton**: the model built on the meta device (no memory), with only the
  embeddings, final norm, `lm_head` and the rotary buffers materialised from the
  checkpoint's safetensors shards;
- a **layer source/sink** (`StreamingLayers`): before layer l is calibrated its weights are
  read from the shards (memory-mapped by safetensors, then copied into anonymous memory so
  that the mapping dies with the layer), and after it is decomposed its state dict
  (factors and untouched tensors) goes to the output `ShardWriter` and the layer returns
  to the meta device;
- an **activation store** (`ActivationStore`): the N x L x hidden buffers of the
  calibration windows live in memory while they fit a byte budget, else in unlinked files
  on disk read and written batch by batch (`DiskTensor`, pread/pwrite: no mapping, so the
  page cache they use is never counted in the process's RSS).

Host (and device) memory then holds the embeddings and head, one decoder layer (dense and
its factors), the activation buffers that fit the budget, and that layer's Grams.

The artifact is the one `svdforge.core.artifact.load_artifact` reads: `<name>.u.weight` /
`<name>.v.weight` for compressed linears, shards named like transformers'
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`, or one
`model.safetensors`), tied `lm_head` left out as `save_pretrained` does.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from svdforge.core.errors import UserError

MAX_SHARD_BYTES = 2 * 10**9   # as save_pretrained's max_shard_size="2GB"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
                    self.weight_map.update({k: name for k in f.keys()})

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

    from svdforge.core.calibrate import decoder_layers

    cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    torch_dtype = _DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    reader = CheckpointReader(source)
    _, prefix = decoder_layers(model)
    names = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    tied = _tied_names(model)
    wanted = [k for k in names if k in reader or k not in tied]
    sd = reader.read(wanted, torch_dtype, device)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if left:
        raise UserError(f"checkpoint {source} lacks {left[:3]}; use streaming='off'")
    _rebuild_meta_buffers(model, model.config, device, skip=prefix)
    return model, reader, prefix


def _tied_names(model: nn.Module) -> set[str]:
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
                self._data = open(self.out / f".shard-{len(self.shards):05d}.data", "w+b")
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
    tied = _tied_names(model)
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(prefix + ".") and k not in tied}


def save_config(model: nn.Module, tokenizer, out_dir: Path) -> None:
    model.config.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- layer I/O

class InMemoryLayers:
    """Layer source/sink of the in-memory path: every layer is already there."""

    streaming = False

    def load(self, index: int, layer: nn.Module) -> None:
        pass

    def done(self, index: int, layer: nn.Module) -> None:
        trim_heap()  # the layer's dense weights and temporaries are gone: give their pages back


class StreamingLayers:
    """Layer source (checkpoint shards) and sink (output shards) for `compress_layers`."""

    streaming = True

    def __init__(self, reader: CheckpointReader, prefix: str, dtype: torch.dtype, device,
                 writer: ShardWriter | None = None, config=None):
        self.reader, self.prefix, self.dtype, self.device = reader, prefix, dtype, device
        self.writer, self.config = writer, config
        self.loaded_bytes = 0

    def load(self, index: int, layer: nn.Module) -> None:
        materialize(layer, f"{self.prefix}.{index}", self.reader, self.dtype, self.device, self.config)
        self.loaded_bytes += sum(t.numel() * t.element_size() for t in layer.state_dict().values())

    def done(self, index: int, layer: nn.Module) -> None:
        if self.writer is not None:
            self.writer.add({f"{self.prefix}.{index}.{k}": v for k, v in layer.state_dict().items()})
        release(layer)
        trim_heap()


_LIBC = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`).

    Each layer allocates and frees hundreds of MB in mid-sized blocks (weights, casts, fp64
    temporaries, safetensors headers) between small long-lived objects; glibc keeps the freed
    pages, so without this RSS creeps up with the number of layers processed although nothing
    stays live (measured: +1.1 GiB over 400 layers of the 12 GiB bench model). A no-op
    where there is no glibc."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


# ----------------------------------------------------------------------------- activations

class DiskTensor:
    """An [N, ...] tensor in an unlinked temporary file, sliced along dim 0 (pread/pwrite).

    Supports what the layer loop does with activation buffers: `x[lo:hi]` (a tensor on
    `device`), `x[lo:hi] = t`, `.shape`, `.dtype`, `.device`.
    """

    def __init__(self, shape, dtype: torch.dtype, device, directory: str | None = None):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.row_bytes = int(torch.Size(self.shape[1:]).numel()) * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="svdforge-act-", suffix=".bin", dir=directory)
        os.unlink(path)   # freed by the OS when closed, even after a crash
        os.ftruncate(fd, self.row_bytes * self.shape[0])
        self.fd = fd

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]

    def _range(self, s) -> tuple[int, int]:
        if not isinstance(s, slice):
            raise TypeError("DiskTensor supports only slices along dim 0")
        lo, hi, step = s.indices(self.shape[0])
        if step != 1:
            raise TypeError("DiskTensor supports only contiguous slices")
        return lo, hi

    def __getitem__(self, s) -> torch.Tensor:
        lo, hi = self._range(s)
        out = torch.empty((hi - lo, *self.shape[1:]), dtype=self.dtype)
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        off, pos = lo * self.row_bytes, 0
        while pos < len(buf):
            n = os.preadv(self.fd, [buf[pos:]], off + pos)
            if n <= 0:
                raise OSError("short read from the activation store")
            pos += n
        return out.to(self.device)

    def __setitem__(self, s, value: torch.Tensor) -> None:
        lo, hi = self._range(s)
        t = value.detach().to("cpu", self.dtype).contiguous()
        if t.shape != (hi - lo, *self.shape[1:]):
            raise ValueError(f"shape {tuple(t.shape)} does not fit rows {lo}:{hi} of {tuple(self.shape)}")
        buf = memoryview(t.view(torch.uint8).numpy()).cast("B")
        off, pos = lo * self.row_bytes, 0
        while pos < len(buf):
            pos += os.pwrite(self.fd, buf[pos:], off + pos)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


class ActivationStore:
    """Allocates the layer loop's [N, L, hidden] buffers: in memory (on `device`) while the
    total stays under `budget_bytes`, else as `DiskTensor`s in `directory`."""

    def __init__(self, device, budget_bytes: float | None = None, directory: str | None = None):
        self.device = device
        self.budget = float("inf") if budget_bytes is None else budget_bytes
        self.directory = directory
        self.in_memory_bytes = 0
        self.on_disk_bytes = 0

    def empty(self, shape, dtype: torch.dtype):
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if self.in_memory_bytes + nbytes <= self.budget:
            self.in_memory_bytes += nbytes
            return torch.empty(shape, dtype=dtype, device=self.device)
        self.on_disk_bytes += nbytes
        return DiskTensor(shape, dtype, self.device, self.directory)

    def empty_like(self, x, dtype: torch.dtype | None = None):
        return self.empty(x.shape, dtype or x.dtype)

    def copy(self, x, dtype: torch.dtype | None = None, batch: int = 8):
        """A new buffer holding x (cast to dtype), copied batch by batch."""
        if torch.is_tensor(x) and (dtype is None or x.dtype == dtype) and self.budget == float("inf"):
            return x.clone()
        out = self.empty_like(x, dtype)
        for lo in range(0, x.shape[0], batch):
            out[lo:lo + batch] = x[lo:lo + batch].to(out.dtype)
        return out

    def cast(self, x, dtype: torch.dtype):
        """x in dtype (x itself when it already is)."""
        return x if x.dtype == dtype else self.copy(x, dtype)

    def report(self) -> dict:
        return {"in_memory_bytes": self.in_memory_bytes, "on_disk_bytes": self.on_disk_bytes,
                "budget_bytes": None if self.budget == float("inf") else int(self.budget)}


def default_activation_budget(device) -> int:
    """A quarter of the memory available now on the device that holds the activations."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.25)
    import psutil

    return int(psutil.virtual_memory().available * 0.25)


# ----------------------------------------------------------------------------- the pipeline's side

GiB = 2**30
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def dense_bytes(source: str, dtype: str) -> int:
    """Bytes of the dense weights once loaded in `dtype` (from the shard sizes on disk)."""
    p = Path(source)
    on_disk = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    try:
        cfg = json.loads((p / "config.json").read_text())
        stored = str(cfg.get("dtype") or cfg.get("torch_dtype") or dtype).replace("torch.", "")
    except (OSError, ValueError):
        stored = dtype
    return int(on_disk * _BYTES.get(dtype, 4) / _BYTES.get(stored, 4))


def whole_model_needs(config, model_bytes: int | None = None) -> list[str]:
    """What in this job needs the whole model in memory (so it cannot stream)."""
    from svdforge.core.methods import get_method

    out = []
    if "fisher" in get_method(config.method).needs:
        out.append("fwsvd's Fisher information needs gradients of the loss through the whole model")
    if config.allocation == "global":
        out.append("global allocation ranks every linear from a dense pass over all layers before the first "
                   "is compressed (not streamed yet)")
    if config.recover.type in ("lora", "adalora"):
        kl = config.recover.objective != "ntp"
        size = ""
        if model_bytes:
            need = (1 - config.ratio) * model_bytes + (model_bytes if kl else 0)
            size = f" (at least {need / GiB:.1f} GiB before activations)"
        out.append(f"{config.recover.type} recovery back-propagates through the whole compressed model: it needs "
                   "the compressed weights, the adapters with their gradients and optimizer state"
                   + (" and the dense teacher for the KL objective" if kl else "") + f" in memory at once{size}")
    return out


def decide(config, source: str, gguf_file: str | None) -> tuple[bool, str]:
    """(stream?, why). `on` with something that cannot stream raises UserError saying what."""
    if config.streaming == "off":
        return False, "streaming off"
    local = not gguf_file and is_streamable(source)
    blockers = whole_model_needs(config, dense_bytes(source, config.dtype) if local else None)
    if not local:
        blockers.insert(0, "the model is not a local safetensors folder (GGUF and pickle weights load whole)")
    if config.streaming == "on":
        if blockers:
            raise UserError("streaming is not possible for this job: " + "; ".join(blockers)
                            + ". Use streaming 'off' (the whole model must then fit in memory)")
        return True, "streaming on"
    import psutil

    need = dense_bytes(source, config.dtype) * (2 if config.evaluation.enabled else 1)
    avail = psutil.virtual_memory().available
    if need <= 0.6 * avail:
        return False, f"the model fits in memory ({need / GiB:.1f} GiB of {avail / GiB:.1f} GiB available)"
    if blockers and dense_bytes(source, config.dtype) > avail:
        raise UserError(f"the model needs {dense_bytes(source, config.dtype) / GiB:.1f} GiB in memory, "
                        f"{avail / GiB:.1f} GiB are available, and this job cannot stream: {'; '.join(blockers)}")
    if blockers:
        return False, (f"the model needs {need / GiB:.1f} GiB ({avail / GiB:.1f} GiB available) but cannot "
                       f"stream: {'; '.join(blockers)}")
    return True, f"the model needs {need / GiB:.1f} GiB, over 60% of the {avail / GiB:.1f} GiB available"


class StreamingJob:
    """Everything a streaming `compress` holds: skeleton, reader, writer, activation store."""

    def __init__(self, config, source: str, device, out_dir: Path):
        import copy

        from svdforge.core.calibrate import decoder_layers

        self.config, self.source, self.device, self.out = config, source, device, Path(out_dir)
        self.dtype = _DTYPES[config.dtype]
        self.model, self.reader, self.prefix = build_skeleton(source, config.dtype, device, config.trust_remote_code)
        layers, _ = decoder_layers(self.model)
        self.dense_layers = copy.deepcopy(layers)   # meta: the dense structure, for evaluation
        self.writer = ShardWriter(self.out, MAX_SHARD_BYTES)
        self.layers = StreamingLayers(self.reader, self.prefix, self.dtype, device, self.writer, self.model.config)
        budget = config.max_activation_bytes
        self.store = ActivationStore(device, default_activation_budget(device) if budget is None else budget,
                                     os.environ.get("SVDFORGE_TMP"))

    def save(self, tokenizer) -> None:
        self.writer.add(non_layer_state(self.model, self.prefix))
        self.writer.close()
        save_config(self.model, tokenizer, self.out)

    def report(self, reason: str) -> dict:
        return {"enabled": True, "reason": reason, "checkpoint_bytes": self.reader.nbytes(),
                "layer_bytes_loaded": self.layers.loaded_bytes, "activations": self.store.report()}


@torch.no_grad()
def stream_compare(job: StreamingJob, windows: torch.Tensor, batch_size: int, on_batch=None) -> dict:
    """`svdforge.core.evaluate.compare` for a streamed model: the teacher's and the student's hidden
    states of the evaluation windows go through the decoder one layer at a time (dense layer
    from the checkpoint, compressed layer from the artifact just written), then the final
    norm and `lm_head`. Holds two [N, L, hidden] streams (offloaded past the budget) and one
    layer. Assumes logits = lm_head(norm(h)) (Llama, Mistral, Qwen2; not soft-capped ones)."""
    from svdforge.core.calibrate import capture_layer0_inputs, decoder_layers, run_layer
    from svdforge.core.evaluate import Fidelity

    model, prefix, dev = job.model, job.prefix, job.device
    layers, _ = decoder_layers(model)
    art = CheckpointReader(job.out)
    inputs = capture_layer0_inputs(model, windows, batch_size, dev, alloc=job.store.empty)
    streams = {"teacher": inputs.hidden, "student": job.store.copy(inputs.hidden)}
    scratch = job.store.empty_like(inputs.hidden)
    n = len(layers)
    for li in range(n):
        for who, layer, reader in (("teacher", job.dense_layers[li], job.reader), ("student", layers[li], art)):
            materialize(layer, f"{prefix}.{li}", reader, job.dtype, dev, model.config)
            inputs.hidden = streams[who]
            run_layer(layer, inputs, out=scratch)
            streams[who], scratch = scratch, streams[who]
            release(layer)
        if on_batch:
            on_batch(0.9 * (li + 1) / n)
    base = getattr(model, model.base_model_prefix)
    norm = next((getattr(base, a) for a in ("norm", "final_layernorm", "ln_f") if hasattr(base, a)), None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise UserError("streaming evaluation cannot find the final norm / lm_head of this architecture")
    acc = Fidelity()
    for lo, hi, _ in inputs.batches():
        batch = windows[lo:hi].to(dev)
        lt = head(norm(streams["teacher"][lo:hi]))[:, :-1]
        ls = head(norm(streams["student"][lo:hi]))[:, :-1]
        acc.add(lt, ls, batch)
    return acc.result()
