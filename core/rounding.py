"""Ranks rounded to multiples of N (`CompressConfig.rank_multiple`) within the same parameters.

Matrix kernels run best on dimensions that are multiples of their tile (8 or 16 for tensor
cores, 64 or 128 for many GEMM tilings), and the ranks a ratio gives are not (SmolLM2 at 0.4:
172, 86 and 251). With `rank_multiple = N` every compressed linear's rank is a multiple of N
and the compressed linears use no more parameters than at their unrounded ranks.

Where: where ranks are decided. A job with N > 1 takes the whitened spectrum of every target
linear from one dense calibration pass (the pass of global allocation,
`svdforge.core.allocation.global_spectra`; streamed layer by layer when the job streams; once
for every ratio of a sweep), plans its ranks as it would without rounding (uniform or global),
and `round_ranks` rounds the plan; the layer loop then decomposes at the rounded ranks. A `loss`
plan has one budget for the whole model, not one per kind, so it is not rounded here:
`svdforge.core.allocation.allocate_loss_blocks` chooses it in blocks of N instead.

How, for each kind of linear (q_proj, ..., down_proj: all layers' linears of that name), whose
budget is what its planned ranks cost, k (m + n) each:

1. Every rank goes down to a multiple of N, floor(k / N) N, and a rank below N up to N. A
   linear where no multiple of N saves parameters (N above its largest useful rank
   floor((m n - 1) / (m + n))) stays dense, charged m n, as any rank that saves nothing.
2. While the kind spends more than its budget, the block of N components worth least is taken
   back (never below N); if that is not enough, N is refused (`UserError`).
3. While a block of N fits in what is left, the block worth most is handed out, never above
   the largest multiple of N that saves parameters.

A block's worth is its sigma_i^2 over the linear's tail at its planned rank (sum_{i >= k}
sigma_i^2, what the linear loses without rounding), per parameter N (m + n): global
allocation's currency, invariant to scaling a linear's weight or inputs.

Why per kind: as for global allocation (its module doc), no currency compares kinds well.
Measured on SmolLM2 at 0.4 with N = 64 (svd-llm, sequential, 64 x 512 WikiText-2 valid windows,
PPL on the first 4096 test tokens; unrounded ranks: 99.5): blocks pooled over the whole model
hand the MLP's ranks to attention (q/o 172 -> 256, k/v 86 -> 128, MLP 251 -> 198-220): PPL
186.0; per kind: 112.4; per kind without the spectrum (each kind's blocks in layer order,
as a layer-by-layer pass would have to): 121.7. A first version pooled each decoder layer's
linears inside the layer loop: PPL 146.6 (first 32k test tokens, where unrounded is 94.5).

Guarantee: each kind uses at most its budget and leaves less than one block, N (m + n), of
its cheapest linear that could still grow; so the compressed linears never use more
parameters than at their planned ranks, and leave less than the sum over kinds of one block
N (m_kind + n_kind) unspent (more only where ranks stop at their caps). N = 1 never gets here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from svdforge.core.errors import UserError
from svdforge.core.linalg import saves_params

NORMALISATION = ("per kind of linear: blocks of rank_multiple components by sigma_i^2 / sum_{j >= k} sigma_j^2 "
                 "(k: the unrounded rank), per parameter (m + n)")


@dataclass
class Candidate:
    """One planned linear: shape, planned rank, energies sigma_i^2 over its tail at that rank."""

    name: str
    m: int
    n: int
    k: int
    energy: list[float] = field(repr=False)


def largest_useful_rank(m: int, n: int) -> int:
    """The largest k with k (m + n) < m n (0: none)."""
    return (m * n - 1) // (m + n)


def rank_cap(m: int, n: int, multiple: int) -> int:
    """The largest multiple of `multiple` that saves parameters (0: none)."""
    return largest_useful_rank(m, n) // multiple * multiple


def first_rank(k: int, m: int, n: int, multiple: int) -> int | None:
    """Rank k rounded down to a multiple (up to `multiple` from below it); None: stays dense."""
    if rank_cap(m, n, multiple) == 0:
        return None
    return max(multiple, k // multiple * multiple)


def cost(m: int, n: int, k: int | None) -> int:
    return m * n if k is None else k * (m + n)


def candidate(name: str, m: int, n: int, k: int, sigma: torch.Tensor) -> Candidate:
    """The linear's energies divided by its tail at rank k (floored at 1e-12 of its total)."""
    e = sigma.double().pow(2)
    total = float(e.sum())
    if total <= 0:
        return Candidate(name, m, n, k, [0.0] * len(e))
    tail = max(float(e[k:].sum()), 1e-12 * total)
    return Candidate(name, m, n, k, (e / tail).tolist())


def _worth(c: Candidate, lo: int, multiple: int) -> float:
    return sum(c.energy[lo:lo + multiple]) / (multiple * (c.m + c.n))


def _take_back(cands: list[Candidate], ranks: dict, multiple: int, pool: int) -> int:
    """Lower ranks by the blocks worth least until the pool is not negative (or none is left)."""
    while pool < 0:
        able = [c for c in cands if ranks[c.name] is not None and ranks[c.name] > multiple]
        if not able:
            break
        c = min(able, key=lambda c: _worth(c, ranks[c.name] - multiple, multiple))
        ranks[c.name] -= multiple
        pool += multiple * (c.m + c.n)
    return pool


def _hand_out(cands: list[Candidate], ranks: dict, multiple: int, pool: int) -> int:
    """Raise ranks by the blocks worth most while one fits in the pool."""
    while True:
        able = [c for c in cands if ranks[c.name] is not None and multiple * (c.m + c.n) <= pool
                and ranks[c.name] + multiple <= rank_cap(c.m, c.n, multiple)]
        if not able:
            return pool
        c = max(able, key=lambda c: _worth(c, ranks[c.name], multiple))
        ranks[c.name] += multiple
        pool -= multiple * (c.m + c.n)


def round_group(cands: list[Candidate], multiple: int) -> tuple[dict[str, int | None], int]:
    """(name -> rank, a multiple of `multiple` or None for dense; the parameters left) for linears
    that share their planned ranks' budget (steps 1-3 above; a negative rest: over budget)."""
    ranks = {c.name: first_rank(c.k, c.m, c.n, multiple) for c in cands}
    pool = sum(cost(c.m, c.n, c.k) - cost(c.m, c.n, ranks[c.name]) for c in cands)
    pool = _take_back(cands, ranks, multiple, pool)
    return ranks, _hand_out(cands, ranks, multiple, pool)


def kind_of(name: str) -> str:
    """A linear's kind, what its budget is shared with: `q_proj` of `model.layers.3.self_attn.q_proj`."""
    return name.rsplit(".", 1)[-1]


def mean_rank(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]], kind: str) -> float:
    """Mean rank of a kind's linears, a dense one (None) counted at its full rank min(m, n)."""
    ks = [min(shapes[n]) if k is None else k for n, k in ranks.items() if kind_of(n) == kind]
    return sum(ks) / len(ks)


def round_ranks(spectra: dict[str, tuple[int, int, torch.Tensor]], planned: dict[str, int | None],
                multiple: int) -> tuple[dict[str, int | None], dict]:
    """(name -> rounded rank or None, the report's `rank_rounding`) of the planned ranks (None or
    a rank that saves nothing: dense, left so), each kind of linear within its own budget."""
    compressed = {n: k for n, k in planned.items() if k is not None and saves_params(*spectra[n][:2], k)}
    ranks: dict[str, int | None] = {n: None for n in planned if n not in compressed}
    by_kind = {}
    for kind in sorted({kind_of(n) for n in compressed}):
        cands = [candidate(n, spectra[n][0], spectra[n][1], compressed[n], spectra[n][2])
                 for n in compressed if kind_of(n) == kind]
        got, left = round_group(cands, multiple)
        budget = sum(cost(c.m, c.n, c.k) for c in cands)
        if left < 0:
            raise UserError(f"rank_multiple {multiple} is too large for the {kind} linears at these ranks: their "
                            f"smallest multiples of {multiple} (dense where none saves parameters) need "
                            f"{budget - left} parameters, more than the {budget} of their unrounded ranks; use a "
                            "smaller rank_multiple or a lower ratio")
        ranks.update(got)
        by_kind[kind] = {"budget_params": budget, "used_params": budget - left,
                         "mean_rank_unrounded": sum(c.k for c in cands) / len(cands),
                         "mean_rank": mean_rank(got, {c.name: (c.m, c.n) for c in cands}, kind)}
    budget, used = sum(v["budget_params"] for v in by_kind.values()), sum(v["used_params"] for v in by_kind.values())
    return ranks, {"rank_multiple": multiple, "budget_params": budget, "used_params": used,
                   "unspent_params": budget - used, "normalisation": NORMALISATION, "by_kind": by_kind,
                   "made_dense": sorted(n for n in compressed if ranks[n] is None), "unrounded": dict(planned)}


def rounded(spectra: dict[str, tuple[int, int, torch.Tensor]], rank_fn: Callable[[str, int, int], int | None],
            multiple: int) -> tuple[Callable[[str, int, int], int | None], dict]:
    """(the rank function of `rank_fn`'s plan rounded by `round_ranks`, its report)."""
    ranks, info = round_ranks(spectra, {name: rank_fn(name, m, n) for name, (m, n, _) in spectra.items()}, multiple)

    def rank_fn_rounded(name: str, m: int, n: int) -> int | None:
        if name not in ranks:
            raise UserError(f"rank rounding has no rank for {name}")
        return ranks[name]

    return rank_fn_rounded, info
