"""`svdforge compress` and `svdforge evaluate`: the core library from the shell."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from svdforge.cli.app import app
from svdforge.core.architectures import supported_list
from svdforge.core.config import (
    ALLOCATIONS,
    LOSS_SCORES,
    MAX_RANK_MULTIPLE,
    MAX_SAMPLE_TOKENS,
    CompressConfig,
    DataSpec,
    EvalConfig,
    QualityTarget,
    RecoverConfig,
    check_prompts,
    default_of,
)
from svdforge.core.errors import UserError
from svdforge.core.methods import method_names, method_options_help

# Every default below is the library's own (one definition: svdforge.core.config).
_DATA, _EVAL, _REC = DataSpec(), EvalConfig(), RecoverConfig()


def _data(file: Path | None, hf: str | None, hf_config: str | None, split: str | None,
          samples: int, seq_len: int, seed: int, default_split: str) -> DataSpec:
    if file and hf:
        raise UserError("give either a text file or an HF dataset, not both")
    if file:
        return DataSpec(source="file", path=str(file), samples=samples, seq_len=seq_len, seed=seed)
    if hf:
        return DataSpec(source="hf", dataset=hf, config=hf_config, split=split, samples=samples,
                        seq_len=seq_len, seed=seed)
    return DataSpec(source="builtin", split=split or default_split, samples=samples, seq_len=seq_len, seed=seed)


def _method_options(pairs: list[str] | None) -> dict:
    """`--method-option alpha=0.7` -> {"alpha": 0.7}; values are JSON where they parse as JSON."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--method-option must be KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _eval_config(no_eval: bool, eval_file, eval_hf, eval_hf_config, eval_split, eval_seq_len, eval_max_tokens,
                 throughput_runs, zero_shot, prompts: list[str] | None = None,
                 sample_tokens: int = _EVAL.sample_tokens) -> EvalConfig:
    data = _data(eval_file, eval_hf, eval_hf_config, eval_split, 1, 2, 0, "evaluation")
    prompts = check_prompts(list(prompts or ()), "--prompt")
    if not 1 <= sample_tokens <= MAX_SAMPLE_TOKENS:
        raise UserError(f"--sample-tokens must be >= 1 and <= {MAX_SAMPLE_TOKENS}, got {sample_tokens}")
    return EvalConfig(enabled=not no_eval, data=data, seq_len=eval_seq_len,
                      max_tokens=None if eval_max_tokens == 0 else eval_max_tokens,
                      throughput=throughput_runs > 0, throughput_runs=max(throughput_runs, 1),
                      zero_shot=[t for t in (zero_shot or "").split(",") if t],
                      prompts=prompts, sample_tokens=sample_tokens)


EvalFile = Annotated[Path | None, typer.Option("--eval-file", help="Evaluation text file (default: builtin corpus, evaluation split).")]
EvalHF = Annotated[str | None, typer.Option("--eval-hf", help="Evaluation HF dataset id (needs network).")]
EvalHFConfig = Annotated[str | None, typer.Option("--eval-hf-config")]
EvalSplit = Annotated[str | None, typer.Option("--eval-split")]
EvalSeqLen = Annotated[int, typer.Option("--eval-seq-len", help="Evaluation window length L.")]
EvalMaxTokens = Annotated[int, typer.Option("--eval-max-tokens", help="Cap on evaluation tokens (0: the whole split).")]
ThroughputRuns = Annotated[int, typer.Option("--throughput-runs", help="Timed forward runs per model (0: skip).")]
ZeroShot = Annotated[str | None, typer.Option("--zero-shot", help="lm-eval tasks, comma separated (needs network).")]
Prompts = Annotated[list[str] | None, typer.Option("--prompt", help="A prompt the dense and the compressed model complete greedily (report `samples`, OUT/samples.md), after the fixed ones; repeatable, up to 8.")]
SampleTokens = Annotated[int, typer.Option("--sample-tokens", help="New tokens per sample completion (1..256).")]


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help=f"HF folder, .gguf file, hub id, or alias smollm2-135m. Architectures (config.json model_type): {supported_list()}.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (must be empty or absent).")],
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of parameters removed per linear, in (0, 1).")] = None,
    ratios: Annotated[str | None, typer.Option("--ratios", help="A sweep: 2-8 ratios, comma separated (e.g. 0.2,0.4,0.6), from one parallel calibration; one artifact per ratio in OUT/ratio-0.40/ ...")] = None,
    method: Annotated[str, typer.Option("--method", help=" | ".join(method_names()))] = default_of(CompressConfig, "method"),
    method_option: Annotated[list[str] | None, typer.Option("--method-option", help=f"KEY=VALUE, repeatable: an option of --method ({method_options_help()}).")] = None,
    allocation: Annotated[str, typer.Option("--allocation", help=" | ".join(ALLOCATIONS) + " (loss: components scored by their effect on the loss, one budget for the whole model; auto: loss unless the job streams or its pass does not fit)")] = default_of(CompressConfig, "allocation"),
    loss_score: Annotated[str, typer.Option("--loss-score", help=" | ".join(LOSS_SCORES) + " (the score of --allocation loss)")] = default_of(CompressConfig, "loss_score"),
    targets: Annotated[str, typer.Option("--targets", help="all | attention | mlp | re:<regex>")] = default_of(CompressConfig, "targets"),
    rank_multiple: Annotated[int, typer.Option("--rank-multiple", help=f"Round every rank to a multiple of N (1..{MAX_RANK_MULTIPLE}; 1: no rounding) within the same parameters: kernel-friendly shapes.")] = default_of(CompressConfig, "rank_multiple"),
    target_ppl_ratio: Annotated[float | None, typer.Option("--target-ppl-ratio", help="Instead of --ratio: the largest ratio whose PPL / dense PPL on the evaluation data is at most this (one parallel calibration, bisection over the ratio; report.json `target` has the curve).")] = None,
    target_kl: Annotated[float | None, typer.Option("--target-kl", help="Instead of --ratio: the largest ratio whose mean Teacher-KL on the evaluation data is at most this.")] = None,
    target_range: Annotated[str, typer.Option("--target-range", help="LO,HI: the ratios a target search may choose from.")] = "0.05,0.95",
    target_tolerance: Annotated[float, typer.Option("--target-tolerance", help="A target search stops when its bracket is narrower than this.")] = default_of(QualityTarget, "tolerance"),
    target_max_probes: Annotated[int, typer.Option("--target-max-probes", help="A target search evaluates at most this many ratios.")] = default_of(QualityTarget, "max_probes"),
    mode: Annotated[str | None, typer.Option("--mode", help="sequential | parallel calibration (default: sequential; parallel for --ratios and targets, the only mode they can share)")] = None,
    calib_file: Annotated[Path | None, typer.Option("--calib-file", help="Calibration text file.")] = None,
    calib_hf: Annotated[str | None, typer.Option("--calib-hf", help="Calibration HF dataset id.")] = None,
    calib_hf_config: Annotated[str | None, typer.Option("--calib-hf-config")] = None,
    calib_split: Annotated[str | None, typer.Option("--calib-split")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="N calibration windows.")] = _DATA.samples,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Calibration window length L.")] = _DATA.seq_len,
    seed: Annotated[int, typer.Option("--seed")] = default_of(CompressConfig, "seed"),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration batch size.")] = default_of(CompressConfig, "calibration_batch_size"),
    adapter: Annotated[str, typer.Option("--adapter", help="none | update | lora | adalora")] = "none",
    adapter_rank: Annotated[int, typer.Option("--adapter-rank")] = _REC.rank,
    adapter_steps: Annotated[int | None, typer.Option("--adapter-steps", help="Cap on optimizer steps.")] = None,
    adapter_alpha: Annotated[int, typer.Option("--adapter-alpha", help="LoRA / AdaLoRA alpha.")] = _REC.alpha,
    init_r: Annotated[int, typer.Option("--init-r", help="AdaLoRA initial rank.")] = _REC.init_r,
    target_r: Annotated[int, typer.Option("--target-r", help="AdaLoRA target (average) rank.")] = _REC.target_r,
    adapter_objective: Annotated[str, typer.Option("--adapter-objective", help="ntp | kl | both")] = _REC.objective,
    adapter_lr: Annotated[float, typer.Option("--adapter-lr")] = _REC.lr,
    adapter_epochs: Annotated[int, typer.Option("--adapter-epochs")] = _REC.epochs,
    adapter_batch_size: Annotated[int, typer.Option("--adapter-batch-size")] = _REC.batch_size,
    adapter_grad_accum: Annotated[int, typer.Option("--adapter-grad-accum")] = _REC.grad_accum,
    adapter_samples: Annotated[int, typer.Option("--adapter-samples", help="Training windows (same source as calibration, seed+1).")] = _REC.data.samples,
    adapter_seq_len: Annotated[int | None, typer.Option("--adapter-seq-len", help="Training window length (default: --seq-len).")] = None,
    adapter_update: Annotated[bool, typer.Option("--adapter-update", help="Also apply the closed-form update before LoRA/AdaLoRA.")] = False,
    update_mix: Annotated[float, typer.Option("--update-mix", help="Closed-form update: weight of the dense output in its target (0..1).")] = _REC.update_mix,
    refine_passes: Annotated[int, typer.Option("--refine-passes", help="Layer-local refinement: passes of Adam on each compressed layer's factors towards the dense layer's outputs (0: off; sequential mode).")] = _REC.refine_passes,
    refine_lr: Annotated[float, typer.Option("--refine-lr", help="Layer-local refinement: Adam step size.")] = _REC.refine_lr,
    refine_norms: Annotated[bool, typer.Option("--refine-norms", help="Layer-local refinement also trains each layer's norm weights.")] = _REC.refine_norms,
    adapter_autocast: Annotated[str, typer.Option("--adapter-autocast", help="none | bfloat16 | float16 training forward")] = _REC.autocast,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip evaluation.")] = False,
    eval_file: EvalFile = None, eval_hf: EvalHF = None, eval_hf_config: EvalHFConfig = None,
    eval_split: EvalSplit = None, eval_seq_len: EvalSeqLen = _EVAL.seq_len, eval_max_tokens: EvalMaxTokens = _EVAL.max_tokens,
    throughput_runs: ThroughputRuns = _EVAL.throughput_runs, zero_shot: ZeroShot = None,
    prompt: Prompts = None, sample_tokens: SampleTokens = _EVAL.sample_tokens,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 forward")] = default_of(CompressConfig, "dtype"),
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = default_of(CompressConfig, "device"),
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin/.pt weights (runs their code).")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    streaming: Annotated[str, typer.Option("--streaming", help="auto | on | off: one decoder layer at a time from the shards")] = default_of(CompressConfig, "streaming"),
    max_activation_bytes: Annotated[int | None, typer.Option("--max-activation-bytes", help="In-memory budget of calibration activations (past it: disk).")] = None,
    no_stats_cache: Annotated[bool, typer.Option("--no-stats-cache", help="Neither reuse nor store calibration statistics.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Compress MODEL and write the artifact plus OUT/report.json (--ratios: one artifact per ratio;
    --target-ppl-ratio / --target-kl: the largest ratio meeting the bound, its search in report.json `target`)."""
    from svdforge.core.config import check_ratios
    from svdforge.core.pipeline import compress as run
    from svdforge.core.pipeline import default_threads
    from svdforge.core.progress import TqdmBars
    from svdforge.core.sweeps import sweep
    from svdforge.core.targets import compress_to_target

    given = [n for n, v in (("--ratio", ratio), ("--ratios", ratios), ("--target-ppl-ratio", target_ppl_ratio),
                            ("--target-kl", target_kl)) if v is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --ratio (one compression), --ratios (a sweep), --target-ppl-ratio or "
                        f"--target-kl (a quality target); got {', '.join(given) if given else 'none'}")
    sweep_ratios = check_ratios(ratios, "--ratios") if ratios is not None else None
    target = _target(target_ppl_ratio, target_kl, target_range, target_tolerance, target_max_probes)
    if (sweep_ratios is not None or target is not None) and mode == "sequential":
        raise UserError(f"{given[0]} shares one calibration between ratios, which is exact only with --mode "
                        "parallel (sequential statistics depend on the ratio); run one --ratio at a time instead")
    mode = mode or ("parallel" if sweep_ratios is not None or target is not None else "sequential")
    config = CompressConfig(
        model=model, ratio=ratio if ratio is not None else sweep_ratios[0] if sweep_ratios else target.ratio_max,
        method=method, method_options=_method_options(method_option), allocation=allocation, loss_score=loss_score,
        rank_multiple=rank_multiple,
        targets=targets, calibration_mode=mode, calibration_batch_size=batch_size,
        calibration=_data(calib_file, calib_hf, calib_hf_config, calib_split, calib_samples, seq_len, seed,
                          "calibration"),
        recover=RecoverConfig(type=adapter, rank=adapter_rank, max_steps=adapter_steps, alpha=adapter_alpha,
                              init_r=init_r, target_r=target_r, objective=adapter_objective, lr=adapter_lr,
                              epochs=adapter_epochs, batch_size=adapter_batch_size, grad_accum=adapter_grad_accum,
                              update=adapter_update, update_mix=update_mix, autocast=adapter_autocast, seed=seed,
                              refine_passes=refine_passes, refine_lr=refine_lr, refine_norms=refine_norms,
                              data=_data(calib_file, calib_hf, calib_hf_config, calib_split, adapter_samples,
                                         adapter_seq_len or seq_len, seed + 1, "calibration")),
        evaluation=_eval_config(no_eval, eval_file, eval_hf, eval_hf_config, eval_split, eval_seq_len,
                                eval_max_tokens, throughput_runs, zero_shot, prompt, sample_tokens),
        dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, seed=seed,
        streaming=streaming, max_activation_bytes=max_activation_bytes, stats_cache=not no_stats_cache)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder")
    default_threads()
    bars = TqdmBars(not quiet)
    try:
        if target is not None:
            report = compress_to_target(config, target, out, bars)
        else:
            report = run(config, out, progress=bars) if sweep_ratios is None else sweep(config, sweep_ratios, out, bars)
    finally:
        bars.close()
    if sweep_ratios is None:
        summary = _summary(report)
        if target is not None:
            t = report["target"]
            summary["target"] = {k: t[k] for k in ("metric", "max", "chosen", "reason", "probe_count", "curve")}
        typer.echo(json.dumps(summary, indent=2))
        samples = f"  samples: {out / 'samples.md'}" if (out / "samples.md").is_file() else ""
        typer.echo(f"artifact: {out}  report: {out / 'report.json'}{samples}")
        return
    typer.echo(json.dumps({"model": report["model"], "method": report["method"],
                           "calibration_mode": report["calibration_mode"],
                           "ratios": [_summary(e) | {"artifact": str(out / e["artifact"])}
                                      for e in report["sweep"]["ratios"]],
                           "time_s": {k: {n: round(v, 2) for n, v in d.items()} if isinstance(d, dict) else d
                                      for k, d in report["sweep"]["time_s"].items() if k != "estimate"}},
                          indent=2))
    typer.echo(f"artifacts: {out}/ratio-*  report: {out / 'report.json'}  figure: {out / 'ppl_vs_ratio.png'}")


@app.command()
def evaluate(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by `svdforge compress`.")],
    teacher: Annotated[str | None, typer.Option("--teacher", help="Dense model to compare with (default: the artifact's).")] = None,
    eval_file: EvalFile = None, eval_hf: EvalHF = None, eval_hf_config: EvalHFConfig = None,
    eval_split: EvalSplit = None, eval_seq_len: EvalSeqLen = _EVAL.seq_len, eval_max_tokens: EvalMaxTokens = _EVAL.max_tokens,
    throughput_runs: ThroughputRuns = _EVAL.throughput_runs, zero_shot: ZeroShot = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="Write the report here (default ARTIFACT/evaluation.json).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Re-evaluate an artifact against its dense teacher with the same options as compress."""
    from svdforge.core.pipeline import default_threads, evaluate_artifact
    from svdforge.core.progress import TqdmBars

    ev = _eval_config(False, eval_file, eval_hf, eval_hf_config, eval_split, eval_seq_len, eval_max_tokens,
                      throughput_runs, zero_shot)
    default_threads()
    bars = TqdmBars(not quiet)
    try:
        report = evaluate_artifact(artifact, ev, teacher, device, progress=bars)
    finally:
        bars.close()
    target = out or (artifact / "evaluation.json")
    target.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(_summary(report), indent=2))
    typer.echo(f"report: {target}")


def _target(ppl_ratio: float | None, kl: float | None, ratio_range: str, tolerance: float,
            max_probes: int) -> QualityTarget | None:
    """The quality target of --target-ppl-ratio / --target-kl (None without one)."""
    if ppl_ratio is None and kl is None:
        return None
    parts = [p.strip() for p in ratio_range.split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--target-range must be LO,HI (two ratios in (0, 1)), got {ratio_range!r}") from None
    return QualityTarget(max_ppl_ratio=ppl_ratio, max_teacher_kl=kl, ratio_min=lo, ratio_max=hi,
                         tolerance=tolerance, max_probes=max_probes)


def _summary(r: dict) -> dict:
    s = {k: r[k] for k in ("model", "method", "target_ratio") if k in r}
    if "params" in r and r["params"]:
        s["params"] = {k: r["params"][k] for k in ("dense", "compressed", "reduction") if k in r["params"]}
    if "metrics" in r:
        s["metrics"] = r["metrics"]
    if "throughput" in r:
        s["speedup"] = r["throughput"].get("speedup")
    if "timings_s" in r:
        s["timings_s"] = {k: round(v, 2) for k, v in r["timings_s"].items()}
    if "peak_rss_bytes" in r:
        s["peak_rss_mb"] = round(r["peak_rss_bytes"] / 2**20)
    return s
