from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="FileData")


@_attrs_define
class FileData:
    """An uploaded UTF-8 text file (one paragraph per line).

    Attributes:
        source (Literal['file']):
        file_id (str): An id returned by upload_file.
        samples (int | Unset): Number of token windows. Default: 16.
        seq_len (int | Unset): Tokens per window. Default: 256.
        seed (int | Unset): Random seed for sampling the text. Default: 0.
    """

    source: Literal["file"]
    file_id: str
    samples: int | Unset = 16
    seq_len: int | Unset = 256
    seed: int | Unset = 0

    def to_dict(self) -> dict[str, Any]:
        source = self.source

        file_id = self.file_id

        samples = self.samples

        seq_len = self.seq_len

        seed = self.seed

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "source": source,
                "file_id": file_id,
            }
        )
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
        source = cast(Literal["file"], d.pop("source"))
        if source != "file":
            raise ValueError(f"source must match const 'file', got '{source}'")

        file_id = d.pop("file_id")

        samples = d.pop("samples", UNSET)

        seq_len = d.pop("seq_len", UNSET)

        seed = d.pop("seed", UNSET)

        file_data = cls(
            source=source,
            file_id=file_id,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
        )

        return file_data
