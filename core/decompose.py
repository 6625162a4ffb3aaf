"""SPEC stage 2 in the layer loop: every target linear of a layer becomes two factors.

`compress_layers` composes the loop for a compression: `Statistics` (stage 1) and then
`Decompose`, which plans each linear's rank, factorizes its scaled weight with the method
(optionally followed by the closed-form update of `W_u`) and swaps in a `LowRankLinear`;
or, for a sweep, `SweepDecompose`, which decomposes each linear once and truncates it at
every ratio's rank, leaving the model dense.

`sequential` mode feeds layer l+1 the outputs of the compressed layer l (the compression
errors of earlier layers are seen, and partly absorbed, by later ones); `parallel` mode
feeds it the dense layer's outputs (one forward per layer instead of two).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from svdforge.core.config import UPDATE_MIX
from svdforge.core.errors import NumericalError, UserError
from svdforge.core.layer_loop import Handler, LayerLoop, LayerStep, Stream
from svdforge.core.linalg import Factors, saves_params, uniform_rank
from svdforge.core.lowrank import LowRankLinear, from_factors, set_submodule
from svdforge.core.methods import Method
from svdforge.core.progress import Reporter
from svdforge.core.recover import least_squares_update
from svdforge.core.refine import Refine
from svdforge.core.statistics import DENSE, MAIN, Statistics

RankFn = Callable[[str, int, int], int | None]


def uniform_ranks(ratio: float) -> RankFn:
    return lambda name, m, n: uniform_rank(m, n, ratio)


@dataclass
class CalibrationResult:
    ranks: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"calibrate": 0.0, "decompose": 0.0})
    shared_inputs: list[list[str]] = field(default_factory=list)
    refine: dict | None = None       # `Refine.report()` when the layers were refined


@dataclass
class SweepTarget:
    """One ratio of a sweep (`compress_layers(..., sweep=[...])`): its rank function, and what
    the layer loop builds for it: the `LowRankLinear` of every compressed linear (by full
    name, not yet in any model), the ranks, and the time spent truncating for it alone."""

    rank_fn: RankFn
    result: CalibrationResult = field(default_factory=CalibrationResult)
    modules: dict[str, nn.Module] = field(default_factory=dict)


def plan(name: str, lin: nn.Linear, rank_fn: RankFn) -> tuple[int | None, dict]:
    """The rank of one linear (None: it stays dense) and its report entry so far."""
    m, n = lin.out_features, lin.in_features
    k = rank_fn(name, m, n)
    entry = {"shape": [m, n], "params_dense": m * n + (m if lin.bias is not None else 0)}
    if k is None or not saves_params(m, n, k):
        entry.update(rank=None, dense_reason=f"rank {k} would save no parameters" if k else "kept dense",
                     params=entry["params_dense"])
        return None, entry
    return k, entry


def build(name: str, lin: nn.Linear, k: int, f: Factors, entry: dict) -> LowRankLinear:
    """The LowRankLinear of factors `f`; completes the linear's report entry."""
    if not (torch.isfinite(f.u).all() and torch.isfinite(f.v).all()):
        raise NumericalError(f"{name}: non-finite factors")
    m, n = lin.out_features, lin.in_features
    new = from_factors(f.u, f.v, lin.bias, dtype=lin.weight.dtype, device=lin.weight.device)
    entry.update(rank=k, params=k * (m + n) + (m if lin.bias is not None else 0),
                 path=f.info.get("path"), retained_energy=f.info["retained_energy"],
                 truncation_loss=f.info["truncation_loss"])
    for key in ("jitter", "clamped_eigenvalues"):
        if key in f.info:
            entry[key] = f.info[key]
    return new


def _fisher_of(fisher: dict | None, name: str):
    return None if fisher is None else fisher.get(name)


def _svd_progress(rep: Reporter, step: LayerStep) -> None:
    rep.progress("svd", (step.index + 1) / step.n_layers, f"layer {step.index + 1}/{step.n_layers}", layer=step.index)


class Decompose(Handler):
    """Factorize every target linear of the layer and put its `LowRankLinear` in the model.

    With the layer's cross moments in `step.state["cross"]` (the closed-form update), `W_u`
    is replaced by `least_squares_update`'s solution with weight `mix`."""

    def __init__(self, model: nn.Module, method: Method, rank_fn: RankFn, result: CalibrationResult, *,
                 fisher: dict | None = None, mix: float = UPDATE_MIX, reporter: Reporter | None = None):
        self.model, self.method, self.rank_fn, self.res = model, method, rank_fn, result
        self.fisher, self.mix, self.rep = fisher, mix, reporter or Reporter()

    @torch.no_grad()
    def on_decompose(self, step: LayerStep) -> None:
        collector, cross = step.state["stats"], step.state.get("cross")
        for name, lin in step.linears:
            k, entry = plan(name, lin, self.rank_fn)
            self.res.ranks[name] = entry
            if k is None:
                continue
            stats = collector.stats_for(name)
            W = lin.weight.detach().to(torch.float64)
            f = self.method.factorize(W, k, stats, _fisher_of(self.fisher, name))
            if cross is not None:
                f.u, entry["update"] = least_squares_update(W, f.u, f.v, stats.gram, cross.moment_for(name), self.mix)
            set_submodule(self.model, name, build(name, lin, k, f, entry))
        step.state.clear()   # the layer's statistics are no longer needed
        _svd_progress(self.rep, step)


class SweepDecompose(Handler):
    """One `method.prepare` per linear (the whitening and the eigendecomposition of the scaled
    weight), truncated at every target's rank. The model is not changed. `result.timings`
    gains `decompose_shared`: the part of `decompose` one ratio alone would also have spent."""

    def __init__(self, method: Method, targets: list[SweepTarget], result: CalibrationResult, *,
                 fisher: dict | None = None, reporter: Reporter | None = None):
        self.method, self.targets, self.res = method, targets, result
        self.fisher, self.rep = fisher, reporter or Reporter()
        self.res.timings["decompose_shared"] = 0.0

    @torch.no_grad()
    def on_decompose(self, step: LayerStep) -> None:
        collector = step.state["stats"]
        for name, lin in step.linears:
            plans = [(t, *plan(name, lin, t.rank_fn)) for t in self.targets]
            for t, _, entry in plans:
                t.result.ranks[name] = entry
            if all(k is None for _, k, _ in plans):
                continue
            t0 = time.perf_counter()
            prepared = self.method.prepare(lin.weight.detach().to(torch.float64), collector.stats_for(name),
                                           _fisher_of(self.fisher, name))
            self.res.timings["decompose_shared"] += time.perf_counter() - t0
            for t, k, entry in plans:
                if k is None:
                    continue
                t0 = time.perf_counter()
                f = prepared.factors(k)
                f.info.update(prepared.info)
                t.modules[name] = build(name, lin, k, f, entry)
                t.result.timings["decompose"] += time.perf_counter() - t0
            del prepared
        step.state.clear()
        _svd_progress(self.rep, step)


class Decompositions:
    """Every target linear's decomposition before truncation (`method.prepare`: for svd-llm the
    whitening and the eigendecomposition of `W S`), kept after the layer loop
    (`compress_layers(..., keep=...)`), so that ratios chosen later (a targeted job's search)
    are only truncations. Memory: the prepared decompositions, fp64 (for svd-llm about two
    copies of each compressed weight plus the Gram-side eigenvectors)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[nn.Linear, object]] = {}
        self.shared_inputs: list[list[str]] = []

    def truncate(self, rank_fn: RankFn) -> SweepTarget:
        """The modules, ranks and truncation time of `rank_fn`: what `SweepDecompose` gives one ratio."""
        target = SweepTarget(rank_fn)
        target.result.shared_inputs = self.shared_inputs
        for name, (lin, prepared) in self.items.items():
            k, entry = plan(name, lin, rank_fn)
            target.result.ranks[name] = entry
            if k is None:
                continue
            t0 = time.perf_counter()
            f = prepared.factors(k)
            f.info.update(prepared.info)
            target.modules[name] = build(name, lin, k, f, entry)
            target.result.timings["decompose"] += time.perf_counter() - t0
        return target


class KeepDecompose(Handler):
    """One `method.prepare` per target linear, kept in a `Decompositions`; the model is not
    changed. `result.timings["decompose_shared"]` is the time spent preparing."""

    def __init__(self, method: Method, store: Decompositions, result: CalibrationResult, *,
                 fisher: dict | None = None, reporter: Reporter | None = None):
        self.method, self.store, self.res = method, store, result
        self.fisher, self.rep = fisher, reporter or Reporter()
        self.res.timings["decompose_shared"] = 0.0

    @torch.no_grad()
    def on_decompose(self, step: LayerStep) -> None:
        collector = step.state["stats"]
        for name, lin in step.linears:
            t0 = time.perf_counter()
            W = lin.weight.detach().to(torch.float64)
            prepared = self.method.prepare(W, collector.stats_for(name), _fisher_of(self.fisher, name))
            self.store.items[name] = (lin, prepared)
            self.res.timings["decompose_shared"] += time.perf_counter() - t0
        step.state.clear()
        _svd_progress(self.rep, step)


def _check_mode(mode: str, update: bool, sweep, refine, stats_cache) -> None:
    if update and mode != "sequential":
        raise UserError("the closed-form update needs calibration_mode 'sequential' "
                        "(it is defined on the activations of the already compressed layers)")
    if refine is not None and (mode != "sequential" or sweep is not None):
        raise UserError("refine needs calibration_mode 'sequential' and one ratio (it fits each compressed "
                        "layer on the outputs of the already refined layers before it)")
    if refine is not None and stats_cache is not None:
        raise UserError("refine runs every layer's calibration forward (it trains on the dense outputs): "
                        "no statistics cache")
    if sweep is not None and mode != "parallel":
        raise UserError("a sweep shares one calibration between its ratios, which is exact only in "
                        "calibration_mode 'parallel' (sequential statistics depend on the ratio)")


def compress_layers(model: nn.Module, ids: torch.Tensor, method: Method, rank_fn: RankFn | None, *,
                    targets: str = "all", mode: str = "sequential", batch_size: int = 8, device="cpu",
                    fisher: dict[str, torch.Tensor] | None = None, reporter: Reporter | None = None,
                    forward_dtype: torch.dtype | None = None, update: bool = False,
                    update_mix: float | None = None, layer_io=None, activations=None, stats_cache=None,
                    sweep: list[SweepTarget] | None = None, keep: Decompositions | None = None,
                    refine: Refine | None = None) -> CalibrationResult:
    """Compress the target linears of every decoder layer in place. Returns ranks and timings.

    sweep: several ratios from one calibration: the model stays dense and each `SweepTarget`
    receives its modules, ranks and truncation time (`rank_fn` is unused); needs `parallel`.
    keep: every linear's decomposition goes into this `Decompositions`, to be truncated later at
    any rank function; the model stays dense (`rank_fn` is unused); needs `parallel`.
    layer_io / activations: the layer loop's layer source and sink (streaming) and its
    activation buffers. stats_cache: a `StatsCache`; on a hit no forward pass runs.
    forward_dtype: dtype of the calibration forward passes; statistics are accumulated in
    fp32/fp64 and the factors always come from the original weights in fp64.
    update: after factorizing each linear, replace W_u by SVD-LLM's closed-form least-squares
    update (`svdforge.core.recover.least_squares_update`), which needs the dense model's own
    activations as a second stream next to the compressed one, and so sequential mode;
    update_mix: the weight of the dense output in its target (default `UPDATE_MIX`).
    refine: a `svdforge.core.refine.Refine` handler: after each layer is decomposed, train its
    factors towards the dense layer's outputs (sequential; the dense stream runs as for the update);
    its report goes to `result.refine`, its seconds to `timings["refine"]` (not `decompose`).
    """
    _check_mode(mode, update, sweep if keep is None else keep, refine, stats_cache)
    rep = reporter or Reporter()
    res = CalibrationResult()
    needs = method.needs - {"fisher"} | ({"gram"} if update else set())
    statistics = Statistics(needs, update=update, cache=stats_cache, reporter=rep)
    if keep is not None:
        decompose: Handler = KeepDecompose(method, keep, res, fisher=fisher, reporter=rep)
    elif sweep is not None:
        decompose = SweepDecompose(method, sweep, res, fisher=fisher, reporter=rep)
    else:
        decompose = Decompose(model, method, rank_fn, res, fisher=fisher, reporter=rep,
                              mix=UPDATE_MIX if update_mix is None else update_mix)
    two = update or refine is not None
    streams = [Stream(DENSE), Stream(MAIN, reuse=False)] if two else [Stream(MAIN, reuse=mode == "parallel")]
    handlers = [statistics, decompose] + ([refine] if refine is not None else [])
    loop = LayerLoop(model, handlers, ids=ids, batch_size=batch_size, device=device,
                     forward_dtype=forward_dtype, streams=streams, targets=targets, layer_io=layer_io,
                     activations=activations, reporter=rep).run()
    res.timings["calibrate"] += loop.timings["calibrate"]
    res.timings["decompose"] += loop.timings["decompose"]
    if refine is not None:
        res.refine = refine.report()
        res.timings["refine"] = res.refine["seconds"]
        res.timings["decompose"] -= res.refine["seconds"]
    res.shared_inputs = statistics.shared_inputs
    for t in sweep or ():
        t.result.shared_inputs = res.shared_inputs
    if keep is not None:
        keep.shared_inputs = res.shared_inputs
    return res
