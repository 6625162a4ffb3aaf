from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="UpdateAdapter")


@_attrs_define
class UpdateAdapter:
    """SVD-LLM's closed-form least-squares update of W_u given W_v, layer by layer during
    calibration (sequential mode); no training, no extra parameters.

        Attributes:
            type_ (Literal['update']):
            mix (float | Unset): Closed-form update: weight of the dense model's output W X in the least-squares target (the
                rest is the dense weight on the compressed-path inputs, W X'). 0 changes nothing, 1 fits the dense output
                exactly (overfits on SmolLM2); the default was picked by benchmark. Default: 0.2.
    """

    type_: Literal["update"]
    mix: float | Unset = 0.2

    def to_dict(self) -> dict[str, Any]:
        type_ = self.type_

        mix = self.mix

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "type": type_,
            }
        )
        if mix is not UNSET:
            field_dict["mix"] = mix

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        type_ = cast(Literal["update"], d.pop("type"))
        if type_ != "update":
            raise ValueError(f"type must match const 'update', got '{type_}'")

        mix = d.pop("mix", UNSET)

        update_adapter = cls(
            type_=type_,
            mix=mix,
        )

        return update_adapter
