"""The one loop over decoder layers, and the handlers that do a job's work inside it.

Every pass svdforge makes over a model's decoder layers is this loop: calibration and
decomposition (`svdforge.core.decompose.compress_layers`), the spectra of global rank
allocation (`svdforge.core.allocation.whitened_spectra`), a sweep's shared calibration,
and streamed evaluation (`svdforge.core.evaluate.compare_streamed`). What differs between
them is which `Handler`s run at the named points of each layer:

    on_start(loop)                      once, before layer 0 (layer 0's inputs are ready)
    per layer:
      on_layer_start(step)              the layer's weights are in memory (streamed: just read)
      calibration forward, if any handler needs one:
        on_inputs_ready(step)           register hooks on `step.forward` through `step.hooks`
        per batch: on_batch_start(step), the calibrating streams in order, on_batch_end(step)
        on_statistics(step)             hooks are gone; the layer's statistics are complete
      on_decompose(step)                replace / factorize the layer's linears (timed as `decompose`)
      the next layer's inputs are computed (`Stream`)
      on_layer_done(step)               before the layer is written and released (streamed)
    on_finish(loop)

The loop owns the order, the activation buffers, the dtype of the forward passes and the
layer I/O (in memory, or read from and written to safetensors shards: `svdforge.core.streaming`);
handlers own the math. llm-compressor's sequential pipeline and modifier lifecycle have
the same shape.

Streams. The hidden states of the calibration windows on one path through the decoder.
Calibration has `main` (sequential mode: the outputs of the already compressed layers;
parallel: the dense model's) and, for the closed-form update, `dense` (always the dense
model's), which runs first in every batch. Streamed evaluation has `teacher` and `student`,
each through its own module and no calibration forward. A stream's next inputs are either
its calibration-forward outputs (`reuse`) or a fresh forward through `module(step)` once
the layer is decomposed.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from svdforge.core.activations import ActivationStore
from svdforge.core.hooks import Hooks
from svdforge.core.layers import decoder_layers, select_linears
from svdforge.core.memory import trim_heap
from svdforge.core.progress import Reporter


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering the current layer [N, L, H] and per-batch layer kwargs."""

    hidden: torch.Tensor
    kwargs: list[dict]
    batch_size: int

    def batches(self):
        for i, kw in enumerate(self.kwargs):
            lo = i * self.batch_size
            yield lo, min(lo + self.batch_size, self.hidden.shape[0]), kw


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device,
                          alloc: Callable | None = None) -> LayerInputs:
    """Hidden states entering layer 0 (in a buffer from `alloc(shape, dtype)`, default a tensor
    on `device`) and the keyword arguments the model passes its layers, per batch. Only the
    embeddings run: a pre-hook on layer 0 stops the forward there."""
    layers, _ = decoder_layers(model)
    store: dict = {}

    def pre_hook(_mod, args, kwargs):
        store["hidden"] = args[0] if args else kwargs["hidden_states"]
        store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    hidden, kwargs = None, []
    with Hooks() as hooks:
        hooks.pre(layers[0], pre_hook, with_kwargs=True)
        for lo in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[lo:lo + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            h = store["hidden"]
            if hidden is None:
                shape = (ids.shape[0], *h.shape[1:])
                hidden = alloc(shape, h.dtype) if alloc else torch.empty(shape, dtype=h.dtype, device=device)
            hidden[lo:lo + h.shape[0]] = h
            kwargs.append(store["kwargs"])
    return LayerInputs(hidden, kwargs, batch_size)


def layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, out=None, check_cancel: Callable[[], None] | None = None):
    """`layer` over every batch of `inputs`, into `out` (a new tensor by default);
    `check_cancel()` (raises `Cancelled`) before each batch."""
    if out is None:
        out = torch.empty_like(inputs.hidden)
    for lo, hi, kw in inputs.batches():
        if check_cancel is not None:
            check_cancel()
        out[lo:hi] = layer_output(layer(inputs.hidden[lo:hi], **kw))
    return out


def cast_kwargs(kw: dict, dtype: torch.dtype) -> dict:
    def cast(v):
        if torch.is_tensor(v) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(t) for t in v)
        return v
    return {k: cast(v) for k, v in kw.items()}


def forward_copy(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The layer itself when it already runs in `dtype`, else a copy cast to it."""
    p = next(layer.parameters())
    return layer if p.dtype == dtype else copy.deepcopy(layer).to(dtype)


@dataclass
class Stream:
    """One path of hidden states through the decoder (see the module doc).

    calibrate: the stream runs in the calibration forward (through `step.forward`, with the
    handlers' hooks seeing `step.stream == name`). reuse: its next inputs are those
    calibration outputs; otherwise they come from `module(step)`, entered after the layer is
    decomposed (default: a forward copy of the layer as it is then)."""

    name: str
    calibrate: bool = True
    reuse: bool = True
    module: Callable[[LayerStep], AbstractContextManager[nn.Module]] | None = None
    hidden: object = None          # [N, L, H] tensor or DiskTensor
    pending: object = None         # its calibration-forward outputs of the current layer


@dataclass
class LayerStep:
    """What the handlers see of the current layer."""

    index: int
    name: str                       # e.g. "model.layers.3"
    layer: nn.Module                # the model's own layer: decomposed linears go here
    linears: list[tuple[str, nn.Linear]]   # its target linears
    n_layers: int
    forward: nn.Module | None = None       # what the calibration forward runs (a cast copy)
    forward_linears: list[tuple[str, nn.Linear]] = field(default_factory=list)
    hooks: Hooks | None = None
    stream: str | None = None       # the stream the calibration forward is running now
    state: dict = field(default_factory=dict)   # the handlers' results for this layer


class Handler:
    """A job's part in the layer loop: override the points it needs (all are no-ops here).

    `needs_forward` (read after `on_start`): whether this handler needs the calibration
    forward of each layer (statistics from a cache do not)."""

    needs_forward: bool = False

    def on_start(self, loop: LayerLoop) -> None: ...
    def on_layer_start(self, step: LayerStep) -> None: ...
    def on_inputs_ready(self, step: LayerStep) -> None: ...
    def on_batch_start(self, step: LayerStep) -> None: ...
    def on_batch_end(self, step: LayerStep) -> None: ...
    def on_statistics(self, step: LayerStep) -> None: ...
    def on_decompose(self, step: LayerStep) -> None: ...
    def on_layer_done(self, step: LayerStep) -> None: ...
    def on_finish(self, loop: LayerLoop) -> None: ...


class InMemoryLayers:
    """Layer source and sink of the in-memory path: every layer is already there."""

    streaming = False

    def load(self, index: int, layer: nn.Module) -> None:
        pass

    def done(self, index: int, layer: nn.Module) -> None:
        trim_heap()  # the layer's dense weights and temporaries are gone: give their pages back


class LayerLoop:
    """Walks the decoder layers of `model` once, calling `handlers` at the named points.

    ids: the token windows [N, L] whose hidden states flow through the layers (None: no
    forward at all, e.g. every statistic comes from a cache). streams: their paths, in the
    order they run (a `Stream`'s `reuse` says where its next inputs come from: sequential
    calibration re-runs the decomposed layer, parallel reuses the dense outputs). forward_dtype: dtype of
    every forward (a cast copy of one layer at a time). layer_io: `load(i, layer)` /
    `done(i, layer)` around each layer (streaming reads and writes shards there).
    activations: allocator of the [N, L, H] buffers (in memory up to a budget, then disk).
    `timings` holds `calibrate` (everything but decomposition) and `decompose` seconds."""

    def __init__(self, model: nn.Module, handlers: list[Handler], *, streams: list[Stream],
                 ids: torch.Tensor | None = None, batch_size: int = 8, device="cpu",
                 forward_dtype: torch.dtype | None = None,
                 targets: str = "all", layer_io=None, activations: ActivationStore | None = None,
                 reporter: Reporter | None = None):
        self.model, self.handlers, self.ids = model, handlers, ids
        self.batch_size, self.device, self.forward_dtype, self.targets = batch_size, device, forward_dtype, targets
        self.layers, self.prefix = decoder_layers(model)
        self.streams = streams
        self.io = layer_io or InMemoryLayers()
        self.store = activations or ActivationStore(device)
        self.rep = reporter or Reporter()
        self.timings = {"calibrate": 0.0, "decompose": 0.0}
        self.kwargs: list[dict] = []
        self._spare: list = []
        self.calibrating = False

    def _each(self, point: str, arg) -> None:
        for h in self.handlers:
            getattr(h, point)(arg)

    @contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] += time.perf_counter() - t0

    @torch.no_grad()
    def run(self) -> LayerLoop:
        self._each("on_start", self)
        self.calibrating = any(h.needs_forward for h in self.handlers) and any(s.calibrate for s in self.streams)
        if self.ids is not None and (self.calibrating or any(not s.calibrate for s in self.streams)):
            with self._timed("calibrate"):
                self._start_streams()
        for index, layer in enumerate(self.layers):
            self.rep.check_cancel()
            self._one_layer(index, layer)
        self._each("on_finish", self)
        return self

    def _start_streams(self) -> None:
        inputs = capture_layer0_inputs(self.model, self.ids, self.batch_size, self.device, alloc=self.store.empty)
        fdt = self.forward_dtype or inputs.hidden.dtype
        self.forward_dtype = fdt
        first = self.store.cast(inputs.hidden, fdt)
        self.kwargs = [cast_kwargs(kw, fdt) for kw in inputs.kwargs]
        for i, s in enumerate(self.streams):
            s.hidden = first if i == 0 else self.store.copy(first)

    def _one_layer(self, index: int, layer: nn.Module) -> None:
        name = f"{self.prefix}.{index}"
        with self._timed("calibrate"):
            self.io.load(index, layer)
            step = LayerStep(index, name, layer, select_linears(layer, name, self.targets), len(self.layers))
            self._each("on_layer_start", step)
            if self.calibrating:
                self._calibration_forward(step)
        with self._timed("decompose"):
            self._each("on_decompose", step)
        with self._timed("calibrate"):
            if self.streams and self.streams[0].hidden is not None:
                self._propagate(step)
            self._each("on_layer_done", step)
            self.io.done(index, layer)

    def _buffer(self):
        return self._spare.pop() if self._spare else self.store.empty_like(self.streams[0].hidden)

    def _calibration_forward(self, step: LayerStep) -> None:
        step.forward = forward_copy(step.layer, self.forward_dtype)
        step.forward_linears = select_linears(step.forward, step.name, self.targets)
        calibrating = [s for s in self.streams if s.calibrate]
        for s in calibrating:
            s.pending = self._buffer()
        with Hooks() as step.hooks:
            self._each("on_inputs_ready", step)
            for lo, hi, kw in self._batches():
                self.rep.check_cancel()  # a long layer (many windows) stops mid-way
                self._each("on_batch_start", step)
                for s in calibrating:
                    step.stream = s.name
                    s.pending[lo:hi] = layer_output(step.forward(s.hidden[lo:hi], **kw))
                step.stream = None
                self._each("on_batch_end", step)
        step.forward, step.forward_linears, step.hooks = None, [], None
        self._each("on_statistics", step)

    def _batches(self):
        return LayerInputs(self.streams[0].hidden, self.kwargs, self.batch_size).batches()

    def _propagate(self, step: LayerStep) -> None:
        for s in self.streams:
            if s.pending is not None and s.reuse:
                self._spare.append(s.hidden)
                s.hidden, s.pending = s.pending, None
                continue
            if s.pending is not None:
                self._spare.append(s.pending)
                s.pending = None
            out = self._buffer()
            with (s.module or self._current_layer)(step) as module:
                run_layer(module, LayerInputs(s.hidden, self.kwargs, self.batch_size), out=out,
                          check_cancel=self.rep.check_cancel)
            self._spare.append(s.hidden)
            s.hidden = out

    @contextmanager
    def _current_layer(self, step: LayerStep) -> Iterator[nn.Module]:
        yield forward_copy(step.layer, self.forward_dtype)
