from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from attrs import define as _attrs_define

from ..models.lora_adapter_objective import LoraAdapterObjective
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.builtin_data import BuiltinData
    from ..models.file_data import FileData
    from ..models.hf_data import HfData


T = TypeVar("T", bound="LoraAdapter")


@_attrs_define
class LoraAdapter:
    """
    Attributes:
        type_ (Literal['lora']):
        update (bool | Unset): Apply the closed-form update during calibration, before training. Default: False.
        update_mix (float | Unset): Closed-form update: weight of the dense model's output W X in the least-squares
            target (the rest is the dense weight on the compressed-path inputs, W X'). 0 changes nothing, 1 fits the dense
            output exactly (overfits on SmolLM2); the default was picked by benchmark. Default: 0.2.
        epochs (int | Unset):  Default: 1.
        max_steps (int | None | Unset):
        lr (float | Unset):  Default: 0.0001.
        batch_size (int | Unset):  Default: 4.
        objective (LoraAdapterObjective | Unset): next-token loss, distillation KL, or both Default:
            LoraAdapterObjective.KL.
        data (BuiltinData | FileData | HfData | Unset): Training text (defaults to 64 builtin windows of 256 tokens,
            seed 1).
        rank (int | Unset):  Default: 8.
        alpha (int | Unset):  Default: 16.
        dropout (float | Unset):  Default: 0.0.
    """

    type_: Literal["lora"]
    update: bool | Unset = False
    update_mix: float | Unset = 0.2
    epochs: int | Unset = 1
    max_steps: int | None | Unset = UNSET
    lr: float | Unset = 0.0001
    batch_size: int | Unset = 4
    objective: LoraAdapterObjective | Unset = LoraAdapterObjective.KL
    data: BuiltinData | FileData | HfData | Unset = UNSET
    rank: int | Unset = 8
    alpha: int | Unset = 16
    dropout: float | Unset = 0.0

    def to_dict(self) -> dict[str, Any]:
        from ..models.builtin_data import BuiltinData  # noqa: PLC0415
        from ..models.file_data import FileData  # noqa: PLC0415

        type_ = self.type_

        update = self.update

        update_mix = self.update_mix

        epochs = self.epochs

        max_steps: int | None | Unset
        if isinstance(self.max_steps, Unset):
            max_steps = UNSET
        else:
            max_steps = self.max_steps

        lr = self.lr

        batch_size = self.batch_size

        objective: str | Unset = UNSET
        if not isinstance(self.objective, Unset):
            objective = self.objective.value

        data: dict[str, Any] | Unset
        if isinstance(self.data, Unset):
            data = UNSET
        elif isinstance(self.data, BuiltinData):
            data = self.data.to_dict()
        elif isinstance(self.data, FileData):
            data = self.data.to_dict()
        else:
            data = self.data.to_dict()

        rank = self.rank

        alpha = self.alpha

        dropout = self.dropout

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "type": type_,
            }
        )
        if update is not UNSET:
            field_dict["update"] = update
        if update_mix is not UNSET:
            field_dict["update_mix"] = update_mix
        if epochs is not UNSET:
            field_dict["epochs"] = epochs
        if max_steps is not UNSET:
            field_dict["max_steps"] = max_steps
        if lr is not UNSET:
            field_dict["lr"] = lr
        if batch_size is not UNSET:
            field_dict["batch_size"] = batch_size
        if objective is not UNSET:
            field_dict["objective"] = objective
        if data is not UNSET:
            field_dict["data"] = data
        if rank is not UNSET:
            field_dict["rank"] = rank
        if alpha is not UNSET:
            field_dict["alpha"] = alpha
        if dropout is not UNSET:
            field_dict["dropout"] = dropout

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.builtin_data import BuiltinData  # noqa: PLC0415
        from ..models.file_data import FileData  # noqa: PLC0415
        from ..models.hf_data import HfData  # noqa: PLC0415

        d = dict(src_dict)
        type_ = cast(Literal["lora"], d.pop("type"))
        if type_ != "lora":
            raise ValueError(f"type must match const 'lora', got '{type_}'")

        update = d.pop("update", UNSET)

        update_mix = d.pop("update_mix", UNSET)

        epochs = d.pop("epochs", UNSET)

        def _parse_max_steps(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        max_steps = _parse_max_steps(d.pop("max_steps", UNSET))

        lr = d.pop("lr", UNSET)

        batch_size = d.pop("batch_size", UNSET)

        _objective = d.pop("objective", UNSET)
        objective: LoraAdapterObjective | Unset
        if isinstance(_objective, Unset):
            objective = UNSET
        else:
            objective = LoraAdapterObjective(_objective)

        def _parse_data(data: object) -> BuiltinData | FileData | HfData | Unset:
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                data_type_0 = BuiltinData.from_dict(data)

                return data_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                data_type_1 = FileData.from_dict(data)

                return data_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            if not isinstance(data, dict):
                raise TypeError()
            data_type_2 = HfData.from_dict(data)

            return data_type_2

        data = _parse_data(d.pop("data", UNSET))

        rank = d.pop("rank", UNSET)

        alpha = d.pop("alpha", UNSET)

        dropout = d.pop("dropout", UNSET)

        lora_adapter = cls(
            type_=type_,
            update=update,
            update_mix=update_mix,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            objective=objective,
            data=data,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
        )

        return lora_adapter
