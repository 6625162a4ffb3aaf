"""Layer-by-layer calibration and decomposition (SPEC stages 1-2).

Only one decoder layer's activations and statistics live at a time:

1. run the embeddings once, catching the inputs of decoder layer 0 (hidden states and the
   keyword arguments the model passes its layers: rotary embeddings, masks); the rest of the
   model, `lm_head` included, never runs during calibration;
2. for each layer: forward the N windows through it with hooks that accumulate, per distinct
   linear input, what the method needs (a Gram matrix shared by q/k/v and by gate/up,
   mean |x|); decompose every target linear and swap in a `LowRankLinear`; produce the next
   layer's inputs.

`sequential` mode feeds layer l+1 the outputs of the compressed layer l (the compression
errors of earlier layers are seen, and partly absorbed, by later ones); `parallel` mode
feeds it the dense layer's outputs (one forward per layer instead of two).
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from svdforge.core.config import UPDATE_MIX
from svdforge.core.errors import NumericalError, UserError
from svdforge.core.linalg import saves_params, uniform_rank
from svdforge.core.lowrank import LowRankLinear, set_submodule
from svdforge.core.methods import InputStats, Method
from svdforge.core.progress import Reporter

ATTENTION = re.compile(r"(^|\.)(self_attn|attention|attn)\.")
MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn)\.")


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers and their name prefix (e.g. `model.layers`)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return mod, name
    raise UserError("could not find the decoder layers of this model (no ModuleList of num_hidden_layers)")


def select_linears(layer: nn.Module, prefix: str, targets: str) -> list[tuple[str, nn.Linear]]:
    """Target linears of one layer as (full name, module), in execution-friendly order."""
    out = []
    for local, mod in layer.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, LowRankLinear):
            continue
        full = f"{prefix}.{local}"
        if targets == "all":
            ok = True
        elif targets == "attention":
            ok = bool(ATTENTION.search(full))
        elif targets == "mlp":
            ok = bool(MLP.search(full))
        else:
            ok = re.search(targets[3:], full) is not None
        if ok:
            out.append((full, mod))
    return out


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
    on `device`) and the keyword arguments the model passes its layers, per batch."""
    layers, _ = decoder_layers(model)
    store: dict = {}

    def pre_hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        store["hidden"] = hs
        store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    hidden, kwargs = None, []
    try:
        for lo in range(0, ids.shape[0], batch_size):
            batch = ids[lo:lo + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            h = store["hidden"]
            if hidden is None:
                shape = (ids.shape[0], *h.shape[1:])
                hidden = alloc(shape, h.dtype) if alloc else torch.empty(shape, dtype=h.dtype, device=device)
            hidden[lo:lo + h.shape[0]] = h
            kwargs.append(store["kwargs"])
    finally:
        handle.remove()
    return LayerInputs(hidden, kwargs, batch_size)


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(inputs.hidden)
    for lo, hi, kw in inputs.batches():
        out[lo:hi] = _layer_out(layer(inputs.hidden[lo:hi], **kw))
    return out


class StatsCollector:
    """Forward pre-hooks that accumulate input statistics once per distinct input tensor.

    Linears fed the very same tensor object (q/k/v, gate/up) are grouped on the first
    batch; the group's statistics are computed once per batch. The tensors are held until
    the batch ends so that their identity cannot be recycled by the allocator.
    """

    def __init__(self, linears: list[tuple[str, nn.Linear]], needs: frozenset[str], stop_early: bool = False):
        self.linears = linears
        self.needs = needs
        self.stop_early = stop_early   # raise _Stop once the last linear's input is seen
        self.order: list[str] = []
        self.batches_seen = 0
        self.group_of: dict[str, int] = {}
        self.stats: list[InputStats] = []
        self._batch_inputs: list[tuple[torch.Tensor, int]] = []
        self._done: set[int] = set()
        self._handles = []
        self.paused = False     # True while the same modules run on another stream (update)

    def __enter__(self):
        for name, mod in self.linears:
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batch_inputs.clear()

    def new_batch(self) -> None:
        self._batch_inputs.clear()
        self._done.clear()
        self.batches_seen += 1

    def _hook(self, name: str) -> Callable:
        def fn(_mod, args):
            if self.paused:
                return
            x = args[0]
            g = self.group_of.get(name)
            if g is None:
                g = next((gi for t, gi in self._batch_inputs if t is x), None)
                if g is None:
                    g = len(self.stats)
                    self.stats.append(InputStats())
                self.group_of[name] = g
            if not any(t is x for t, _ in self._batch_inputs):
                self._batch_inputs.append((x, g))
            if g not in self._done:
                self._done.add(g)
                self._accumulate(self.stats[g], x)
            if self.stop_early and self.batches_seen > 1 and name == self.order[-1]:
                raise _Stop  # the rest of the layer's forward is not needed
        return fn

    def _accumulate(self, st: InputStats, x: torch.Tensor) -> None:
        x_in = x.reshape(-1, x.shape[-1])
        x2 = x_in.float()
        if not torch.isfinite(x2).all():
            raise NumericalError("non-finite activations during calibration")
        st.tokens += x2.shape[0]
        if "gram" in self.needs:
            g = gram_of(x_in).double()
            st.gram = g if st.gram is None else st.gram.add_(g)
        if "abs_mean" in self.needs:
            a = x2.abs().sum(0).double()
            st.abs_sum = a if st.abs_sum is None else st.abs_sum.add_(a)

    def stats_for(self, name: str) -> InputStats:
        return self.stats[self.group_of[name]]

    def groups(self) -> dict[str, list[str]]:
        out: dict[int, list[str]] = {}
        for name, g in self.group_of.items():
            out.setdefault(g, []).append(name.rsplit(".", 1)[-1])
        return {"+".join(v): v for v in out.values()}


def gram_of(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x^T y (x^T x without y) for one batch of token rows; the caller sums batches in fp64.

    Activations of a bf16 calibration forward are multiplied in bf16: the kernel accumulates
    in fp32 and rounds each batch's result to bf16. That is 4x faster than fp32 on CPUs with
    AVX512-BF16 (1536-wide input, 4096 tokens: 0.39 vs 1.58 s), where the Gram products were
    the largest single cost of calibration, and measured harmless: SmolLM2 at 0.4, PPL 99.30
    with bf16 Grams vs 99.48 with fp32 ones (32 x 512 calibration windows, 4096 test tokens).
    The inputs are exact in bf16 already; only the per-batch rounding is new. Any other
    dtype is multiplied in fp32.
    """
    y = x if y is None else y
    if x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16:
        return x.T @ y
    return x.float().T @ y.float()


class CrossMoments:
    """C = sum x_dense x_compressed^T per distinct linear input, for the closed-form update.

    The same dense layer runs on the dense stream and then on the compressed stream; a
    forward pre-hook keeps each distinct input tensor of each phase (q/k/v share one, gate/up
    share one, as in `StatsCollector`) until `accumulate` pairs them token by token.
    """

    def __init__(self, linears: list[tuple[str, nn.Linear]]):
        self.linears = linears
        self.key_of: dict[str, str] = {}
        self.moments: dict[str, torch.Tensor] = {}
        self._held: dict[str, dict[str, torch.Tensor]] = {"dense": {}, "compressed": {}}
        self._phase: str | None = None

    def capture(self, phase: str):
        collector = self

        class _Ctx:
            def __enter__(self):
                collector._phase = phase
                collector._held[phase] = {}
                self.handles = [m.register_forward_pre_hook(collector._hook(n)) for n, m in collector.linears]

            def __exit__(self, *exc):
                for h in self.handles:
                    h.remove()
                collector._phase = None
        return _Ctx()

    def _hook(self, name: str) -> Callable:
        def fn(_mod, args):
            x = args[0]
            held = self._held[self._phase]
            key = next((k for k, t in held.items() if t is x), None)
            if key is None:
                key = self.key_of.get(name, name)
                held[key] = x
            self.key_of.setdefault(name, key)
        return fn

    def accumulate(self) -> None:
        dense, comp = self._held["dense"], self._held["compressed"]
        for key, xc in comp.items():
            xd = dense[key]
            c = gram_of(xd.reshape(-1, xd.shape[-1]), xc.reshape(-1, xc.shape[-1])).double()
            self.moments[key] = c if key not in self.moments else self.moments[key].add_(c)
        self._held = {"dense": {}, "compressed": {}}

    def moment_for(self, name: str) -> torch.Tensor:
        return self.moments[self.key_of[name]]


RankFn = Callable[[str, int, int], int | None]


def uniform_ranks(ratio: float) -> RankFn:
    return lambda name, m, n: uniform_rank(m, n, ratio)


@dataclass
class CalibrationResult:
    ranks: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"calibrate": 0.0, "decompose": 0.0})
    shared_inputs: list[list[str]] = field(default_factory=list)


@dataclass
class SweepTarget:
    """One ratio of a sweep (`compress_layers(..., sweep=[...])`): its rank function, and what
    the layer loop builds for it: the `LowRankLinear` of every compressed linear (by full
    name, not yet in any model), the ranks, and the time spent truncating for it alone."""

    rank_fn: RankFn
    result: CalibrationResult = field(default_factory=CalibrationResult)
    modules: dict[str, nn.Module] = field(default_factory=dict)


def collect_fisher(model: nn.Module, ids: torch.Tensor, names: list[str], device) -> dict[str, torch.Tensor]:
    """Squared gradients of the LM loss w.r.t. each named weight, one window at a time."""
    params = {n: model.get_submodule(n).weight for n in names}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for i in range(ids.shape[0]):
            batch = ids[i:i + 1].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise NumericalError("non-finite loss while estimating Fisher information")
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, g in zip(params, grads):
                fisher[n].add_(g.float().pow(2))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return fisher


def _cast_kwargs(kw: dict, dtype: torch.dtype) -> dict:
    def cast(v):
        if torch.is_tensor(v) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(t) for t in v)
        return v
    return {k: cast(v) for k, v in kw.items()}


def _forward_copy(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The layer itself when it already runs in `dtype`, else a copy cast to it."""
    p = next(layer.parameters())
    return layer if p.dtype == dtype else copy.deepcopy(layer).to(dtype)


@torch.no_grad()
def compress_layers(model: nn.Module, ids: torch.Tensor, method: Method, rank_fn: RankFn, *,
                    targets: str = "all", mode: str = "sequential", batch_size: int = 8,
                    device="cpu", fisher: dict[str, torch.Tensor] | None = None,
                    reporter: Reporter | None = None, method_options: dict | None = None,
                    forward_dtype: torch.dtype | None = None, update: bool = False,
                    update_mix: float | None = None, layer_io=None, activations=None, stats_cache=None,
                    sweep: list[SweepTarget] | None = None) -> CalibrationResult:
    """Compress the target linears of every decoder layer in place. Returns ranks and timings.

    sweep: several ratios from one calibration. The model stays dense; for every target
    linear the method's decomposition of the scaled weight (whitening + eigendecomposition)
    is computed once and truncated at each `SweepTarget`'s rank, whose modules, ranks and
    per-target truncation time it receives (`rank_fn` is unused). Needs `parallel` mode:
    only then do the statistics not depend on the ratio. The result's timings add
    `decompose_shared`, the part of `decompose` that one ratio alone would also have spent.

    layer_io: where layer l's weights come from and go (`svdforge.core.streaming.StreamingLayers`:
    read from the checkpoint's shards before, written to the output shards and dropped
    after); default: the layers are in memory already.
    activations: allocator of the [N, L, hidden] buffers (`svdforge.core.streaming.ActivationStore`,
    in memory up to a budget, then on disk); default: tensors on `device`.
    stats_cache: `svdforge.core.stats_cache.StatsCache`; when it holds this calibration, every layer
    is decomposed from the cached statistics with no forward pass, else they are stored.

    forward_dtype: dtype of the calibration forward passes (a cast copy of one layer at a
    time); statistics are accumulated in fp32/fp64 and the factors always come from the
    original weights in fp64.

    update: after factorizing each linear, replace W_u by the closed-form least-squares
    update of SVD-LLM (`svdforge.core.recover.least_squares_update`). It needs a second, dense stream
    of hidden states next to the compressed one (the dense model's own activations), so that
    the target can include what the dense model computes, and therefore sequential mode.
    update_mix: the weight of that dense output in the target (default `UPDATE_MIX`).
    """
    if update and mode != "sequential":
        raise UserError("the closed-form update needs calibration_mode 'sequential' "
                        "(it is defined on the activations of the already compressed layers)")
    if sweep is not None and mode != "parallel":
        raise UserError("a sweep shares one calibration between its ratios, which is exact only in "
                        "calibration_mode 'parallel' (sequential statistics depend on the ratio)")
    from svdforge.core.streaming import ActivationStore, InMemoryLayers  # noqa: PLC0415

    rep = reporter or Reporter()
    res = CalibrationResult()
    if sweep is not None:
        res.timings["decompose_shared"] = 0.0
    layers, prefix = decoder_layers(model)
    io = layer_io or InMemoryLayers()
    store = activations or ActivationStore(device)
    needs = method.needs - {"fisher"} | ({"gram"} if update else set())
    mix = UPDATE_MIX if update_mix is None else update_mix
    cached = stats_cache is not None and stats_cache.complete
    if cached:
        _decompose_cached(model, layers, prefix, io, method, rank_fn, targets, needs, update, fisher,
                          method_options, stats_cache, rep, res, mix, sweep)
        _share_inputs(res, sweep)
        return res
    t0 = time.perf_counter()
    inputs = capture_layer0_inputs(model, ids, batch_size, device, alloc=store.empty)
    fdt = forward_dtype or inputs.hidden.dtype
    inputs.hidden = store.cast(inputs.hidden, fdt)
    inputs.kwargs = [_cast_kwargs(kw, fdt) for kw in inputs.kwargs]
    res.timings["calibrate"] += time.perf_counter() - t0
    scratch = store.empty_like(inputs.hidden)
    dense = dense_scratch = None
    if update:
        dense, dense_scratch = store.copy(inputs.hidden), store.empty_like(inputs.hidden)
    n_layers = len(layers)
    for li, layer in enumerate(layers):
        rep.check_cancel()
        t0 = time.perf_counter()
        name = f"{prefix}.{li}"
        io.load(li, layer)
        linears = select_linears(layer, name, targets)
        fwd = _forward_copy(layer, fdt)
        fwd_linears = select_linears(fwd, name, targets)
        collector = StatsCollector(fwd_linears, needs)
        cross = CrossMoments(fwd_linears) if update else None
        with collector:
            for lo, hi, kw in inputs.batches():
                if cross is not None:  # the dense stream first: its inputs are held for the batch
                    collector.paused = True
                    with cross.capture("dense"):
                        dense_scratch[lo:hi] = _layer_out(fwd(dense[lo:hi], **kw))
                    collector.paused = False
                collector.new_batch()
                if cross is not None:
                    with cross.capture("compressed"):
                        scratch[lo:hi] = _layer_out(fwd(inputs.hidden[lo:hi], **kw))
                    cross.accumulate()
                else:
                    scratch[lo:hi] = _layer_out(fwd(inputs.hidden[lo:hi], **kw))
        del fwd
        if update:
            dense, dense_scratch = dense_scratch, dense
        res.timings["calibrate"] += time.perf_counter() - t0
        rep.progress("whiten", (li + 1) / n_layers, f"layer {li + 1}/{n_layers}", layer=li)
        if li == 0:
            res.shared_inputs = [v for v in collector.groups().values()]

        if stats_cache is not None:
            stats_cache.save(li, collector, cross, n_layers)

        t0 = time.perf_counter()
        _decompose_layer(model, linears, method, rank_fn, collector, fisher, method_options, res, cross, mix, sweep)
        del collector, cross
        res.timings["decompose"] += time.perf_counter() - t0
        rep.progress("svd", (li + 1) / n_layers, f"layer {li + 1}/{n_layers}", layer=li)

        t0 = time.perf_counter()
        if mode == "sequential":
            run_layer(_forward_copy(layer, fdt), inputs, out=scratch)
        inputs.hidden, scratch = scratch, inputs.hidden
        io.done(li, layer)
        res.timings["calibrate"] += time.perf_counter() - t0
    if stats_cache is not None:
        stats_cache.commit(n_layers)
    _share_inputs(res, sweep)
    return res


def _share_inputs(res: CalibrationResult, sweep: list[SweepTarget] | None) -> None:
    for t in sweep or ():
        t.result.shared_inputs = res.shared_inputs


def _decompose_cached(model, layers, prefix, io, method, rank_fn, targets, needs, update, fisher,
                      method_options, stats_cache, rep, res, mix: float, sweep=None) -> None:
    """compress_layers on a cache hit: each layer from its stored statistics, no forward."""
    n_layers = len(layers)
    for li, layer in enumerate(layers):
        rep.check_cancel()
        io.load(li, layer)
        linears = select_linears(layer, f"{prefix}.{li}", targets)
        t0 = time.perf_counter()
        collector, cross = stats_cache.load(li, linears, needs, update)
        res.timings["calibrate"] += time.perf_counter() - t0
        rep.progress("whiten", (li + 1) / n_layers, f"layer {li + 1}/{n_layers} (cached statistics)", layer=li)
        if li == 0:
            res.shared_inputs = [v for v in collector.groups().values()]
        t0 = time.perf_counter()
        _decompose_layer(model, linears, method, rank_fn, collector, fisher, method_options, res, cross, mix, sweep)
        res.timings["decompose"] += time.perf_counter() - t0
        rep.progress("svd", (li + 1) / n_layers, f"layer {li + 1}/{n_layers}", layer=li)
        io.done(li, layer)


def _plan(name: str, lin: nn.Linear, rank_fn: RankFn) -> tuple[int | None, dict]:
    """The rank of one linear (None: it stays dense) and its report entry so far."""
    m, n = lin.out_features, lin.in_features
    k = rank_fn(name, m, n)
    entry = {"shape": [m, n], "params_dense": m * n + (m if lin.bias is not None else 0)}
    if k is None or not saves_params(m, n, k):
        entry.update(rank=None, dense_reason=f"rank {k} would save no parameters" if k else "kept dense",
                     params=entry["params_dense"])
        return None, entry
    return k, entry


def _build(name: str, lin: nn.Linear, k: int, f, entry: dict) -> LowRankLinear:
    """The LowRankLinear of factors `f`; completes the linear's report entry."""
    if not (torch.isfinite(f.u).all() and torch.isfinite(f.v).all()):
        raise NumericalError(f"{name}: non-finite factors")
    m, n = lin.out_features, lin.in_features
    new = LowRankLinear.from_factors(f.u, f.v, lin.bias, dtype=lin.weight.dtype, device=lin.weight.device)
    entry.update(rank=k, params=k * (m + n) + (m if lin.bias is not None else 0),
                 path=f.info.get("path"), retained_energy=f.info["retained_energy"],
                 truncation_loss=f.info["truncation_loss"])
    for key in ("jitter", "clamped_eigenvalues"):
        if key in f.info:
            entry[key] = f.info[key]
    return new


@torch.no_grad()
def _decompose_layer(model, linears, method, rank_fn, collector, fisher, method_options, res,
                     cross: "CrossMoments | None" = None, mix: float = UPDATE_MIX,
                     sweep: list[SweepTarget] | None = None) -> None:
    if sweep is not None:
        _decompose_sweep(linears, method, collector, fisher, method_options, res, sweep)
        return
    for name, lin in linears:
        k, entry = _plan(name, lin, rank_fn)
        res.ranks[name] = entry
        if k is None:
            continue
        stats = collector.stats_for(name)
        stats.cache.update(method_options or {})
        f = method.factorize(lin.weight.detach().to(torch.float64), k, stats,
                             None if fisher is None else fisher.get(name))
        if cross is not None:
            from svdforge.core.recover import least_squares_update  # noqa: PLC0415  (the update's math lives there)

            f.u, upd = least_squares_update(lin.weight.detach().to(torch.float64), f.u, f.v,
                                            stats.gram, cross.moment_for(name), mix)
            entry["update"] = upd
        set_submodule(model, name, _build(name, lin, k, f, entry))


@torch.no_grad()
def _decompose_sweep(linears, method, collector, fisher, method_options, res, sweep: list[SweepTarget]) -> None:
    """One `method.prepare` per linear (the whitening and the eigendecomposition of the scaled
    weight), truncated at every target's rank. The model is not changed."""
    for name, lin in linears:
        plans = [(t, *_plan(name, lin, t.rank_fn)) for t in sweep]
        for t, _, entry in plans:
            t.result.ranks[name] = entry
        if all(k is None for _, k, _ in plans):
            continue
        t0 = time.perf_counter()
        stats = collector.stats_for(name)
        stats.cache.update(method_options or {})
        prepared = method.prepare(lin.weight.detach().to(torch.float64), stats,
                                  None if fisher is None else fisher.get(name))
        res.timings["decompose_shared"] += time.perf_counter() - t0
        for t, k, entry in plans:
            if k is None:
                continue
            t0 = time.perf_counter()
            f = prepared.factors(k)
            f.info.update(prepared.info)
            t.modules[name] = _build(name, lin, k, f, entry)
            t.result.timings["decompose"] += time.perf_counter() - t0
        del prepared
