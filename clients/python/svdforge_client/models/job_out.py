from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.job_status import JobStatus
from ..models.stage import Stage
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.job_create import JobCreate
    from ..models.job_error_out import JobErrorOut
    from ..models.job_out_metadata import JobOutMetadata
    from ..models.stage_out import StageOut


T = TypeVar("T", bound="JobOut")


@_attrs_define
class JobOut:
    """
    Attributes:
        id (str):
        status (JobStatus):
        model (str):
        progress (float): Progress of the current stage.
        stages (list[StageOut]):
        attempt (int): How many times a worker has started this job.
        created_at (datetime.datetime):
        updated_at (datetime.datetime):
        metadata (JobOutMetadata):
        request (JobCreate): A compression job. Only `model` and `ratio` (or `ratios`, for a sweep, or `target`) are
            required.
        object_ (Literal['job'] | Unset):  Default: 'job'.
        stage (None | Stage | Unset): The stage running now (or where the job stopped).
        error (JobErrorOut | None | Unset):
        started_at (datetime.datetime | None | Unset):
        finished_at (datetime.datetime | None | Unset):
        cancel_requested_at (datetime.datetime | None | Unset):
    """

    id: str
    status: JobStatus
    model: str
    progress: float
    stages: list[StageOut]
    attempt: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    metadata: JobOutMetadata
    request: JobCreate
    object_: Literal["job"] | Unset = "job"
    stage: None | Stage | Unset = UNSET
    error: JobErrorOut | None | Unset = UNSET
    started_at: datetime.datetime | None | Unset = UNSET
    finished_at: datetime.datetime | None | Unset = UNSET
    cancel_requested_at: datetime.datetime | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from ..models.job_error_out import JobErrorOut  # noqa: PLC0415

        id = self.id

        status = self.status.value

        model = self.model

        progress = self.progress

        stages = []
        for stages_item_data in self.stages:
            stages_item = stages_item_data.to_dict()
            stages.append(stages_item)

        attempt = self.attempt

        created_at = self.created_at.isoformat()

        updated_at = self.updated_at.isoformat()

        metadata = self.metadata.to_dict()

        request = self.request.to_dict()

        object_ = self.object_

        stage: None | str | Unset
        if isinstance(self.stage, Unset):
            stage = UNSET
        elif isinstance(self.stage, Stage):
            stage = self.stage.value
        else:
            stage = self.stage

        error: dict[str, Any] | None | Unset
        if isinstance(self.error, Unset):
            error = UNSET
        elif isinstance(self.error, JobErrorOut):
            error = self.error.to_dict()
        else:
            error = self.error

        started_at: None | str | Unset
        if isinstance(self.started_at, Unset):
            started_at = UNSET
        elif isinstance(self.started_at, datetime.datetime):
            started_at = self.started_at.isoformat()
        else:
            started_at = self.started_at

        finished_at: None | str | Unset
        if isinstance(self.finished_at, Unset):
            finished_at = UNSET
        elif isinstance(self.finished_at, datetime.datetime):
            finished_at = self.finished_at.isoformat()
        else:
            finished_at = self.finished_at

        cancel_requested_at: None | str | Unset
        if isinstance(self.cancel_requested_at, Unset):
            cancel_requested_at = UNSET
        elif isinstance(self.cancel_requested_at, datetime.datetime):
            cancel_requested_at = self.cancel_requested_at.isoformat()
        else:
            cancel_requested_at = self.cancel_requested_at

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "id": id,
                "status": status,
                "model": model,
                "progress": progress,
                "stages": stages,
                "attempt": attempt,
                "created_at": created_at,
                "updated_at": updated_at,
                "metadata": metadata,
                "request": request,
            }
        )
        if object_ is not UNSET:
            field_dict["object"] = object_
        if stage is not UNSET:
            field_dict["stage"] = stage
        if error is not UNSET:
            field_dict["error"] = error
        if started_at is not UNSET:
            field_dict["started_at"] = started_at
        if finished_at is not UNSET:
            field_dict["finished_at"] = finished_at
        if cancel_requested_at is not UNSET:
            field_dict["cancel_requested_at"] = cancel_requested_at

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.job_create import JobCreate  # noqa: PLC0415
        from ..models.job_error_out import JobErrorOut  # noqa: PLC0415
        from ..models.job_out_metadata import JobOutMetadata  # noqa: PLC0415
        from ..models.stage_out import StageOut  # noqa: PLC0415

        d = dict(src_dict)
        id = d.pop("id")

        status = JobStatus(d.pop("status"))

        model = d.pop("model")

        progress = d.pop("progress")

        stages = []
        _stages = d.pop("stages")
        for stages_item_data in _stages:
            stages_item = StageOut.from_dict(stages_item_data)

            stages.append(stages_item)

        attempt = d.pop("attempt")

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        updated_at = datetime.datetime.fromisoformat(d.pop("updated_at"))

        metadata = JobOutMetadata.from_dict(d.pop("metadata"))

        request = JobCreate.from_dict(d.pop("request"))

        object_ = cast(Literal["job"] | Unset, d.pop("object", UNSET))
        if object_ != "job" and not isinstance(object_, Unset):
            raise ValueError(f"object must match const 'job', got '{object_}'")

        def _parse_stage(data: object) -> None | Stage | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                stage_type_0 = Stage(data)

                return stage_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | Stage | Unset, data)

        stage = _parse_stage(d.pop("stage", UNSET))

        def _parse_error(data: object) -> JobErrorOut | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                error_type_0 = JobErrorOut.from_dict(data)

                return error_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(JobErrorOut | None | Unset, data)

        error = _parse_error(d.pop("error", UNSET))

        def _parse_started_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                started_at_type_0 = datetime.datetime.fromisoformat(data)

                return started_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        started_at = _parse_started_at(d.pop("started_at", UNSET))

        def _parse_finished_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                finished_at_type_0 = datetime.datetime.fromisoformat(data)

                return finished_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        finished_at = _parse_finished_at(d.pop("finished_at", UNSET))

        def _parse_cancel_requested_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                cancel_requested_at_type_0 = datetime.datetime.fromisoformat(data)

                return cancel_requested_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        cancel_requested_at = _parse_cancel_requested_at(d.pop("cancel_requested_at", UNSET))

        job_out = cls(
            id=id,
            status=status,
            model=model,
            progress=progress,
            stages=stages,
            attempt=attempt,
            created_at=created_at,
            updated_at=updated_at,
            metadata=metadata,
            request=request,
            object_=object_,
            stage=stage,
            error=error,
            started_at=started_at,
            finished_at=finished_at,
            cancel_requested_at=cancel_requested_at,
        )

        job_out.additional_properties = d
        return job_out

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
