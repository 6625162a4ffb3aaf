"""The module that replaces a compressed nn.Linear: y = u(v(x)), two thin matmuls."""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """W ~ W_u W_v: `v` maps in_features -> rank, `u` maps rank -> out_features (+ bias).

    Both are plain nn.Linear, so peft can put adapters on them (SPEC stage 3) and the
    state dict is `<name>.u.weight`, `<name>.v.weight` (+ `<name>.u.bias`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device=None) -> LowRankLinear:
        m, k = u.shape
        n = v.shape[1]
        mod = cls(n, m, k, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            mod.u.weight.copy_(u)
            mod.v.weight.copy_(v)
            if bias is not None:
                mod.u.bias.copy_(bias)
        return mod

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_ranks(model: nn.Module, ranks: dict[str, int | None]) -> None:
    """Replace every linear named in `ranks` (rank not None) by an empty LowRankLinear."""
    for name, k in ranks.items():
        if k is None:
            continue
        lin = model.get_submodule(name)
        if isinstance(lin, LowRankLinear):
            continue
        w = lin.weight
        set_submodule(model, name, LowRankLinear(lin.in_features, lin.out_features, k,
                                                 bias=lin.bias is not None, dtype=w.dtype, device=w.device))
