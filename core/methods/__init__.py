"""Decomposition methods behind one interface, one module each (peft-style registry).

A method turns a weight `W` (m x n), a rank `k` and the statistics of the linear's input
into factors `W_u` (m x k), `W_v` (k x n). It declares which statistics it needs, so the
calibration loop collects only those:

- `gram`: G = sum x x^T over calibration tokens (shared by linears with one input),
- `abs_mean`: mean |x| per input channel,
- `fisher`: squared gradients of the LM loss w.r.t. W (needs a backward pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from svdforge.core.linalg import Factors, Truncation


@dataclass
class InputStats:
    """Statistics of one distinct linear input (q/k/v share one, gate/up share one)."""

    gram: torch.Tensor | None = None      # n x n, fp64
    abs_sum: torch.Tensor | None = None   # n, fp64
    tokens: int = 0
    cache: dict = field(default_factory=dict)   # per-input results shared by its linears

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class Method:
    name: str = ""
    needs: frozenset[str] = frozenset()

    def prepare(self, W: torch.Tensor, stats: InputStats, fisher: torch.Tensor | None) -> Truncation:
        """The decomposition of the scaled weight, before truncation: `.factors(k)` for any k.

        A sweep prepares each linear once and truncates it at every ratio's rank."""
        raise NotImplementedError

    def factorize(self, W: torch.Tensor, k: int, stats: InputStats, fisher: torch.Tensor | None) -> Factors:
        t = self.prepare(W, stats, fisher)
        f = t.factors(k)
        f.info.update(t.info)
        return f

    def spectrum(self, W: torch.Tensor, stats: InputStats, fisher: torch.Tensor | None) -> torch.Tensor:
        """Singular values of the scaled weight: sum of squares past k is the truncation loss."""
        return self.factorize(W, 1, stats, fisher).sigma


REGISTRY: dict[str, Method] = {}


def register(cls):
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    return REGISTRY[name]


from svdforge.core.methods import asvd, fwsvd, svd, svd_llm  # noqa: E402,F401  (fill the registry)
