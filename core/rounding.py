"""Ranks rounded to multiples of N (`CompressConfig.rank_multiple`) within the same parameters.

Matrix kernels run best on dimensions that are multiples of their tile (8 or 16 for tensor
cores, 64 or 128 for many GEMM tilings), and the ranks a ratio gives are not (SmolLM2 at 0.4:
172, 86 and 251). With `rank_multiple = N` every compressed linear's rank is a multiple of N
and the compressed linears use no more parameters than the unrounded ranks would.

Where: the layer loop's decomposition handlers (`svdforge.core.decompose`) call
`RankRounder.layer` once per decoder layer, after the ranks are planned (uniform or global)
and the layer's linears are decomposed, before they are truncated; so it works the same in
memory, streamed, sequential, parallel and in a sweep (one rounder per ratio). Per layer:

1. The budget: what the layer's compressed linears cost at their planned ranks, k (m + n)
   each, plus what earlier layers left unspent (the carry). Linears planned dense stay so.
2. Every rank goes down to a multiple of N, floor(k / N) N, and a rank below N up to N.
   A linear where no multiple of N saves parameters (N above its largest useful rank
   floor((m n - 1) / (m + n))) stays dense, charged m n, as any rank that saves nothing.
3. While the layer spends more than its budget, the block of N components worth least is
   taken back (never below N); then, while a block of N still fits in what is left, the block
   worth most is handed out (never above the largest multiple of N that saves parameters).
   A block's worth is its sigma_i^2 over the linear's tail at its planned rank
   (sum_{i >= k} sigma_i^2, what the linear loses without rounding), per parameter N (m + n):
   global allocation's currency (`svdforge.core.allocation`), invariant to scaling a linear.
4. What is left is carried to the next layer.

Guarantee. The compressed linears never use more parameters than at their planned ranks
(`check_layers` refuses, before the first layer is calibrated, an N so large that a layer
cannot afford its smallest multiples), and what is unspent at the end is less than N (m + n) of the cheapest
linear of the last layer that could still take a block; only when no linear of the last
layer can grow (every rank at its cap) is more left, what the caps leave. N = 1 never gets here.

Limits. The blocks move between the linears of one layer (and the carry between
consecutive layers): the loop decides layer l before it has seen layer l + 1, which is what
lets a streamed or sequential job round at all. So blocks can move between kinds within a
layer (global allocation itself keeps each kind's total, see its module doc); the amounts
are bounded by one block per linear.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from svdforge.core.errors import UserError


@dataclass
class Candidate:
    """One compressed linear of a layer: shape, planned rank, normalised energies sigma_i^2."""

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
    """Lower ranks by blocks worth least until the pool is not negative (or nothing is left)."""
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


def round_layer(cands: list[Candidate], multiple: int, carry: int = 0) -> tuple[dict[str, int | None], int]:
    """(name -> rank, a multiple of `multiple` or None for dense; the pool left) for one layer
    whose linears may spend their planned ranks' parameters plus `carry` (steps 2-4 above)."""
    ranks = {c.name: first_rank(c.k, c.m, c.n, multiple) for c in cands}
    pool = carry + sum(cost(c.m, c.n, c.k) - cost(c.m, c.n, ranks[c.name]) for c in cands)
    pool = _take_back(cands, ranks, multiple, pool)
    return ranks, _hand_out(cands, ranks, multiple, pool)


class RankRounder:
    """One job's (or one sweep ratio's) rounding, layer after layer: the carry and the totals."""

    def __init__(self, multiple: int):
        self.multiple, self.carry = multiple, 0
        self.budget = self.used = 0
        self.dense: list[str] = []

    def layer(self, cands: list[Candidate]) -> dict[str, int | None]:
        ranks, self.carry = round_layer(cands, self.multiple, self.carry)
        self.budget += sum(cost(c.m, c.n, c.k) for c in cands)
        self.used += sum(cost(c.m, c.n, ranks[c.name]) for c in cands)
        self.dense += [c.name for c in cands if ranks[c.name] is None]
        return ranks

    def report(self) -> dict:
        return {"rank_multiple": self.multiple, "budget_params": self.budget, "used_params": self.used,
                "unspent_params": self.budget - self.used, "made_dense": self.dense,
                "scope": "blocks of rank_multiple components move between the linears of each decoder "
                         "layer, by sigma_i^2 over the tail at the planned rank per parameter; the rest "
                         "carries to the next layer"}


def check_layers(layers: list[list[tuple[int, int, int]]], multiple: int) -> None:
    """Refuse a multiple whose smallest ranks (N, or dense where N saves nothing) cost some layer
    more than its planned ranks: `layers[i]` = (m, n, planned k) of layer i's compressed linears."""
    for i, linears in enumerate(layers):
        budget = sum(cost(m, n, k) for m, n, k in linears)
        need = sum(cost(m, n, multiple if rank_cap(m, n, multiple) else None) for m, n, _ in linears)
        if need > budget:
            raise UserError(f"rank_multiple {multiple} is too large for these ranks: decoder layer {i}'s "
                            f"linears need {need} parameters at their smallest multiples of {multiple} "
                            f"(dense where none saves parameters), more than the {budget} of their "
                            "unrounded ranks; use a smaller rank_multiple or a lower ratio")
