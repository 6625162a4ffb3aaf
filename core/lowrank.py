"""The module that replaces a compressed nn.Linear: y = u(v(x)), two thin matmuls.

`LowRankLinear` is defined in the remote code that every artifact carries
(`svdforge.core.hf.modeling_svdforge`), so what the pipeline builds and what a deployment
loads are one class. Both factors are plain nn.Linear, so peft can put adapters on them (SPEC
stage 3) and the state dict is `<name>.u.weight`, `<name>.v.weight` (+ `<name>.u.bias`).
"""
from __future__ import annotations

import torch
from torch import nn

from svdforge.core.hf.modeling_svdforge import LowRankLinear

__all__ = ["LowRankLinear", "apply_ranks", "from_factors", "set_submodule"]


def from_factors(u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 device=None) -> LowRankLinear:
    """A LowRankLinear holding u (m x k), v (k x n) and the bias."""
    m, k = u.shape
    mod = LowRankLinear(v.shape[1], m, k, bias=bias is not None, dtype=dtype, device=device)
    with torch.no_grad():
        mod.u.weight.copy_(u)
        mod.v.weight.copy_(v)
        if bias is not None:
            mod.u.bias.copy_(bias)
    return mod


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
