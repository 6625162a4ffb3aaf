from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.job_report_metrics_type_0 import JobReportMetricsType0
    from ..models.job_report_params_type_0 import JobReportParamsType0
    from ..models.job_report_ranks_type_0 import JobReportRanksType0
    from ..models.job_report_samples_type_0 import JobReportSamplesType0
    from ..models.job_report_timings_s_type_0 import JobReportTimingsSType0


T = TypeVar("T", bound="JobReport")


@_attrs_define
class JobReport:
    """The run's report as the compression library wrote it (report.json).

    Attributes:
        job_id (str):
        object_ (Literal['job.report'] | Unset):  Default: 'job.report'.
        metrics (JobReportMetricsType0 | None | Unset):
        params (JobReportParamsType0 | None | Unset):
        timings_s (JobReportTimingsSType0 | None | Unset):
        ranks (JobReportRanksType0 | None | Unset):
        samples (JobReportSamplesType0 | None | Unset): Greedy completions of the fixed and the request's prompts:
            `max_new_tokens` and `items`, each with `prompt`, `source` (`fixed` | `request`), `dense` and `compressed`;
            `skipped` with a `reason` for a streamed job. A sweep has them per ratio, under `sweep.ratios[i].samples`.
    """

    job_id: str
    object_: Literal["job.report"] | Unset = "job.report"
    metrics: JobReportMetricsType0 | None | Unset = UNSET
    params: JobReportParamsType0 | None | Unset = UNSET
    timings_s: JobReportTimingsSType0 | None | Unset = UNSET
    ranks: JobReportRanksType0 | None | Unset = UNSET
    samples: JobReportSamplesType0 | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from ..models.job_report_metrics_type_0 import JobReportMetricsType0  # noqa: PLC0415
        from ..models.job_report_params_type_0 import JobReportParamsType0  # noqa: PLC0415
        from ..models.job_report_ranks_type_0 import JobReportRanksType0  # noqa: PLC0415
        from ..models.job_report_samples_type_0 import JobReportSamplesType0  # noqa: PLC0415
        from ..models.job_report_timings_s_type_0 import JobReportTimingsSType0  # noqa: PLC0415

        job_id = self.job_id

        object_ = self.object_

        metrics: dict[str, Any] | None | Unset
        if isinstance(self.metrics, Unset):
            metrics = UNSET
        elif isinstance(self.metrics, JobReportMetricsType0):
            metrics = self.metrics.to_dict()
        else:
            metrics = self.metrics

        params: dict[str, Any] | None | Unset
        if isinstance(self.params, Unset):
            params = UNSET
        elif isinstance(self.params, JobReportParamsType0):
            params = self.params.to_dict()
        else:
            params = self.params

        timings_s: dict[str, Any] | None | Unset
        if isinstance(self.timings_s, Unset):
            timings_s = UNSET
        elif isinstance(self.timings_s, JobReportTimingsSType0):
            timings_s = self.timings_s.to_dict()
        else:
            timings_s = self.timings_s

        ranks: dict[str, Any] | None | Unset
        if isinstance(self.ranks, Unset):
            ranks = UNSET
        elif isinstance(self.ranks, JobReportRanksType0):
            ranks = self.ranks.to_dict()
        else:
            ranks = self.ranks

        samples: dict[str, Any] | None | Unset
        if isinstance(self.samples, Unset):
            samples = UNSET
        elif isinstance(self.samples, JobReportSamplesType0):
            samples = self.samples.to_dict()
        else:
            samples = self.samples

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "job_id": job_id,
            }
        )
        if object_ is not UNSET:
            field_dict["object"] = object_
        if metrics is not UNSET:
            field_dict["metrics"] = metrics
        if params is not UNSET:
            field_dict["params"] = params
        if timings_s is not UNSET:
            field_dict["timings_s"] = timings_s
        if ranks is not UNSET:
            field_dict["ranks"] = ranks
        if samples is not UNSET:
            field_dict["samples"] = samples

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.job_report_metrics_type_0 import JobReportMetricsType0  # noqa: PLC0415
        from ..models.job_report_params_type_0 import JobReportParamsType0  # noqa: PLC0415
        from ..models.job_report_ranks_type_0 import JobReportRanksType0  # noqa: PLC0415
        from ..models.job_report_samples_type_0 import JobReportSamplesType0  # noqa: PLC0415
        from ..models.job_report_timings_s_type_0 import JobReportTimingsSType0  # noqa: PLC0415

        d = dict(src_dict)
        job_id = d.pop("job_id")

        object_ = cast(Literal["job.report"] | Unset, d.pop("object", UNSET))
        if object_ != "job.report" and not isinstance(object_, Unset):
            raise ValueError(f"object must match const 'job.report', got '{object_}'")

        def _parse_metrics(data: object) -> JobReportMetricsType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                metrics_type_0 = JobReportMetricsType0.from_dict(data)

                return metrics_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(JobReportMetricsType0 | None | Unset, data)

        metrics = _parse_metrics(d.pop("metrics", UNSET))

        def _parse_params(data: object) -> JobReportParamsType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                params_type_0 = JobReportParamsType0.from_dict(data)

                return params_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(JobReportParamsType0 | None | Unset, data)

        params = _parse_params(d.pop("params", UNSET))

        def _parse_timings_s(data: object) -> JobReportTimingsSType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                timings_s_type_0 = JobReportTimingsSType0.from_dict(data)

                return timings_s_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(JobReportTimingsSType0 | None | Unset, data)

        timings_s = _parse_timings_s(d.pop("timings_s", UNSET))

        def _parse_ranks(data: object) -> JobReportRanksType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                ranks_type_0 = JobReportRanksType0.from_dict(data)

                return ranks_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(JobReportRanksType0 | None | Unset, data)

        ranks = _parse_ranks(d.pop("ranks", UNSET))

        def _parse_samples(data: object) -> JobReportSamplesType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                samples_type_0 = JobReportSamplesType0.from_dict(data)

                return samples_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(JobReportSamplesType0 | None | Unset, data)

        samples = _parse_samples(d.pop("samples", UNSET))

        job_report = cls(
            job_id=job_id,
            object_=object_,
            metrics=metrics,
            params=params,
            timings_s=timings_s,
            ranks=ranks,
            samples=samples,
        )

        job_report.additional_properties = d
        return job_report

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
