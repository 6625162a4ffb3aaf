from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="Refine")


@_attrs_define
class Refine:
    """Layer-local refinement: right after each decoder layer is compressed (sequential
    calibration), `passes` passes of Adam over the calibration windows train its low-rank
    factors so that the compressed layer, on the compressed model's inputs, outputs what the
    dense layer outputs on the dense model's inputs. Combines with any adapter; shapes unchanged.

        Attributes:
            passes (int | Unset): Full passes over the calibration windows (one Adam step per calibration batch). Default:
                2.
            lr (float | Unset): Adam step size. Default: 0.0003.
            norms (bool | Unset): Also train each layer's normalisation weights. Default: False.
    """

    passes: int | Unset = 2
    lr: float | Unset = 0.0003
    norms: bool | Unset = False

    def to_dict(self) -> dict[str, Any]:
        passes = self.passes

        lr = self.lr

        norms = self.norms

        field_dict: dict[str, Any] = {}

        field_dict.update({})
        if passes is not UNSET:
            field_dict["passes"] = passes
        if lr is not UNSET:
            field_dict["lr"] = lr
        if norms is not UNSET:
            field_dict["norms"] = norms

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        passes = d.pop("passes", UNSET)

        lr = d.pop("lr", UNSET)

        norms = d.pop("norms", UNSET)

        refine = cls(
            passes=passes,
            lr=lr,
            norms=norms,
        )

        return refine
