from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.stage import Stage
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.job_event_out_data_type_0 import JobEventOutDataType0


T = TypeVar("T", bound="JobEventOut")


@_attrs_define
class JobEventOut:
    """
    Attributes:
        id (str):
        created_at (datetime.datetime):
        type_ (str): status | stage_started | stage_finished | progress | metrics | log | error
        level (str): info | warning | error
        message (str):
        object_ (Literal['job.event'] | Unset):  Default: 'job.event'.
        stage (None | Stage | Unset):
        data (JobEventOutDataType0 | None | Unset):
    """

    id: str
    created_at: datetime.datetime
    type_: str
    level: str
    message: str
    object_: Literal["job.event"] | Unset = "job.event"
    stage: None | Stage | Unset = UNSET
    data: JobEventOutDataType0 | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from ..models.job_event_out_data_type_0 import JobEventOutDataType0  # noqa: PLC0415

        id = self.id

        created_at = self.created_at.isoformat()

        type_ = self.type_

        level = self.level

        message = self.message

        object_ = self.object_

        stage: None | str | Unset
        if isinstance(self.stage, Unset):
            stage = UNSET
        elif isinstance(self.stage, Stage):
            stage = self.stage.value
        else:
            stage = self.stage

        data: dict[str, Any] | None | Unset
        if isinstance(self.data, Unset):
            data = UNSET
        elif isinstance(self.data, JobEventOutDataType0):
            data = self.data.to_dict()
        else:
            data = self.data

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "id": id,
                "created_at": created_at,
                "type": type_,
                "level": level,
                "message": message,
            }
        )
        if object_ is not UNSET:
            field_dict["object"] = object_
        if stage is not UNSET:
            field_dict["stage"] = stage
        if data is not UNSET:
            field_dict["data"] = data

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.job_event_out_data_type_0 import JobEventOutDataType0  # noqa: PLC0415

        d = dict(src_dict)
        id = d.pop("id")

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        type_ = d.pop("type")

        level = d.pop("level")

        message = d.pop("message")

        object_ = cast(Literal["job.event"] | Unset, d.pop("object", UNSET))
        if object_ != "job.event" and not isinstance(object_, Unset):
            raise ValueError(f"object must match const 'job.event', got '{object_}'")

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

        def _parse_data(data: object) -> JobEventOutDataType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                data_type_0 = JobEventOutDataType0.from_dict(data)

                return data_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(JobEventOutDataType0 | None | Unset, data)

        data = _parse_data(d.pop("data", UNSET))

        job_event_out = cls(
            id=id,
            created_at=created_at,
            type_=type_,
            level=level,
            message=message,
            object_=object_,
            stage=stage,
            data=data,
        )

        job_event_out.additional_properties = d
        return job_event_out

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
