from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

T = TypeVar("T", bound="ArtifactOut")


@_attrs_define
class ArtifactOut:
    """
    Attributes:
        id (str):
        job_id (str):
        name (str):
        bytes_ (int):
        sha256 (str):
        content_type (str):
        created_at (datetime.datetime):
        content_url (str): API path that streams the file (Range supported).
        object_ (Literal['artifact'] | Unset):  Default: 'artifact'.
        download_url (None | str | Unset): Presigned URL, where the storage backend can presign.
        download_url_expires_at (datetime.datetime | None | Unset):
    """

    id: str
    job_id: str
    name: str
    bytes_: int
    sha256: str
    content_type: str
    created_at: datetime.datetime
    content_url: str
    object_: Literal["artifact"] | Unset = "artifact"
    download_url: None | str | Unset = UNSET
    download_url_expires_at: datetime.datetime | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        id = self.id

        job_id = self.job_id

        name = self.name

        bytes_ = self.bytes_

        sha256 = self.sha256

        content_type = self.content_type

        created_at = self.created_at.isoformat()

        content_url = self.content_url

        object_ = self.object_

        download_url: None | str | Unset
        if isinstance(self.download_url, Unset):
            download_url = UNSET
        else:
            download_url = self.download_url

        download_url_expires_at: None | str | Unset
        if isinstance(self.download_url_expires_at, Unset):
            download_url_expires_at = UNSET
        elif isinstance(self.download_url_expires_at, datetime.datetime):
            download_url_expires_at = self.download_url_expires_at.isoformat()
        else:
            download_url_expires_at = self.download_url_expires_at

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "id": id,
                "job_id": job_id,
                "name": name,
                "bytes": bytes_,
                "sha256": sha256,
                "content_type": content_type,
                "created_at": created_at,
                "content_url": content_url,
            }
        )
        if object_ is not UNSET:
            field_dict["object"] = object_
        if download_url is not UNSET:
            field_dict["download_url"] = download_url
        if download_url_expires_at is not UNSET:
            field_dict["download_url_expires_at"] = download_url_expires_at

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        id = d.pop("id")

        job_id = d.pop("job_id")

        name = d.pop("name")

        bytes_ = d.pop("bytes")

        sha256 = d.pop("sha256")

        content_type = d.pop("content_type")

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        content_url = d.pop("content_url")

        object_ = cast(Literal["artifact"] | Unset, d.pop("object", UNSET))
        if object_ != "artifact" and not isinstance(object_, Unset):
            raise ValueError(f"object must match const 'artifact', got '{object_}'")

        def _parse_download_url(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        download_url = _parse_download_url(d.pop("download_url", UNSET))

        def _parse_download_url_expires_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                download_url_expires_at_type_0 = datetime.datetime.fromisoformat(data)

                return download_url_expires_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        download_url_expires_at = _parse_download_url_expires_at(d.pop("download_url_expires_at", UNSET))

        artifact_out = cls(
            id=id,
            job_id=job_id,
            name=name,
            bytes_=bytes_,
            sha256=sha256,
            content_type=content_type,
            created_at=created_at,
            content_url=content_url,
            object_=object_,
            download_url=download_url,
            download_url_expires_at=download_url_expires_at,
        )

        artifact_out.additional_properties = d
        return artifact_out

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
