from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from attrs import define as _attrs_define

from ..models.job_create_allocation import JobCreateAllocation
from ..models.job_create_loss_score import JobCreateLossScore
from ..models.job_create_method import JobCreateMethod
from ..models.job_create_targets import JobCreateTargets
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.ada_lora_adapter import AdaLoraAdapter
    from ..models.builtin_data import BuiltinData
    from ..models.builtin_evaluation import BuiltinEvaluation
    from ..models.file_data import FileData
    from ..models.file_evaluation import FileEvaluation
    from ..models.hf_data import HfData
    from ..models.hf_evaluation import HfEvaluation
    from ..models.job_create_metadata import JobCreateMetadata
    from ..models.lora_adapter import LoraAdapter
    from ..models.no_adapter import NoAdapter
    from ..models.quality_target_in import QualityTargetIn
    from ..models.refine import Refine
    from ..models.update_adapter import UpdateAdapter


T = TypeVar("T", bound="JobCreate")


@_attrs_define
class JobCreate:
    """A compression job. Only `model` and `ratio` (or `ratios`, for a sweep, or `target`) are required.

    Attributes:
        model (str): The `smollm2-135m` alias, a Hugging Face hub id (`org/name`), or an absolute path to a model folder
            or .gguf file inside the server's allowed model root.
        ratio (float | None | Unset): Fraction of the parameters of each compressed linear to remove. Give this or
            `ratios`.
        ratios (list[float] | None | Unset): A sweep: 2 to 8 distinct ratios compressed from one calibration (parallel-
            mode statistics, computed once and shared, with each linear's decomposition). Each ratio gets its own artifact
            folder (`ratio-0.40/model.safetensors`, ...) and metrics under the report's `sweep.ratios`; `ppl_vs_ratio.png`
            compares them. Give this or `ratio`. Not with adapter `update`.
        target (None | QualityTargetIn | Unset): A quality budget instead of a ratio: the largest ratio meeting it (one
            artifact, the chosen ratio's; the report's `target` lists every probed ratio with its metrics, the chosen one
            and why). Give this, `ratio` or `ratios`. Needs evaluation; adapter `none` only.
        method (JobCreateMethod | Unset):  Default: JobCreateMethod.SVD_LLM.
        allocation (JobCreateAllocation | Unset): How ranks are chosen: `uniform` (every linear keeps 1 - ratio of its
            parameters), `global` (ranks moved between layers of one kind by the whitened spectra), `loss` (every singular
            component scored by its estimated effect on the model's loss, one budget for the whole model; a linear may stay
            dense; one extra forward + backward of the dense model, which cannot stream), `auto` (the default: `loss` when
            the job holds the dense model in memory and the pass fits, else `uniform`; the report's `allocation_choice` says
            which and why). Default: JobCreateAllocation.AUTO.
        loss_score (JobCreateLossScore | Unset): The score of `allocation: loss`: `fisher` (empirical Fisher along each
            component) or `taylor` (first-order term plus the Fisher term). Default: JobCreateLossScore.FISHER.
        rank_multiple (int | Unset): Round every compressed linear's rank to a multiple of this (kernel-friendly
            shapes), within the parameters the unrounded ranks would use; 1: no rounding. The report's `rank_rounding` says
            how. Default: 1.
        targets (JobCreateTargets | Unset):  Default: JobCreateTargets.ALL.
        adapter (AdaLoraAdapter | LoraAdapter | NoAdapter | Unset | UpdateAdapter): Recovery after compression.
        refine (None | Refine | Unset): Layer-local refinement of each compressed layer during calibration (null: off).
            Not with `ratios`.
        calibration (BuiltinData | FileData | HfData | Unset):
        evaluation (BuiltinEvaluation | FileEvaluation | HfEvaluation | Unset):
        metadata (JobCreateMetadata | Unset):
    """

    model: str
    ratio: float | None | Unset = UNSET
    ratios: list[float] | None | Unset = UNSET
    target: None | QualityTargetIn | Unset = UNSET
    method: JobCreateMethod | Unset = JobCreateMethod.SVD_LLM
    allocation: JobCreateAllocation | Unset = JobCreateAllocation.AUTO
    loss_score: JobCreateLossScore | Unset = JobCreateLossScore.FISHER
    rank_multiple: int | Unset = 1
    targets: JobCreateTargets | Unset = JobCreateTargets.ALL
    adapter: AdaLoraAdapter | LoraAdapter | NoAdapter | Unset | UpdateAdapter = UNSET
    refine: None | Refine | Unset = UNSET
    calibration: BuiltinData | FileData | HfData | Unset = UNSET
    evaluation: BuiltinEvaluation | FileEvaluation | HfEvaluation | Unset = UNSET
    metadata: JobCreateMetadata | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        from ..models.builtin_data import BuiltinData  # noqa: PLC0415
        from ..models.builtin_evaluation import BuiltinEvaluation  # noqa: PLC0415
        from ..models.file_data import FileData  # noqa: PLC0415
        from ..models.file_evaluation import FileEvaluation  # noqa: PLC0415
        from ..models.lora_adapter import LoraAdapter  # noqa: PLC0415
        from ..models.no_adapter import NoAdapter  # noqa: PLC0415
        from ..models.quality_target_in import QualityTargetIn  # noqa: PLC0415
        from ..models.refine import Refine  # noqa: PLC0415
        from ..models.update_adapter import UpdateAdapter  # noqa: PLC0415

        model = self.model

        ratio: float | None | Unset
        if isinstance(self.ratio, Unset):
            ratio = UNSET
        else:
            ratio = self.ratio

        ratios: list[float] | None | Unset
        if isinstance(self.ratios, Unset):
            ratios = UNSET
        elif isinstance(self.ratios, list):
            ratios = self.ratios

        else:
            ratios = self.ratios

        target: dict[str, Any] | None | Unset
        if isinstance(self.target, Unset):
            target = UNSET
        elif isinstance(self.target, QualityTargetIn):
            target = self.target.to_dict()
        else:
            target = self.target

        method: str | Unset = UNSET
        if not isinstance(self.method, Unset):
            method = self.method.value

        allocation: str | Unset = UNSET
        if not isinstance(self.allocation, Unset):
            allocation = self.allocation.value

        loss_score: str | Unset = UNSET
        if not isinstance(self.loss_score, Unset):
            loss_score = self.loss_score.value

        rank_multiple = self.rank_multiple

        targets: str | Unset = UNSET
        if not isinstance(self.targets, Unset):
            targets = self.targets.value

        adapter: dict[str, Any] | Unset
        if isinstance(self.adapter, Unset):
            adapter = UNSET
        elif isinstance(self.adapter, NoAdapter):
            adapter = self.adapter.to_dict()
        elif isinstance(self.adapter, UpdateAdapter):
            adapter = self.adapter.to_dict()
        elif isinstance(self.adapter, LoraAdapter):
            adapter = self.adapter.to_dict()
        else:
            adapter = self.adapter.to_dict()

        refine: dict[str, Any] | None | Unset
        if isinstance(self.refine, Unset):
            refine = UNSET
        elif isinstance(self.refine, Refine):
            refine = self.refine.to_dict()
        else:
            refine = self.refine

        calibration: dict[str, Any] | Unset
        if isinstance(self.calibration, Unset):
            calibration = UNSET
        elif isinstance(self.calibration, BuiltinData):
            calibration = self.calibration.to_dict()
        elif isinstance(self.calibration, FileData):
            calibration = self.calibration.to_dict()
        else:
            calibration = self.calibration.to_dict()

        evaluation: dict[str, Any] | Unset
        if isinstance(self.evaluation, Unset):
            evaluation = UNSET
        elif isinstance(self.evaluation, BuiltinEvaluation):
            evaluation = self.evaluation.to_dict()
        elif isinstance(self.evaluation, FileEvaluation):
            evaluation = self.evaluation.to_dict()
        else:
            evaluation = self.evaluation.to_dict()

        metadata: dict[str, Any] | Unset = UNSET
        if not isinstance(self.metadata, Unset):
            metadata = self.metadata.to_dict()

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "model": model,
            }
        )
        if ratio is not UNSET:
            field_dict["ratio"] = ratio
        if ratios is not UNSET:
            field_dict["ratios"] = ratios
        if target is not UNSET:
            field_dict["target"] = target
        if method is not UNSET:
            field_dict["method"] = method
        if allocation is not UNSET:
            field_dict["allocation"] = allocation
        if loss_score is not UNSET:
            field_dict["loss_score"] = loss_score
        if rank_multiple is not UNSET:
            field_dict["rank_multiple"] = rank_multiple
        if targets is not UNSET:
            field_dict["targets"] = targets
        if adapter is not UNSET:
            field_dict["adapter"] = adapter
        if refine is not UNSET:
            field_dict["refine"] = refine
        if calibration is not UNSET:
            field_dict["calibration"] = calibration
        if evaluation is not UNSET:
            field_dict["evaluation"] = evaluation
        if metadata is not UNSET:
            field_dict["metadata"] = metadata

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.ada_lora_adapter import AdaLoraAdapter  # noqa: PLC0415
        from ..models.builtin_data import BuiltinData  # noqa: PLC0415
        from ..models.builtin_evaluation import BuiltinEvaluation  # noqa: PLC0415
        from ..models.file_data import FileData  # noqa: PLC0415
        from ..models.file_evaluation import FileEvaluation  # noqa: PLC0415
        from ..models.hf_data import HfData  # noqa: PLC0415
        from ..models.hf_evaluation import HfEvaluation  # noqa: PLC0415
        from ..models.job_create_metadata import JobCreateMetadata  # noqa: PLC0415
        from ..models.lora_adapter import LoraAdapter  # noqa: PLC0415
        from ..models.no_adapter import NoAdapter  # noqa: PLC0415
        from ..models.quality_target_in import QualityTargetIn  # noqa: PLC0415
        from ..models.refine import Refine  # noqa: PLC0415
        from ..models.update_adapter import UpdateAdapter  # noqa: PLC0415

        d = dict(src_dict)
        model = d.pop("model")

        def _parse_ratio(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        ratio = _parse_ratio(d.pop("ratio", UNSET))

        def _parse_ratios(data: object) -> list[float] | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, list):
                    raise TypeError()
                ratios_type_0 = cast(list[float], data)

                return ratios_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(list[float] | None | Unset, data)

        ratios = _parse_ratios(d.pop("ratios", UNSET))

        def _parse_target(data: object) -> None | QualityTargetIn | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                target_type_0 = QualityTargetIn.from_dict(data)

                return target_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | QualityTargetIn | Unset, data)

        target = _parse_target(d.pop("target", UNSET))

        _method = d.pop("method", UNSET)
        method: JobCreateMethod | Unset
        if isinstance(_method, Unset):
            method = UNSET
        else:
            method = JobCreateMethod(_method)

        _allocation = d.pop("allocation", UNSET)
        allocation: JobCreateAllocation | Unset
        if isinstance(_allocation, Unset):
            allocation = UNSET
        else:
            allocation = JobCreateAllocation(_allocation)

        _loss_score = d.pop("loss_score", UNSET)
        loss_score: JobCreateLossScore | Unset
        if isinstance(_loss_score, Unset):
            loss_score = UNSET
        else:
            loss_score = JobCreateLossScore(_loss_score)

        rank_multiple = d.pop("rank_multiple", UNSET)

        _targets = d.pop("targets", UNSET)
        targets: JobCreateTargets | Unset
        if isinstance(_targets, Unset):
            targets = UNSET
        else:
            targets = JobCreateTargets(_targets)

        def _parse_adapter(data: object) -> AdaLoraAdapter | LoraAdapter | NoAdapter | Unset | UpdateAdapter:
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                adapter_type_0 = NoAdapter.from_dict(data)

                return adapter_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                adapter_type_1 = UpdateAdapter.from_dict(data)

                return adapter_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                adapter_type_2 = LoraAdapter.from_dict(data)

                return adapter_type_2
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            if not isinstance(data, dict):
                raise TypeError()
            adapter_type_3 = AdaLoraAdapter.from_dict(data)

            return adapter_type_3

        adapter = _parse_adapter(d.pop("adapter", UNSET))

        def _parse_refine(data: object) -> None | Refine | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                refine_type_0 = Refine.from_dict(data)

                return refine_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | Refine | Unset, data)

        refine = _parse_refine(d.pop("refine", UNSET))

        def _parse_calibration(data: object) -> BuiltinData | FileData | HfData | Unset:
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                calibration_type_0 = BuiltinData.from_dict(data)

                return calibration_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                calibration_type_1 = FileData.from_dict(data)

                return calibration_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            if not isinstance(data, dict):
                raise TypeError()
            calibration_type_2 = HfData.from_dict(data)

            return calibration_type_2

        calibration = _parse_calibration(d.pop("calibration", UNSET))

        def _parse_evaluation(data: object) -> BuiltinEvaluation | FileEvaluation | HfEvaluation | Unset:
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                evaluation_type_0 = BuiltinEvaluation.from_dict(data)

                return evaluation_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                evaluation_type_1 = FileEvaluation.from_dict(data)

                return evaluation_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            if not isinstance(data, dict):
                raise TypeError()
            evaluation_type_2 = HfEvaluation.from_dict(data)

            return evaluation_type_2

        evaluation = _parse_evaluation(d.pop("evaluation", UNSET))

        _metadata = d.pop("metadata", UNSET)
        metadata: JobCreateMetadata | Unset
        if isinstance(_metadata, Unset):
            metadata = UNSET
        else:
            metadata = JobCreateMetadata.from_dict(_metadata)

        job_create = cls(
            model=model,
            ratio=ratio,
            ratios=ratios,
            target=target,
            method=method,
            allocation=allocation,
            loss_score=loss_score,
            rank_multiple=rank_multiple,
            targets=targets,
            adapter=adapter,
            refine=refine,
            calibration=calibration,
            evaluation=evaluation,
            metadata=metadata,
        )

        return job_create
