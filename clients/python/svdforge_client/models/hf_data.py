from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="HfData")


@_attrs_define
class HfData:
    """A Hugging Face dataset (needs network access and the `datasets` package on the worker).

    Attributes:
        source (Literal['hf']):
        dataset (str):
        config (None | str | Unset):
        split (str | Unset):  Default: 'train'.
        text_field (str | Unset):  Default: 'text'.
        samples (int | Unset): Number of token windows. Default: 16.
        seq_len (int | Unset): Tokens per window. Default: 256.
        seed (int | Unset): Random seed for sampling the text. Default: 0.
    """

    source: Literal["hf"]
    dataset: str
    config: None | str | Unset = UNSET
    split: str | Unset = "train"
    text_field: str | Unset = "text"
    samples: int | Unset = 16
    seq_len: int | Unset = 256
    seed: int | Unset = 0

    def to_dict(self) -> dict[str, Any]:
        source = self.source

        dataset = self.dataset

        config: None | str | Unset
        if isinstance(self.config, Unset):
            config = UNSET
        else:
            config = self.config

        split = self.split

        text_field = self.text_field

        samples = self.samples

        seq_len = self.seq_len

        seed = self.seed

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "source": source,
                "dataset": dataset,
            }
        )
        if config is not UNSET:
            field_dict["config"] = config
        if split is not UNSET:
            field_dict["split"] = split
        if text_field is not UNSET:
            field_dict["text_field"] = text_field
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
        source = cast(Literal["hf"], d.pop("source"))
        if source != "hf":
            raise ValueError(f"source must match const 'hf', got '{source}'")

        dataset = d.pop("dataset")

        def _parse_config(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        config = _parse_config(d.pop("config", UNSET))

        split = d.pop("split", UNSET)

        text_field = d.pop("text_field", UNSET)

        samples = d.pop("samples", UNSET)

        seq_len = d.pop("seq_len", UNSET)

        seed = d.pop("seed", UNSET)

        hf_data = cls(
            source=source,
            dataset=dataset,
            config=config,
            split=split,
            text_field=text_field,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
        )

        return hf_data
