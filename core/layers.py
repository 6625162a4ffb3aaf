"""Where a causal LM keeps what svdforge compresses: its decoder layers and their linears."""
from __future__ import annotations

import re

from torch import nn

from svdforge.core.errors import UserError
from svdforge.core.lowrank import LowRankLinear

ATTENTION = re.compile(r"(^|\.)(self_attn|attention|attn)\.")
MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn)\.")


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers and their name prefix (e.g. `model.layers`)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return mod, name
    raise UserError("could not find the decoder layers of this model (no ModuleList of num_hidden_layers)")


def _selected(full: str, targets: str) -> bool:
    if targets == "all":
        return True
    if targets == "attention":
        return bool(ATTENTION.search(full))
    if targets == "mlp":
        return bool(MLP.search(full))
    return re.search(targets[3:], full) is not None


def select_linears(layer: nn.Module, prefix: str, targets: str) -> list[tuple[str, nn.Linear]]:
    """Target linears of one layer as (full name, module), in execution-friendly order.

    targets: `all`, `attention`, `mlp`, or `re:<regex>` matched against the full name."""
    return [(f"{prefix}.{local}", mod) for local, mod in layer.named_modules()
            if isinstance(mod, nn.Linear) and not isinstance(mod, LowRankLinear)
            and _selected(f"{prefix}.{local}", targets)]


def target_names(model: nn.Module, targets: str) -> list[str]:
    """Full names of every target linear of the model, layer by layer."""
    layers, prefix = decoder_layers(model)
    return [n for i, layer in enumerate(layers) for n, _ in select_linears(layer, f"{prefix}.{i}", targets)]
