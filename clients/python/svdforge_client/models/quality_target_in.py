from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="QualityTargetIn")


@_attrs_define
class QualityTargetIn:
    """A quality budget instead of a ratio: the job compresses at the largest ratio in
    [`ratio_min`, `ratio_max`] whose compressed model meets the bound on the job's evaluation
    data. Exactly one bound. One calibration serves every probed ratio (parallel-mode statistics
    and each linear's decomposition, computed once); each probe costs one evaluation (dense and
    compressed forwards over the evaluation windows). Bisection stops when the bracket is narrower
    than `tolerance` or after `max_probes` probes. If even `ratio_min` misses, the job fails with
    error code `target_unmet` and no artifact.

        Attributes:
            max_ppl_ratio (float | None | Unset): Compressed perplexity / dense perplexity on the evaluation data, at most
                this.
            max_teacher_kl (float | None | Unset): Mean KL(dense || compressed) per evaluation token, nats, at most this.
            ratio_min (float | Unset):  Default: 0.05.
            ratio_max (float | Unset):  Default: 0.95.
            tolerance (float | Unset):  Default: 0.025.
            max_probes (int | Unset):  Default: 10.
    """

    max_ppl_ratio: float | None | Unset = UNSET
    max_teacher_kl: float | None | Unset = UNSET
    ratio_min: float | Unset = 0.05
    ratio_max: float | Unset = 0.95
    tolerance: float | Unset = 0.025
    max_probes: int | Unset = 10

    def to_dict(self) -> dict[str, Any]:
        max_ppl_ratio: float | None | Unset
        if isinstance(self.max_ppl_ratio, Unset):
            max_ppl_ratio = UNSET
        else:
            max_ppl_ratio = self.max_ppl_ratio

        max_teacher_kl: float | None | Unset
        if isinstance(self.max_teacher_kl, Unset):
            max_teacher_kl = UNSET
        else:
            max_teacher_kl = self.max_teacher_kl

        ratio_min = self.ratio_min

        ratio_max = self.ratio_max

        tolerance = self.tolerance

        max_probes = self.max_probes

        field_dict: dict[str, Any] = {}

        field_dict.update({})
        if max_ppl_ratio is not UNSET:
            field_dict["max_ppl_ratio"] = max_ppl_ratio
        if max_teacher_kl is not UNSET:
            field_dict["max_teacher_kl"] = max_teacher_kl
        if ratio_min is not UNSET:
            field_dict["ratio_min"] = ratio_min
        if ratio_max is not UNSET:
            field_dict["ratio_max"] = ratio_max
        if tolerance is not UNSET:
            field_dict["tolerance"] = tolerance
        if max_probes is not UNSET:
            field_dict["max_probes"] = max_probes

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)

        def _parse_max_ppl_ratio(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        max_ppl_ratio = _parse_max_ppl_ratio(d.pop("max_ppl_ratio", UNSET))

        def _parse_max_teacher_kl(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        max_teacher_kl = _parse_max_teacher_kl(d.pop("max_teacher_kl", UNSET))

        ratio_min = d.pop("ratio_min", UNSET)

        ratio_max = d.pop("ratio_max", UNSET)

        tolerance = d.pop("tolerance", UNSET)

        max_probes = d.pop("max_probes", UNSET)

        quality_target_in = cls(
            max_ppl_ratio=max_ppl_ratio,
            max_teacher_kl=max_teacher_kl,
            ratio_min=ratio_min,
            ratio_max=ratio_max,
            tolerance=tolerance,
            max_probes=max_probes,
        )

        return quality_target_in
