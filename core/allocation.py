"""Global rank allocation: one parameter budget for the whole model (SPEC "Rank allocation").

With whitening the calibration loss of a linear kept at rank k is the discarded spectrum
sum_{i>k} sigma_i^2 of its scaled weight (SVD-LLM's theorem; for the other methods the
same holds for their own scaling). So the loss of every possible rank of every linear is
known after one calibration pass, and choosing ranks under one budget is a greedy
knapsack over singular values: take, over the whole model, the singular value that buys
the most (normalised) loss per parameter, until the parameters that `uniform` would spend
are spent. Seed 000 (II.C) asks for exactly this optimum: equal marginal loss per
parameter everywhere.

Normalisation. Raw sigma_i^2 are in the units of each linear's output, and those differ
by orders of magnitude between linears (down_proj writes into the residual stream with its
outlier channels; q/k feed a softmax whose scale RMSNorm gains set; v/o are scaled by
attention averaging), so they must be normalised per linear, and the normaliser decides
everything. Measured on SmolLM2 at 0.4 (32 x 512 WikiText-2 valid windows, sequential
compression, PPL on the first 4096 test tokens; uniform: 99.5):

| normaliser of linear l's sigma_i^2          | budget       | PPL   |
|---------------------------------------------|--------------|-------|
| its total energy sum_j sigma_j^2 = ||W X||^2 | whole model  | 147.7 |
| its total energy                             | per kind     | 148.0 |
| its tail at the uniform rank                 | whole model  | 136.1 |
| its tail at the uniform rank                 | per kind     |  99.9 |

Total energy fails because a few tokens can own it: in SmolLM2's layer 11 down_proj (where
the model builds its massive activations) the first singular value carries nearly all of
the energy, so "fraction of output energy lost" says rank 1 is enough - and the model
breaks. The tail at the uniform rank, sum_{i >= k_u} sigma_i^2, is what this linear loses
under `uniform`; dividing by it makes the currency "how much worse than uniform would this
linear get", which the head of the spectrum cannot distort and which is still invariant to
any rescaling of the weight or the inputs. Comparing across kinds (q_proj against
down_proj) in any of these currencies hands the ranks to the wrong kind (both whole-model
rows above keep every k_proj/v_proj dense and starve the MLP), because equal relative
output error is not equal harm for a softmax input and for a residual write. So `global`
keeps each kind's total (q_proj, ..., down_proj across all layers) at what `uniform`
spends on it and moves ranks between layers within a kind; the whole model's budget is
the sum. On SmolLM2 this is level with uniform: 99.9 vs 99.5 in the 32-window runs above, 99.02
vs 99.36 in bench/quality.py's protocol (64 windows; docs/benchmarks.md) - a 0.3% edge, not
the large win seeds 000 and 002 suggest.

Dense fallback. A rank only pays if k (m + n) < m n. Each linear can grow to the largest
such rank; past it, its only next "item" is to stay dense, which costs the rest of its
m n parameters and recovers all of its remaining energy. A linear left dense is reported
with rank None and charged m n, so no linear ever gets a rank that saves nothing.
"""
from __future__ import annotations

import heapq
import time

import torch

from svdforge.core.errors import UserError
from svdforge.core.layer_loop import Handler, LayerLoop, LayerStep, Stream
from svdforge.core.linalg import saves_params, uniform_rank
from svdforge.core.memory import GiB
from svdforge.core.methods import Method, get_method
from svdforge.core.progress import Reporter
from svdforge.core.rounding import kind_of, mean_rank, rank_cap, rounded
from svdforge.core.sensitivity import component_gradients, concave, score
from svdforge.core.statistics import MAIN, Statistics


def uniform_cost(m: int, n: int, ratio: float) -> int:
    """Parameters `uniform` spends on an m x n linear (m n where its rank saves nothing)."""
    k = uniform_rank(m, n, ratio)
    return k * (m + n) if saves_params(m, n, k) else m * n


class Spectra(Handler):
    """The layer loop's spectra pass: name -> (m, n, singular values of the scaled weight) of
    every target linear, from its statistics; the model is not changed. `keep_components`: also
    every linear's rank-1 components (P, Q) in fp32 (`Truncation.components`), for loss scores."""

    def __init__(self, method: Method, fisher: dict | None = None, keep_components: bool = False):
        self.method, self.fisher, self.keep = method, fisher, keep_components
        self.spectra: dict[str, tuple[int, int, torch.Tensor]] = {}
        self.components: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def on_decompose(self, step: LayerStep) -> None:
        collector = step.state.pop("stats")
        for name, lin in step.linears:
            W = lin.weight.detach().to(torch.float64)
            fisher = None if self.fisher is None else self.fisher.get(name)
            if self.keep:
                t = self.method.prepare(W, collector.stats_for(name), fisher)
                sigma = t.sigma
                self.components[name] = tuple(c.float().cpu() for c in t.components())
            else:
                sigma = self.method.spectrum(W, collector.stats_for(name), fisher)
            self.spectra[name] = (lin.out_features, lin.in_features, sigma.double().cpu())


def whitened_spectra(model, ids: torch.Tensor, method: Method, targets: str = "all", batch_size: int = 8,
                     device="cpu", fisher: dict | None = None, forward_dtype: torch.dtype | None = None,
                     reporter: Reporter | None = None, layer_io=None,
                     activations=None, keep_components: bool = False):
    """name -> (m, n, singular values of the scaled weight), from one dense (parallel) pass
    of the layer loop. The model is not changed. layer_io / activations: a streamed job's
    read-only layer source and an activation store (`StreamingJob.spectra_io`).
    `keep_components`: returns (spectra, components) (`Spectra`)."""
    spectra = Spectra(method, fisher, keep_components)
    statistics = Statistics(method.needs - {"fisher"}, reporter=reporter,
                            progress="rank planning: spectra of layer {i}/{n}")
    LayerLoop(model, [statistics, spectra], ids=ids, batch_size=batch_size, device=device,
              forward_dtype=forward_dtype, streams=[Stream(MAIN, reuse=True)], targets=targets,
              layer_io=layer_io, activations=activations, reporter=reporter).run()
    return (spectra.spectra, spectra.components) if keep_components else spectra.spectra


def allocate(spectra: dict[str, tuple[int, int, torch.Tensor]], budget: int,
             reference: dict[str, int] | None = None) -> dict[str, int | None]:
    """Greedy ranks under `budget` parameters; None = the linear stays dense (see module doc).

    Each linear's sigma_i^2 are divided by its tail after rank `reference[name]` (by its
    total energy where no reference is given), then `greedy_ranks` spends the budget.
    """
    gains = {}
    for name, (m, n, sigma) in spectra.items():
        e = sigma.pow(2)
        total = float(e.sum())
        norm = total if reference is None else max(float(e[reference[name]:].sum()), 1e-12 * total)
        gains[name] = (m, n, (e / norm) if total > 0 else torch.zeros_like(e))
    return greedy_ranks(gains, budget)


def greedy_ranks(gains: dict[str, tuple[int, int, torch.Tensor]], budget: int,
                 step: int = 1) -> dict[str, int | None]:
    """Ranks under `budget` parameters from each linear's non-increasing gain per component.

    Every linear starts at rank `step` (rank 0 would delete it). Items are taken from a heap
    keyed by gain per parameter; an item is the next `step` components of one linear (so every
    rank is a multiple of `step`) and within a linear they come in order, so its rank is always
    a prefix of its spectrum. Past the largest rank (multiple of `step`) that saves parameters a
    linear's only item is to stay dense (None), which costs the rest of its m n and buys the
    rest of its gains; a linear where no such rank exists is dense from the start.
    """
    state: dict[str, list] = {}      # name -> [k, dense, m, n, gains, k_max, step]
    heap: list = []
    spent = 0
    for name, (m, n, e) in gains.items():
        k_max = rank_cap(m, n, step)                    # largest multiple of step with k (m + n) < m n
        state[name] = [step if k_max else 0, not k_max, m, n, e.tolist(), k_max, step]
        spent += step * (m + n) if k_max else m * n
        _push_next(heap, name, state[name])
    if spent > budget and step > 1:
        raise UserError(f"rank_multiple {step} is too large for this model at this ratio: rank {step} for every "
                        f"linear (dense where no multiple of {step} saves parameters) needs {spent} parameters, "
                        f"more than the budget of {budget}; use a smaller rank_multiple or a lower ratio")
    if spent > budget:
        raise UserError(f"the parameter budget ({budget}) does not even cover rank 1 for every linear")
    while heap:
        _, _, name, cost = heapq.heappop(heap)
        st = state[name]
        if spent + cost > budget:
            continue                                     # this linear is done
        spent += cost
        if st[0] == st[5]:
            st[1] = True                                 # stays dense
        else:
            st[0] += step
            _push_next(heap, name, st)
    return {name: (None if st[1] else st[0]) for name, st in state.items()}


def _push_next(heap: list, name: str, st: list) -> None:
    k, dense, m, n, e, k_max, step = st
    if dense:
        return
    if k < k_max:
        gain, cost = sum(e[k:k + step]), step * (m + n)
    else:
        gain, cost = sum(e[k:]), m * n - k * (m + n)
    heapq.heappush(heap, (-gain / cost, name, name, cost))


def params_of(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(shapes[n][0] * shapes[n][1] if k is None else k * sum(shapes[n]) for n, k in ranks.items())


def global_ranks(model, calib_ids: torch.Tensor, config, device, rep: Reporter | None = None,
                 fisher: dict | None = None, forward_dtype: torch.dtype | None = None):
    """The pipeline's hook: (rank_fn, allocation_info) for `config.allocation == "global"`."""
    t0 = time.perf_counter()
    spectra = global_spectra(model, calib_ids, config, device, rep, fisher, forward_dtype)
    return allocate_ratio(spectra, config.ratio, time.perf_counter() - t0)


def global_spectra(model, calib_ids: torch.Tensor, config, device, rep: Reporter | None = None,
                   fisher: dict | None = None, forward_dtype: torch.dtype | None = None, layer_io=None,
                   activations=None):
    """name -> (m, n, spectrum) for every ratio's allocation and rank rounding (one dense pass;
    a sweep shares it; streamed through `layer_io` when given)."""
    rep = rep or Reporter()
    method = get_method(config.method, config.method_options)
    why = "global allocation" if config.allocation == "global" else f"rank_multiple {config.rank_multiple}"
    if "fisher" in method.needs and fisher is None:
        raise UserError(f"{why} with method {config.method!r} needs its Fisher information")
    rep.log(f"{why}: one dense calibration pass for the spectra", "whiten")
    return whitened_spectra(model, calib_ids, method, config.targets, config.calibration_batch_size, device,
                            fisher, forward_dtype, rep, layer_io, activations)


# `auto` chooses `loss` when its pass is estimated to take at most this share of the available memory
AUTO_LOSS_MEMORY_SHARE = 0.6


# Bytes of the loss-aware pass's peak per component float ((m + n) min(m, n) per linear), measured:
# SmolLM2-135M at 0.4 peaked at 4.86 GB against uniform's 1.96 GB (docs/benchmarks.json), 2.9 GB
# for 158 M component floats: the components in fp32, their copies in the pass's dtype, the
# decompositions they come from, and the backward's activations.
LOSS_PASS_BYTES_PER_FLOAT = 18


def loss_pass_bytes(model, names: list[str]) -> int:
    """Estimated memory of the loss-aware pass beside the loaded dense model (LOSS_PASS_BYTES_PER_FLOAT)."""
    floats = 0
    for name in names:
        m, n = model.get_submodule(name).weight.shape
        floats += (m + n) * min(m, n)
    return LOSS_PASS_BYTES_PER_FLOAT * floats


def choose_allocation(model, names: list[str], streaming: bool) -> tuple[str, str]:
    """`allocation="auto"`: (the allocation the job uses, why). Loss-aware allocation is the better
    plan at the same parameters (SmolLM2 at 0.4: PPL 0.66x uniform's, in 2.7x uniform's compression
    time, docs/benchmarks.md); it needs the whole dense model and its gradient pass in memory, so a
    job that streams, or whose pass would not fit, keeps uniform ranks."""
    if streaming:
        return "uniform", ("the job streams one layer at a time and loss-aware allocation back-propagates "
                           "through the whole dense model")
    import psutil

    need, avail = loss_pass_bytes(model, names), psutil.virtual_memory().available
    if need > AUTO_LOSS_MEMORY_SHARE * avail:
        return "uniform", (f"the loss-aware pass would need about {need / GiB:.1f} GiB beside the model, over "
                           f"{AUTO_LOSS_MEMORY_SHARE:.0%} of the {avail / GiB:.1f} GiB available")
    return "loss", (f"the dense model is in memory and the loss-aware pass fits (about {need / GiB:.1f} GiB of "
                    f"{avail / GiB:.1f} GiB available)")


def needs_spectra(config) -> bool:
    """Whether the ranks of `config` come from a spectra pass: global or loss-aware allocation, or rank
    rounding."""
    return config.allocation in ("global", "loss") or config.rank_multiple > 1


def plan_spectra(model, calib_ids: torch.Tensor, config, device, rep: Reporter | None = None,
                 fisher: dict | None = None, forward_dtype: torch.dtype | None = None, layer_io=None,
                 activations=None, check_cancel=None) -> tuple[dict, dict | None]:
    """(spectra, loss scores or None): what `rank_plan` needs for every ratio of `config` (one pass;
    for `allocation="loss"` also one forward + backward of the dense model, `svdforge.core.sensitivity`)."""
    if config.allocation != "loss":
        return global_spectra(model, calib_ids, config, device, rep, fisher, forward_dtype, layer_io,
                              activations), None
    rep = rep or Reporter()
    if layer_io is not None:
        raise UserError("loss-aware allocation back-propagates through the whole dense model, so the job "
                        "cannot stream; use streaming 'off' or another allocation")
    method = get_method(config.method, config.method_options)
    if "fisher" in method.needs and fisher is None:
        raise UserError(f"loss-aware allocation with method {config.method!r} needs its Fisher information")
    rep.log("loss-aware allocation: one dense calibration pass for the spectra and components", "whiten")
    t0 = time.perf_counter()
    spectra, components = whitened_spectra(model, calib_ids, method, config.targets,
                                           config.calibration_batch_size, device, fisher, forward_dtype, rep,
                                           activations=activations, keep_components=True)
    t1 = time.perf_counter()
    gdt = forward_dtype or next(model.parameters()).dtype
    grads = component_gradients(model, calib_ids, components, device, rep, check_cancel, gdt)
    del components
    scores = {name: score(g, config.loss_score) for name, g in grads.items()}
    return spectra, {"scores": scores, "kind": config.loss_score, "spectra_seconds": t1 - t0,
                     "gradient_seconds": time.perf_counter() - t1, "windows": int(calib_ids.shape[0]),
                     "gradient_dtype": str(gdt).removeprefix("torch.")}


def rank_plan(spectra: dict[str, tuple[int, int, torch.Tensor]], config, ratio: float, seconds: float = 0.0,
              scores: dict | None = None):
    """(rank_fn, allocation_info or None, rank_rounding or None) at `ratio`: `config.allocation`'s
    ranks, rounded to multiples of `config.rank_multiple` when it is > 1 (`svdforge.core.rounding`).
    `scores`: `plan_spectra`'s loss scores (needed by `allocation="loss"`)."""
    if config.allocation == "loss":
        rank_fn, info = allocate_loss(spectra, scores, ratio, seconds)
    elif config.allocation == "global":
        rank_fn, info = allocate_ratio(spectra, ratio, seconds)
    else:
        rank_fn, info = (lambda name, m, n: uniform_rank(m, n, ratio)), None
    if config.rank_multiple == 1:
        return rank_fn, info, None
    if config.allocation == "loss":      # one budget, no kinds to round within: choose in blocks of N
        rounded_fn, rounding = allocate_loss_blocks(spectra, scores, ratio, config.rank_multiple, info["ranks"])
    else:
        rounded_fn, rounding = rounded(spectra, rank_fn, config.rank_multiple)
    rounding["spectra_seconds"] = seconds
    return rounded_fn, info, rounding


def allocate_ratio(spectra: dict[str, tuple[int, int, torch.Tensor]], ratio: float, seconds: float = 0.0):
    """(rank_fn, allocation_info) spending what `uniform` at `ratio` would spend."""
    t0 = time.perf_counter()
    shapes = {name: (m, n) for name, (m, n, _) in spectra.items()}
    reference = {name: uniform_rank(m, n, ratio) for name, (m, n) in shapes.items()}
    ranks: dict[str, int | None] = {}
    for kind in sorted({kind_of(n) for n in spectra}):
        group = {n: v for n, v in spectra.items() if kind_of(n) == kind}
        ranks.update(allocate(group, sum(uniform_cost(m, n_, ratio) for m, n_, _ in group.values()), reference))
    info = _plan_info(spectra, ranks, ratio, "sigma_i^2 / sum_{j >= k_uniform} sigma_j^2 per linear (its loss "
                      "relative to uniform's), per parameter (m + n); each kind keeps uniform's budget")
    info["seconds"] = seconds + time.perf_counter() - t0
    return _lookup(ranks, "global allocation"), info


def allocate_loss(spectra: dict[str, tuple[int, int, torch.Tensor]], scores: dict, ratio: float,
                  seconds: float = 0.0):
    """(rank_fn, allocation_info): ranks from the components' loss scores under ONE budget for the
    whole model (what `uniform` at `ratio` spends, no per-kind budget); a linear may stay dense."""
    t0 = time.perf_counter()
    gains, budget = _loss_gains(spectra, scores, ratio)
    ranks = greedy_ranks(gains, budget)
    info = _plan_info(spectra, ranks, ratio, f"{scores['kind']} score: estimated loss increase of removing each "
                      "component (svdforge.core.sensitivity), per parameter (m + n); one budget for the whole model")
    info.update(score=scores["kind"], gradient_windows=scores["windows"], gradient_dtype=scores.get("gradient_dtype"),
                spectra_seconds=scores.get("spectra_seconds"), gradient_seconds=scores["gradient_seconds"],
                seconds=seconds + time.perf_counter() - t0)
    return _lookup(ranks, "loss-aware allocation"), info


def _loss_gains(spectra: dict[str, tuple[int, int, torch.Tensor]], scores: dict, ratio: float):
    """(name -> (m, n, concave loss scores), the one budget: what `uniform` at `ratio` spends)."""
    gains = {name: (m, n, concave(scores["scores"][name])) for name, (m, n, _) in spectra.items()}
    return gains, sum(uniform_cost(m, n, ratio) for m, n, _ in spectra.values())


def allocate_loss_blocks(spectra: dict[str, tuple[int, int, torch.Tensor]], scores: dict, ratio: float,
                         multiple: int, unrounded: dict[str, int | None]):
    """(rank_fn, rank_rounding) of a loss plan with every rank a multiple of `multiple`: the same
    greedy choice under the same one budget, in blocks of `multiple` components (each block worth
    its components' loss scores), so no kind has to pay for its own round-ups (per-kind rounding,
    `svdforge.core.rounding`, would refuse a kind the plan left at ranks below `multiple`)."""
    shapes = {name: (m, n) for name, (m, n, _) in spectra.items()}
    gains, budget = _loss_gains(spectra, scores, ratio)
    ranks = greedy_ranks(gains, budget, step=multiple)
    used = params_of(ranks, shapes)
    kinds = sorted({kind_of(n) for n in shapes})
    by_kind = {kind: {"used_params": params_of({n: k for n, k in ranks.items() if kind_of(n) == kind}, shapes),
                      "mean_rank_unrounded": mean_rank(unrounded, shapes, kind),
                      "mean_rank": mean_rank(ranks, shapes, kind)} for kind in kinds}
    return _lookup(ranks, "loss-aware allocation"), {
        "rank_multiple": multiple, "budget_params": budget, "used_params": used, "unspent_params": budget - used,
        "normalisation": f"loss scores in blocks of {multiple} components, per parameter {multiple} (m + n); one "
                         "budget for the whole model (no per-kind rounding)",
        "by_kind": by_kind, "made_dense": sorted(n for n, k in ranks.items() if k is None and unrounded[n] is not None),
        "unrounded": dict(unrounded)}


def _plan_info(spectra: dict, ranks: dict[str, int | None], ratio: float, normalisation: str) -> dict:
    """The report's `allocation_info`: budget, parameters against uniform's, ranks, dense linears."""
    shapes = {name: (m, n) for name, (m, n, _) in spectra.items()}
    uniform = {name: (uniform_rank(m, n, ratio) if saves_params(m, n, uniform_rank(m, n, ratio))
                      else None) for name, (m, n) in shapes.items()}
    return {
        "normalisation": normalisation,
        "budget_params": sum(uniform_cost(m, n, ratio) for m, n in shapes.values()),
        "allocated_params": params_of(ranks, shapes),
        "uniform_params": params_of(uniform, shapes),
        "kept_dense": sorted(n for n, k in ranks.items() if k is None),
        "ranks": ranks,
        "uniform_ranks": uniform,
        "retained_energy": {n: _retained(spectra[n][2], k) for n, k in ranks.items()},
        "by_kind": _by_kind(ranks, uniform),
    }


def _lookup(ranks: dict[str, int | None], what: str):
    def rank_fn(name: str, m: int, n: int) -> int | None:
        if name not in ranks:
            raise UserError(f"{what} has no rank for {name}")
        return ranks[name]

    return rank_fn


def _retained(sigma: torch.Tensor, k: int | None) -> float:
    e = sigma.pow(2)
    total = float(e.sum())
    return 1.0 if k is None or total == 0 else float(e[:k].sum()) / total


def _by_kind(ranks: dict, uniform: dict) -> dict[str, float]:
    """Mean of (global rank / uniform rank) per linear kind (q_proj, down_proj, ...): the shape
    of the allocation at a glance. Linears kept dense are listed in `kept_dense` instead."""
    acc: dict[str, list[float]] = {}
    for name, k in ranks.items():
        ku = uniform.get(name)
        if k is None or not ku:
            continue
        acc.setdefault(name.rsplit(".", 1)[-1], []).append(k / ku)
    return {kind: sum(v) / len(v) for kind, v in sorted(acc.items())}
