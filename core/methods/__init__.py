"""Decomposition methods behind one interface, one module each (peft-style registry).

`svdforge.core.methods.base` says what a method is; each module below defines one method and
the config dataclass of its options. They are registered here, in the order every list of
method names shows them (CLI help, API schema, docs).
"""
from svdforge.core.methods import asvd, fwsvd, svd, svd_llm
from svdforge.core.methods.base import (
    REGISTRY,
    InputStats,
    Method,
    MethodConfig,
    get_method,
    method_class,
    method_config,
    method_names,
    method_options_help,
    register,
)

for _cls in (svd.PlainSVD, svd_llm.SVDLLM, asvd.ASVD, fwsvd.FWSVD):
    register(_cls)

__all__ = ["REGISTRY", "InputStats", "Method", "MethodConfig", "get_method", "method_class", "method_config",
           "method_names", "method_options_help", "register"]
