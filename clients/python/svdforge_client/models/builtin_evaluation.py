from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="BuiltinEvaluation")


@_attrs_define
class BuiltinEvaluation:
    """
    Attributes:
        enabled (bool | Unset): Measure perplexity and fidelity against the dense model. Default: True.
        seq_len (int | Unset): Tokens per window. Default: 256.
        max_tokens (int | None | Unset): Evaluation tokens (null: the whole text). Default: 4096.
        batch_size (int | Unset):  Default: 1.
        throughput (bool | Unset): Also time dense vs compressed forward passes. Default: True.
        prompts (list[str] | Unset): Up to 8 prompts the dense and the compressed model complete greedily for the
            report's `samples` (and the `samples.md` artifact), after the fixed ones: 'The capital of France is', 'Once upon
            a time,', 'def fibonacci(n):'.
        sample_tokens (int | Unset): New tokens per sample completion. Default: 32.
        source (Literal['builtin'] | Unset):  Default: 'builtin'.
    """

    enabled: bool | Unset = True
    seq_len: int | Unset = 256
    max_tokens: int | None | Unset = 4096
    batch_size: int | Unset = 1
    throughput: bool | Unset = True
    prompts: list[str] | Unset = UNSET
    sample_tokens: int | Unset = 32
    source: Literal["builtin"] | Unset = "builtin"

    def to_dict(self) -> dict[str, Any]:
        enabled = self.enabled

        seq_len = self.seq_len

        max_tokens: int | None | Unset
        if isinstance(self.max_tokens, Unset):
            max_tokens = UNSET
        else:
            max_tokens = self.max_tokens

        batch_size = self.batch_size

        throughput = self.throughput

        prompts: list[str] | Unset = UNSET
        if not isinstance(self.prompts, Unset):
            prompts = self.prompts

        sample_tokens = self.sample_tokens

        source = self.source

        field_dict: dict[str, Any] = {}

        field_dict.update({})
        if enabled is not UNSET:
            field_dict["enabled"] = enabled
        if seq_len is not UNSET:
            field_dict["seq_len"] = seq_len
        if max_tokens is not UNSET:
            field_dict["max_tokens"] = max_tokens
        if batch_size is not UNSET:
            field_dict["batch_size"] = batch_size
        if throughput is not UNSET:
            field_dict["throughput"] = throughput
        if prompts is not UNSET:
            field_dict["prompts"] = prompts
        if sample_tokens is not UNSET:
            field_dict["sample_tokens"] = sample_tokens
        if source is not UNSET:
            field_dict["source"] = source

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        enabled = d.pop("enabled", UNSET)

        seq_len = d.pop("seq_len", UNSET)

        def _parse_max_tokens(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        max_tokens = _parse_max_tokens(d.pop("max_tokens", UNSET))

        batch_size = d.pop("batch_size", UNSET)

        throughput = d.pop("throughput", UNSET)

        prompts = cast(list[str], d.pop("prompts", UNSET))

        sample_tokens = d.pop("sample_tokens", UNSET)

        source = cast(Literal["builtin"] | Unset, d.pop("source", UNSET))
        if source != "builtin" and not isinstance(source, Unset):
            raise ValueError(f"source must match const 'builtin', got '{source}'")

        builtin_evaluation = cls(
            enabled=enabled,
            seq_len=seq_len,
            max_tokens=max_tokens,
            batch_size=batch_size,
            throughput=throughput,
            prompts=prompts,
            sample_tokens=sample_tokens,
            source=source,
        )

        return builtin_evaluation
