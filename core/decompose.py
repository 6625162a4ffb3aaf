"""SPEC stage 2 in the layer loop: every target linear of a layer becomes two factors.

`compress_layers` composes the loop for a compression: `Statistics` (stage 1) and then
`Decompose`, which plans each linear's rank, factorizes its scaled weight with the method
(optionally followed by the closed-form update of `W_u`) and swaps in a `LowRankLinear`;
or, for a sweep, `SweepDecompose`, which decomposes each linear once and truncates it at
every ratio's rank, leaving the model dense. With `rank_multiple` > 1 both decompose all the
layer's linears first and round the planned ranks (`svdforge.core.rounding`) before truncating.

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
from svdforge.core.layers import decoder_layers, select_linears
from svdforge.core.linalg import Factors, Truncation, saves_params, uniform_rank
from svdforge.core.lowrank import LowRankLinear, from_factors, set_submodule
from svdforge.core.methods import Method
from svdforge.core.progress import Reporter
from svdforge.core.recover import least_squares_update
from svdforge.core.rounding import RankRounder, candidate, check_layers
from svdforge.core.statistics import DENSE, MAIN, Statistics

RankFn = Callable[[str, int, int], int | None]


def uniform_ranks(ratio: float) -> RankFn:
    return lambda name, m, n: uniform_rank(m, n, ratio)


@dataclass
class CalibrationResult:
    ranks: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"calibrate": 0.0, "decompose": 0.0})
    shared_inputs: list[list[str]] = field(default_factory=list)
    rounding: dict | None = None     # `RankRounder.report()` with rank_multiple > 1


@dataclass
class SweepTarget:
    """One ratio of a sweep (`compress_layers(..., sweep=[...])`): its rank function, and what
    the layer loop builds for it: the `LowRankLinear` of every compressed linear (by full
    name, not yet in any model), the ranks, and the time spent truncating for it alone."""

    rank_fn: RankFn
    result: CalibrationResult = field(default_factory=CalibrationResult)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    rounder: RankRounder | None = None


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


def round_planned(planned: dict[str, tuple[int | None, dict]], prepared: dict[str, Truncation],
                  rounder: RankRounder) -> dict[str, tuple[int | None, dict]]:
    """The layer's planned ranks rounded by `rounder` (from each truncation's spectrum); the
    report entries gain `rank_unrounded`, and those that end up dense their reason."""
    cands = [candidate(name, *entry["shape"], k, prepared[name].sigma) for name, (k, entry) in planned.items()
             if k is not None]
    ranks = rounder.layer(cands)
    out = {}
    for name, (k, entry) in planned.items():
        if k is not None:
            entry["rank_unrounded"] = k
            k = ranks[name]
            if k is None:
                entry.update(rank=None, params=entry["params_dense"], dense_reason=(
                    f"no multiple of rank_multiple {rounder.multiple} saves parameters"))
        out[name] = (k, entry)
    return out


def truncate(t: Truncation, k: int) -> Factors:
    """`Method.factorize` from an already prepared decomposition."""
    f = t.factors(k)
    f.info.update(t.info)
    return f


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


def _prepare_layer(method: Method, step: LayerStep, collector, fisher: dict | None,
                   planned: dict[str, tuple[int | None, dict]]) -> dict[str, Truncation]:
    """The decomposition of every linear of the layer that `planned` compresses (all at once,
    for rounding: it needs every spectrum of the layer before the first truncation)."""
    return {name: method.prepare(lin.weight.detach().to(torch.float64), collector.stats_for(name),
                                 _fisher_of(fisher, name))
            for name, lin in step.linears if planned[name][0] is not None}


def _svd_progress(rep: Reporter, step: LayerStep) -> None:
    rep.progress("svd", (step.index + 1) / step.n_layers, f"layer {step.index + 1}/{step.n_layers}", layer=step.index)


class Decompose(Handler):
    """Factorize every target linear of the layer and put its `LowRankLinear` in the model.

    With the layer's cross moments in `step.state["cross"]` (the closed-form update), `W_u`
    is replaced by `least_squares_update`'s solution with weight `mix`."""

    def __init__(self, model: nn.Module, method: Method, rank_fn: RankFn, result: CalibrationResult, *,
                 fisher: dict | None = None, mix: float = UPDATE_MIX, reporter: Reporter | None = None,
                 rounder: RankRounder | None = None):
        self.model, self.method, self.rank_fn, self.res = model, method, rank_fn, result
        self.fisher, self.mix, self.rep, self.rounder = fisher, mix, reporter or Reporter(), rounder

    @torch.no_grad()
    def on_decompose(self, step: LayerStep) -> None:
        collector, cross = step.state["stats"], step.state.get("cross")
        planned = {name: plan(name, lin, self.rank_fn) for name, lin in step.linears}
        prepared: dict[str, Truncation] = {}
        if self.rounder is not None:
            prepared = _prepare_layer(self.method, step, collector, self.fisher, planned)
            planned = round_planned(planned, prepared, self.rounder)
        for name, lin in step.linears:
            k, entry = planned[name]
            self.res.ranks[name] = entry
            if k is None:
                continue
            stats = collector.stats_for(name)
            W = lin.weight.detach().to(torch.float64)
            f = truncate(prepared.pop(name), k) if name in prepared else \
                self.method.factorize(W, k, stats, _fisher_of(self.fisher, name))
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
        plans = [{name: plan(name, lin, t.rank_fn) for name, lin in step.linears} for t in self.targets]
        eager = self._round(step, collector, plans) if any(t.rounder for t in self.targets) else {}
        for name, lin in step.linears:
            for t, planned in zip(self.targets, plans):
                t.result.ranks[name] = planned[name][1]
            if all(planned[name][0] is None for planned in plans):
                continue
            prepared = eager.pop(name) if name in eager else self._prepare(name, lin, collector)
            for t, planned in zip(self.targets, plans):
                k, entry = planned[name]
                if k is None:
                    continue
                t0 = time.perf_counter()
                t.modules[name] = build(name, lin, k, truncate(prepared, k), entry)
                t.result.timings["decompose"] += time.perf_counter() - t0
            del prepared
        step.state.clear()
        _svd_progress(self.rep, step)

    def _prepare(self, name: str, lin: nn.Linear, collector) -> Truncation:
        t0 = time.perf_counter()
        prepared = self.method.prepare(lin.weight.detach().to(torch.float64), collector.stats_for(name),
                                       _fisher_of(self.fisher, name))
        self.res.timings["decompose_shared"] += time.perf_counter() - t0
        return prepared

    def _round(self, step: LayerStep, collector, plans: list[dict]) -> dict[str, Truncation]:
        """Decompose now every linear some target compresses; round each rounding target's plans."""
        eager = {name: self._prepare(name, lin, collector) for name, lin in step.linears
                 if any(p[name][0] is not None for p in plans)}
        for i, t in enumerate(self.targets):
            if t.rounder is not None:
                plans[i] = round_planned(plans[i], eager, t.rounder)
        return eager


def _check_mode(mode: str, update: bool, sweep) -> None:
    if update and mode != "sequential":
        raise UserError("the closed-form update needs calibration_mode 'sequential' "
                        "(it is defined on the activations of the already compressed layers)")
    if sweep is not None and mode != "parallel":
        raise UserError("a sweep shares one calibration between its ratios, which is exact only in "
                        "calibration_mode 'parallel' (sequential statistics depend on the ratio)")


def _rounders(model: nn.Module, targets: str, rank_fn: RankFn | None, sweep: list[SweepTarget] | None,
              multiple: int) -> RankRounder | None:
    """With `multiple` > 1: refuse, before the first layer, a multiple that some rank function's
    plan cannot afford (`check_layers`); give each sweep target its rounder, or return the
    compression's."""
    if multiple == 1:
        return None
    layers, prefix = decoder_layers(model)
    groups = [select_linears(layer, f"{prefix}.{i}", targets) for i, layer in enumerate(layers)]
    for fn in [rank_fn] if sweep is None else [t.rank_fn for t in sweep]:
        check_layers([[(lin.out_features, lin.in_features, k) for name, lin in group
                       for k in [plan(name, lin, fn)[0]] if k is not None] for group in groups], multiple)
    for t in sweep or ():
        t.rounder = RankRounder(multiple)
    return None if sweep is not None else RankRounder(multiple)


def compress_layers(model: nn.Module, ids: torch.Tensor, method: Method, rank_fn: RankFn | None, *,
                    targets: str = "all", mode: str = "sequential", batch_size: int = 8, device="cpu",
                    fisher: dict[str, torch.Tensor] | None = None, reporter: Reporter | None = None,
                    forward_dtype: torch.dtype | None = None, update: bool = False,
                    update_mix: float | None = None, layer_io=None, activations=None, stats_cache=None,
                    sweep: list[SweepTarget] | None = None, rank_multiple: int = 1) -> CalibrationResult:
    """Compress the target linears of every decoder layer in place. Returns ranks and timings.

    sweep: several ratios from one calibration: the model stays dense and each `SweepTarget`
    receives its modules, ranks and truncation time (`rank_fn` is unused); needs `parallel`.
    layer_io / activations: the layer loop's layer source and sink (streaming) and its
    activation buffers. stats_cache: a `StatsCache`; on a hit no forward pass runs.
    forward_dtype: dtype of the calibration forward passes; statistics are accumulated in
    fp32/fp64 and the factors always come from the original weights in fp64.
    update: after factorizing each linear, replace W_u by SVD-LLM's closed-form least-squares
    update (`svdforge.core.recover.least_squares_update`), which needs the dense model's own
    activations as a second stream next to the compressed one, and so sequential mode;
    update_mix: the weight of the dense output in its target (default `UPDATE_MIX`).
    rank_multiple: round every rank to a multiple of it within the same parameters
    (`svdforge.core.rounding`; `res.rounding` / each target's `result.rounding` say how).
    """
    _check_mode(mode, update, sweep)
    rounder = _rounders(model, targets, rank_fn, sweep, rank_multiple)
    rep = reporter or Reporter()
    res = CalibrationResult()
    needs = method.needs - {"fisher"} | ({"gram"} if update else set())
    statistics = Statistics(needs, update=update, cache=stats_cache, reporter=rep)
    if sweep is not None:
        decompose: Handler = SweepDecompose(method, sweep, res, fisher=fisher, reporter=rep)
    else:
        decompose = Decompose(model, method, rank_fn, res, fisher=fisher, reporter=rep,
                              mix=UPDATE_MIX if update_mix is None else update_mix, rounder=rounder)
    streams = [Stream(DENSE), Stream(MAIN, reuse=False)] if update else [Stream(MAIN, reuse=mode == "parallel")]
    loop = LayerLoop(model, [statistics, decompose], ids=ids, batch_size=batch_size, device=device,
                     forward_dtype=forward_dtype, streams=streams, targets=targets, layer_io=layer_io,
                     activations=activations, reporter=rep).run()
    res.timings["calibrate"] += loop.timings["calibrate"]
    res.timings["decompose"] += loop.timings["decompose"]
    res.shared_inputs = statistics.shared_inputs
    res.rounding = rounder.report() if rounder is not None else None
    for t in sweep or ():
        t.result.shared_inputs = res.shared_inputs
        t.result.rounding = t.rounder.report() if t.rounder is not None else None
    return res
