"""Turn a stored job request (the API's validated JSON) into core's `CompressConfig`
(or, for a sweep, a `SweepConfig`; for a quality target, a `TargetedConfig`).

The request was validated when it was accepted; core validates again on construction and
raises `UserError`, which fails the job with `invalid_input` rather than crashing.

Defaults: the API stores requests with every default filled in, and those defaults are
core's (`svdforge.core.config`). A key an older stored request lacks takes core's default
too, the one the API would have filled in: no default is written here, a value is passed
on only when the request has it. A text source left out is core's default text for its
use (calibration, training, evaluation); a key left out of a source is `DataSpec`'s.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from svdforge.core.config import (
    REFINE_PASSES,
    CompressConfig,
    DataSpec,
    EvalConfig,
    QualityTarget,
    RecoverConfig,
    SweepConfig,
    TargetedConfig,
    default_of,
)
from svdforge.core.errors import UserError
from svdforge.persistence.modelref import ModelRefError, check_hub_name, check_model_ref
from svdforge.persistence.settings import Settings

# request keys passed on as they are, when present
COMPRESS_KEYS = ("method", "allocation", "loss_score", "targets", "rank_multiple")
TRAINING_KEYS = ("epochs", "max_steps", "lr", "batch_size", "objective", "rank", "alpha", "dropout", "init_r",
                 "target_r", "update", "update_mix")
EVAL_KEYS = ("enabled", "seq_len", "max_tokens", "batch_size", "throughput", "prompts", "sample_tokens")


def _given(request: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: request[k] for k in keys if k in request}


def data_spec(spec: dict[str, Any], files: dict[str, Path], split: str | None) -> DataSpec:
    """One text source. `split` is the builtin corpus's part (the callers pass the split of core's
    default text for the use); an uploaded file id becomes the local path the worker copied it to."""
    common = _given(spec, ("samples", "seq_len", "seed"))
    source = spec.get("source", "builtin")
    if source == "builtin":
        return DataSpec(source="builtin", split=split, **common)
    if source == "file":
        return DataSpec(source="file", path=str(files[spec["file_id"]]), **common)
    if source == "hf":
        try:
            check_hub_name(spec["dataset"])
        except ModelRefError as e:
            raise UserError(f"dataset: {e}") from None
        return DataSpec(source="hf", dataset=spec["dataset"], config=spec.get("config"), split=spec.get("split"),
                        **_given(spec, ("text_field",)), **common)
    raise UserError(f"unknown data source {source!r}")


def recover_config(adapter: dict[str, Any], files: dict[str, Path]) -> RecoverConfig:
    default = RecoverConfig()
    kind = adapter.get("type", default.type)
    if kind == "none":
        return RecoverConfig(type="none")
    if kind == "update":  # the API names core's `update_mix` `mix` on this adapter
        return RecoverConfig(type="update", **({"update_mix": adapter["mix"]} if "mix" in adapter else {}))
    data = data_spec(adapter["data"], files, default.data.split) if adapter.get("data") else default.data
    return RecoverConfig(type=kind, data=data, **_given(adapter, TRAINING_KEYS))


def with_refine(rc: RecoverConfig, refine: dict[str, Any] | None) -> RecoverConfig:
    """The request's `refine` object (null: off) on core's recovery config; a key left out of it
    takes core's default (`passes`: REFINE_PASSES)."""
    if not refine:
        return rc
    return dataclasses.replace(rc, refine_passes=refine.get("passes", REFINE_PASSES),
                               refine_lr=refine.get("lr", rc.refine_lr),
                               refine_norms=refine.get("norms", rc.refine_norms))


def eval_config(evaluation: dict[str, Any], files: dict[str, Path]) -> EvalConfig:
    """The text is cut at the evaluation's own `seq_len`."""
    default = EvalConfig()
    options = _given(evaluation, EVAL_KEYS)
    spec = {**evaluation, "seq_len": options.get("seq_len", default.seq_len)}
    return EvalConfig(data=data_spec(spec, files, default.data.split), **options)


def build_config(request: dict[str, Any], files: dict[str, Path],
                 settings: Settings) -> CompressConfig | SweepConfig | TargetedConfig:
    """A CompressConfig, or for a request with `ratios` a SweepConfig (with `target` a TargetedConfig):
    the same settings in `parallel` calibration mode (the only mode whose statistics they can share)."""
    try:
        model = check_model_ref(request["model"], settings)
    except ModelRefError as e:
        raise UserError(f"model: {e}") from None
    ratios, target = request.get("ratios"), request.get("target")
    if target is not None:
        target = QualityTarget(**target)
    shared = ratios is not None or target is not None
    config = CompressConfig(
        model=model, ratio=min(ratios) if ratios else target.ratio_max if target else request["ratio"],
        calibration=data_spec(request.get("calibration") or {}, files, default_of(CompressConfig, "calibration").split),
        calibration_mode="parallel" if shared else "sequential",
        recover=with_refine(recover_config(request.get("adapter") or {}, files), request.get("refine")),
        evaluation=eval_config(request.get("evaluation") or {}, files),
        device=settings.device,
        allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code,
        **_given(request, COMPRESS_KEYS),
    )
    if target is not None:
        return TargetedConfig(config, target)
    return config if ratios is None else SweepConfig(config, ratios)
