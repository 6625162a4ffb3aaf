"""Turn a stored job request (the API's validated JSON) into core's `CompressConfig`
(or, for a sweep, a `SweepConfig`).

The request was validated when it was accepted; core validates again on construction and
raises `UserError`, which fails the job with `invalid_input` rather than crashing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from svdforge.core.config import UPDATE_MIX, CompressConfig, DataSpec, EvalConfig, RecoverConfig, SweepConfig
from svdforge.core.errors import UserError
from svdforge.persistence.modelref import ModelRefError, check_hub_name, check_model_ref
from svdforge.persistence.settings import Settings


def data_spec(spec: dict[str, Any], files: dict[str, Path], split: str | None) -> DataSpec:
    """One text source; an uploaded file id becomes the local path the worker copied it to."""
    common = {"samples": spec.get("samples", 16), "seq_len": spec.get("seq_len", 256), "seed": spec.get("seed", 0)}
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
                        text_field=spec.get("text_field", "text"), **common)
    raise UserError(f"unknown data source {source!r}")


def recover_config(adapter: dict[str, Any], files: dict[str, Path]) -> RecoverConfig:
    kind = adapter.get("type", "none")
    if kind == "none":
        return RecoverConfig(type="none")
    if kind == "update":
        return RecoverConfig(type="update", update_mix=adapter.get("mix", UPDATE_MIX))
    keys = ("epochs", "max_steps", "lr", "batch_size", "objective", "rank", "alpha", "dropout", "init_r", "target_r",
            "update", "update_mix")
    options = {k: adapter[k] for k in keys if k in adapter}
    data = adapter.get("data") or {"source": "builtin", "samples": 32, "seed": 1}
    return RecoverConfig(type=kind, data=data_spec(data, files, "calibration"), **options)


def eval_config(evaluation: dict[str, Any], files: dict[str, Path]) -> EvalConfig:
    seq_len = evaluation.get("seq_len", 256)
    spec = {**evaluation, "seq_len": seq_len}
    return EvalConfig(enabled=evaluation.get("enabled", True), data=data_spec(spec, files, "evaluation"),
                      seq_len=seq_len, max_tokens=evaluation.get("max_tokens", 4096),
                      batch_size=evaluation.get("batch_size", 1), throughput=evaluation.get("throughput", True))


def build_config(request: dict[str, Any], files: dict[str, Path], settings: Settings) -> CompressConfig | SweepConfig:
    """A CompressConfig, or for a request with `ratios` a SweepConfig: the same settings in
    `parallel` calibration mode (the only mode whose statistics a sweep can share)."""
    try:
        model = check_model_ref(request["model"], settings)
    except ModelRefError as e:
        raise UserError(f"model: {e}") from None
    ratios = request.get("ratios")
    config = CompressConfig(
        model=model, ratio=request["ratio"] if ratios is None else min(ratios),
        method=request.get("method", "svd-llm"),
        allocation=request.get("allocation", "uniform"), targets=request.get("targets", "all"),
        calibration=data_spec(request.get("calibration") or {}, files, "calibration"),
        calibration_mode="sequential" if ratios is None else "parallel",
        recover=recover_config(request.get("adapter") or {}, files),
        evaluation=eval_config(request.get("evaluation") or {}, files),
        device=settings.device,
        allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code,
    )
    return config if ratios is None else SweepConfig(config, ratios)
