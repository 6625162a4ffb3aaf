from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.file_out_purpose import FileOutPurpose
from ..types import UNSET, Unset

T = TypeVar("T", bound="FileOut")


@_attrs_define
class FileOut:
    """
    Attributes:
        id (str):
        filename (str):
        purpose (FileOutPurpose):
        bytes_ (int):
        sha256 (str):
        created_at (datetime.datetime):
        object_ (Literal['file'] | Unset):  Default: 'file'.
    """

    id: str
    filename: str
    purpose: FileOutPurpose
    bytes_: int
    sha256: str
    created_at: datetime.datetime
    object_: Literal["file"] | Unset = "file"
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        id = self.id

        filename = self.filename

        purpose = self.purpose.value

        bytes_ = self.bytes_

        sha256 = self.sha256

        created_at = self.created_at.isoformat()

        object_ = self.object_

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "id": id,
                "filename": filename,
                "purpose": purpose,
                "bytes": bytes_,
                "sha256": sha256,
                "created_at": created_at,
            }
        )
        if object_ is not UNSET:
            field_dict["object"] = object_

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        id = d.pop("id")

        filename = d.pop("filename")

        purpose = FileOutPurpose(d.pop("purpose"))

        bytes_ = d.pop("bytes")

        sha256 = d.pop("sha256")

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        object_ = cast(Literal["file"] | Unset, d.pop("object", UNSET))
        if object_ != "file" and not isinstance(object_, Unset):
            raise ValueError(f"object must match const 'file', got '{object_}'")

        file_out = cls(
            id=id,
            filename=filename,
            purpose=purpose,
            bytes_=bytes_,
            sha256=sha256,
            created_at=created_at,
            object_=object_,
        )

        file_out.additional_properties = d
        return file_out

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
