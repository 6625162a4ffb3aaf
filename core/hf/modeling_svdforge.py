"""Model code of a model compressed by svdforge: transformers' own classes for the base
architecture (subclassed, not copied), where every linear named in `config.svdforge["ranks"]`
is two thin linears, y = u(v(x)): `v` maps in_features -> rank, `u` maps rank ->
out_features (with the original bias). The weights are `<linear>.u.weight`,
`<linear>.v.weight` (and `<linear>.u.bias`). The swap is done in the base model, where vLLM's
Transformers backend looks for it. This file is the same in every artifact.
"""
import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma2Model,
    GPTNeoXForCausalLM,
    GPTNeoXModel,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    Phi3ForCausalLM,
    Phi3Model,
    Qwen2ForCausalLM,
    Qwen2Model,
)

from .configuration_svdforge import (
    SvdforgeGemma2Config,
    SvdforgeGPTNeoXConfig,
    SvdforgeLlamaConfig,
    SvdforgeMistralConfig,
    SvdforgePhi3Config,
    SvdforgeQwen2Config,
)


class LowRankLinear(nn.Module):
    """W ~ u.weight @ v.weight; both factors are plain nn.Linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_linears(base_model: nn.Module, config) -> None:
    """Replace, inside the base model, each compressed linear by an empty LowRankLinear."""
    prefix = base_model.base_model_prefix + "."
    holders = {}
    for name, rank in config.svdforge["ranks"].items():
        if rank is None:
            continue
        parent, _, child = name.removeprefix(prefix).rpartition(".")
        holder = base_model.get_submodule(parent)
        dense = getattr(holder, child)
        setattr(holder, child, LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None,
                                             dense.weight.dtype, dense.weight.device))
        holders[id(holder)] = holder
    for holder in holders.values():
        _class_by_pattern(holder)


_PATTERN_CLASSES: dict = {}


def _class_by_pattern(holder: nn.Module) -> None:
    """Give a module whose linears are (partly) factored a subclass of its own class named by which
    children are factored (same forward). vLLM's Transformers backend caches the fusions it finds
    (q/k/v into one GEMM, gate/up into one) per module class and child names, then checks each
    instance with nn.Linear's attributes: where some layers keep a linear dense (loss-aware ranks),
    a layer with factored q/k/v must not share a class with one whose q/k/v are all dense."""
    base = getattr(type(holder), "_svdforge_base", type(holder))
    pattern = tuple(sorted(n for n, c in holder.named_children() if isinstance(c, LowRankLinear)))
    cls = _PATTERN_CLASSES.get((base, pattern))
    if cls is None:
        cls = type(f"{base.__name__}LowRank_{'_'.join(pattern)}", (base,),
                   {"_svdforge_base": base, "__module__": base.__module__})
        _PATTERN_CLASSES[(base, pattern)] = cls
    holder.__class__ = cls


def _compressed(base, config_class):
    """`base` (a `...Model` or `...ForCausalLM` class) with its linears swapped after construction."""

    def __init__(self, config):
        base.__init__(self, config)
        swap_linears(self.base_model, config)

    name = "Svdforge" + base.__name__
    return type(name, (base,), {"__init__": __init__, "config_class": config_class, "__module__": __name__})


SvdforgeLlamaModel, SvdforgeLlamaForCausalLM = (_compressed(c, SvdforgeLlamaConfig)
                                                for c in (LlamaModel, LlamaForCausalLM))
SvdforgeMistralModel, SvdforgeMistralForCausalLM = (_compressed(c, SvdforgeMistralConfig)
                                                    for c in (MistralModel, MistralForCausalLM))
SvdforgeQwen2Model, SvdforgeQwen2ForCausalLM = (_compressed(c, SvdforgeQwen2Config)
                                                for c in (Qwen2Model, Qwen2ForCausalLM))
SvdforgePhi3Model, SvdforgePhi3ForCausalLM = (_compressed(c, SvdforgePhi3Config)
                                              for c in (Phi3Model, Phi3ForCausalLM))
SvdforgeGemma2Model, SvdforgeGemma2ForCausalLM = (_compressed(c, SvdforgeGemma2Config)
                                                  for c in (Gemma2Model, Gemma2ForCausalLM))
SvdforgeGPTNeoXModel, SvdforgeGPTNeoXForCausalLM = (_compressed(c, SvdforgeGPTNeoXConfig)
                                                    for c in (GPTNeoXModel, GPTNeoXForCausalLM))
