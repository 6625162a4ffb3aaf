from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from attrs import define as _attrs_define

from ..models.ada_lora_adapter_objective import AdaLoraAdapterObjective
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.builtin_data import BuiltinData
    from ..models.file_data import FileData
    from ..models.hf_data import HfData


T = TypeVar("T", bound="AdaLoraAdapter")


@_attrs_define
class AdaLoraAdapter:
    """
    Attributes:
        type_ (Literal['adalora']):
        update (bool | Unset): Apply the closed-form update during calibration, before training. Default: False.
        update_mix (float | Unset): Closed-form update: weight of the dense model's output W X in the least-squares
            target (the rest is the dense weight on the compressed-path inputs, W X'). 0 changes nothing, 1 fits the dense
            output exactly (overfits on SmolLM2); the default was picked by benchmark. Default: 0.2.
        epochs (int | Unset):  Default: 1.
        max_steps (int | None | Unset):
        lr (float | Unset):  Default: 0.0001.
        batch_size (int | Unset):  Default: 4.
        objective (AdaLoraAdapterObjective | Unset): next-token loss, distillation KL, or both Default:
            AdaLoraAdapterObjective.KL.
        data (BuiltinData | FileData | HfData | Unset): Training text (defaults to 64 builtin windows of 256 tokens,
            seed 1).
        init_r (int | Unset):  Default: 12.
        target_r (int | Unset):  Default: 8.
        alpha (int | Unset):  Default: 16.
    """

    type_: Literal["adalora"]
    update: bool | Unset = False
    update_mix: float | Unset = 0.2
    epochs: int | Unset = 1
    max_steps: int | None | Unset = UNSET
    lr: float | Unset = 0.0001
    batch_size: int | Unset = 4
    objective: AdaLoraAdapterObjective | Unset = AdaLoraAdapterObjective.KL
    data: BuiltinData | FileData | HfData | Unset = UNSET
    init_r: int | Unset = 12
    target_r: int | Unset = 8
    alpha: int | Unset = 16

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

        init_r = self.init_r

        target_r = self.target_r

        alpha = self.alpha

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
        if init_r is not UNSET:
            field_dict["init_r"] = init_r
        if target_r is not UNSET:
            field_dict["target_r"] = target_r
        if alpha is not UNSET:
            field_dict["alpha"] = alpha

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.builtin_data import BuiltinData  # noqa: PLC0415
        from ..models.file_data import FileData  # noqa: PLC0415
        from ..models.hf_data import HfData  # noqa: PLC0415

        d = dict(src_dict)
        type_ = cast(Literal["adalora"], d.pop("type"))
        if type_ != "adalora":
            raise ValueError(f"type must match const 'adalora', got '{type_}'")

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
        objective: AdaLoraAdapterObjective | Unset
        if isinstance(_objective, Unset):
            objective = UNSET
        else:
            objective = AdaLoraAdapterObjective(_objective)

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

        init_r = d.pop("init_r", UNSET)

        target_r = d.pop("target_r", UNSET)

        alpha = d.pop("alpha", UNSET)

        ada_lora_adapter = cls(
            type_=type_,
            update=update,
            update_mix=update_mix,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            objective=objective,
            data=data,
            init_r=init_r,
            target_r=target_r,
            alpha=alpha,
        )

        return ada_lora_adapter
