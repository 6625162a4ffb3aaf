"""svdforge core: truncation-aware SVD compression of Hugging Face causal LMs.

The library imports nothing of the service (svdforge.api, .worker, .persistence, .cli).

    from svdforge.core import CompressConfig, DataSpec, compress, load_artifact, sweep
    result = compress(CompressConfig(model="smollm2-135m", ratio=0.4), out_dir="out")
    model, tokenizer = load_artifact("out")
    # several ratios from one (parallel) calibration: out-sweep/ratio-0.20/, ratio-0.40/, ...
    sweep(CompressConfig(model="smollm2-135m", ratio=0.4, calibration_mode="parallel"), [0.2, 0.4, 0.6], "out-sweep")
    # the largest ratio whose PPL is at most 1.5 x the dense PPL (one calibration, bisection)
    compress_to_target(CompressConfig(model="smollm2-135m", ratio=0.5, calibration_mode="parallel"),
                       QualityTarget(max_ppl_ratio=1.5), "out-target")
"""
from svdforge.core.config import (
    CompressConfig,
    DataSpec,
    EvalConfig,
    QualityTarget,
    RecoverConfig,
    SweepConfig,
    TargetedConfig,
)
from svdforge.core.errors import Cancelled, NumericalError, TargetUnmet, UserError

__all__ = [
    "CompressConfig", "DataSpec", "EvalConfig", "QualityTarget", "RecoverConfig", "SweepConfig", "TargetedConfig",
    "Cancelled", "NumericalError", "TargetUnmet", "UserError",
    "compress", "compress_to_target", "sweep", "evaluate_artifact", "load_artifact", "load_model",
]


def __getattr__(name):  # lazy: importing `core` must not import torch/transformers
    if name in ("compress", "evaluate_artifact"):
        from svdforge.core import pipeline
        return getattr(pipeline, name)
    if name == "sweep":
        from svdforge.core.sweeps import sweep
        return sweep
    if name == "compress_to_target":
        from svdforge.core.targets import compress_to_target
        return compress_to_target
    if name == "load_artifact":
        from svdforge.core.artifact import load_artifact
        return load_artifact
    if name == "load_model":
        from svdforge.core.models import load_model
        return load_model
    raise AttributeError(name)
