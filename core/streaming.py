"""Streaming: compress (and evaluate) a model that does not fit in host or device memory.

The layer loop (`svdforge.core.layer_loop`) is the same one the in-memory path uses; a
streaming job gives it

- a **skeleton** (`svdforge.core.checkpoint.build_skeleton`): the model on the meta device
  with only the embeddings, final norm, `lm_head` and rotary buffers materialised;
- a **layer source/sink** (`StreamingLayers`): before layer l is calibrated its weights are
  read from the checkpoint's shards, and after it is decomposed its state dict (factors and
  untouched tensors) goes to the output `ShardWriter` and the layer returns to meta;
- an **activation store** with a byte budget (`svdforge.core.activations.ActivationStore`).

Host (and device) memory then holds the embeddings and head, one decoder layer (dense and
its factors), the activation buffers that fit the budget, and that layer's Grams. This
module also decides whether a job streams (`decide`).

The artifact is the same format-2 folder as the in-memory path writes
(`svdforge.core.artifact`): `<name>.u.weight` / `<name>.v.weight` for compressed linears.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from svdforge.core.activations import ActivationStore, default_activation_budget
from svdforge.core.artifact import make_loadable, ranks_of
from svdforge.core.checkpoint import (
    DTYPES,
    MAX_SHARD_BYTES,
    CheckpointReader,
    ShardWriter,
    build_skeleton,
    is_streamable,
    materialize,
    non_layer_state,
    release,
    save_config,
)
from svdforge.core.errors import UserError
from svdforge.core.layers import decoder_layers
from svdforge.core.memory import GiB, trim_heap
from svdforge.core.methods import get_method


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
    out = []
    if "fisher" in get_method(config.method).needs:
        out.append("fwsvd's Fisher information needs gradients of the loss through the whole model")
    if config.allocation == "global":
        out.append("global allocation ranks every linear from a dense pass over all layers before the first "
                   "is compressed (not streamed yet)")
    if config.allocation == "loss":
        out.append("loss-aware allocation back-propagates through the whole dense model")
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
        self.config, self.source, self.device, self.out = config, source, device, Path(out_dir)
        self.dtype = DTYPES[config.dtype]
        self.model, self.reader, self.prefix = build_skeleton(source, config.dtype, device, config.trust_remote_code)
        layers, _ = decoder_layers(self.model)
        self.dense_layers = copy.deepcopy(layers)   # meta: the dense structure, for evaluation
        self.writer = ShardWriter(self.out, MAX_SHARD_BYTES)
        self.layers = StreamingLayers(self.reader, self.prefix, self.dtype, device, self.writer, self.model.config)
        budget = config.max_activation_bytes
        self.store = ActivationStore(device, default_activation_budget(device) if budget is None else budget,
                                     os.environ.get("SVDFORGE_TMP"))

    def spectra_io(self) -> tuple[StreamingLayers, ActivationStore]:
        """A read-only layer source and its own activation store, for a pass before the compression
        (the spectra of rank rounding): each layer is read from the checkpoint, then released."""
        return (StreamingLayers(self.reader, self.prefix, self.dtype, self.device, None, self.model.config),
                ActivationStore(self.device, self.store.budget, os.environ.get("SVDFORGE_TMP")))

    def save(self, tokenizer) -> None:
        self.writer.add(non_layer_state(self.model, self.prefix))
        self.writer.close()
        save_config(self.model, tokenizer, self.out)
        make_loadable(self.out, ranks_of(self.model))

    def report(self, reason: str) -> dict:
        return {"enabled": True, "reason": reason, "checkpoint_bytes": self.reader.nbytes(),
                "layer_bytes_loaded": self.layers.loaded_bytes, "activations": self.store.report()}
