"""The one helper that registers and removes forward hooks.

Every hook in svdforge (catching the inputs of decoder layer 0, collecting the statistics
of a layer's linears, pairing the dense and the compressed inputs of the closed-form
update) goes through a `Hooks` set: hooks are added one by one and all removed together
when the set closes, whatever happened in between (llm-compressor's `HooksMixin` has the
same shape).

    with Hooks() as hooks:
        hooks.pre(linear, fn)          # fn(module, args) before linear.forward
        hooks.pre(layer, fn, with_kwargs=True)
        model(...)
    # every hook is gone here
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn


class Hooks:
    """A set of forward (pre-)hooks removed together by `remove()` or on leaving `with`."""

    def __init__(self) -> None:
        self._handles: list = []

    def pre(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
