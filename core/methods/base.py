"""What every decomposition method is: its options' config dataclass, its statistics, its math.

A method turns a weight `W` (m x n), a rank `k` and the statistics of the linear's input
into factors `W_u` (m x k), `W_v` (k x n). It declares which statistics it needs, so the
layer loop collects only those:

- `gram`: G = sum x x^T over calibration tokens (shared by linears with one input),
- `abs_mean`: mean |x| per input channel,
- `fisher`: squared gradients of the LM loss w.r.t. W (needs a backward pass).

Each method module defines a `MethodConfig` subclass (its options, validated on
construction: a bad value raises `UserError` naming the field) and a `Method` subclass
registered under its name (peft's shape: a config dataclass per method, a registry that is
the one source of the names). Registering imports no torch: the service validates method
names and options with the registry alone; the math imports `svdforge.core.linalg` when it runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from svdforge.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from svdforge.core.linalg import Factors, Truncation


@dataclass
class InputStats:
    """Statistics of one distinct linear input (q/k/v share one, gate/up share one)."""

    gram: torch.Tensor | None = None      # n x n, fp64
    abs_sum: torch.Tensor | None = None   # n, fp64
    tokens: int = 0
    cache: dict = field(default_factory=dict)   # per-input results shared by its linears (a whitening)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class MethodConfig:
    """A method's options. Subclasses add fields with defaults and check them in `__post_init__`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()

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


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Every method's name, in registration order (the CLI, the API schema and the docs list these)."""
    return tuple(REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"method must be one of {', '.join(REGISTRY)}; got {name!r}")
    return REGISTRY[name]


def method_config(name: str, options: MethodConfig | dict | None = None) -> MethodConfig:
    """The validated options of method `name` (a dict names fields of its config dataclass)."""
    cls = method_class(name).config_cls
    if isinstance(options, cls):
        return options
    if isinstance(options, MethodConfig):   # another method's options (the method was changed): by value
        options = options.to_dict()
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise UserError(f"method_options: {name} has no option {', '.join(unknown)} (its options: {allowed})")
    return cls(**options)


def get_method(name: str, options: MethodConfig | dict | None = None) -> Method:
    """An instance of method `name` with its (validated) options."""
    return method_class(name)(method_config(name, options))


def method_options_help() -> str:
    """Each method's options with their defaults, e.g. `asvd: alpha=0.5; fwsvd: samples=16`."""
    parts = []
    for name, cls in REGISTRY.items():
        fields = dataclasses.fields(cls.config_cls)
        if fields:
            parts.append(f"{name}: " + ", ".join(f"{f.name}={f.default}" for f in fields))
    return "; ".join(parts)
