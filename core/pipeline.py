"""The whole job: load -> whiten + svd (the layer loop) -> recover -> save -> evaluate.

`compress(config, out_dir, progress, should_cancel)` is what the CLI, the Python API and
the service worker all call; `svdforge.core.sweeps.sweep` shares its first steps (`start`,
`load`, `estimate_fisher`) for several ratios from one calibration.

Stages, as the progress events name them: `load` (the dense model), `whiten` (calibration
statistics, Fisher information, allocation spectra), `svd` (decomposition), `recover`,
`save` (the artifact's files), `evaluate`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from svdforge.core import architectures, streaming
from svdforge.core import data as data_mod
from svdforge.core.activations import ActivationStore
from svdforge.core.allocation import choose_allocation, needs_spectra, plan_spectra, rank_plan
from svdforge.core.artifact import (
    check_saved,
    check_saved_keys,
    load_artifact,
    load_weights,
    package_versions,
    read_manifest,
    save_model,
)
from svdforge.core.config import CompressConfig, EvalConfig
from svdforge.core.decompose import CalibrationResult, compress_layers, uniform_ranks
from svdforge.core.errors import UserError
from svdforge.core.evaluate import (
    compare,
    compare_streamed,
    count_params,
    flops_per_token,
    greedy_samples,
    throughput,
    zero_shot,
)
from svdforge.core.layers import target_names
from svdforge.core.lowrank import apply_ranks
from svdforge.core.memory import peak_rss_bytes, trim_heap
from svdforge.core.methods import Method, get_method
from svdforge.core.models import cache_dir as models_cache_dir
from svdforge.core.models import (
    load_model,
    load_tokenizer,
    model_config_of,
    own_weights,
    pick_device,
    resolve_source,
)
from svdforge.core.progress import Reporter
from svdforge.core.recover import recover
from svdforge.core.refine import Refine
from svdforge.core.report import compressed_report, count_paths, write_report_and_manifest
from svdforge.core.statistics import collect_fisher
from svdforge.core.stats_cache import DEFAULT_MAX_BYTES, PlanCache, StatsCache, plan_key, stats_key

# The stages a resumed run skips: everything up to and including writing the weights.
RESUMED_STAGES = ("load", "whiten", "svd", "recover", "save")


def calibration_dtype(config: CompressConfig, device: str) -> torch.dtype:
    """`auto`: bfloat16 forward passes where the hardware runs them natively (CUDA, or a CPU
    with AVX512-BF16/AMX: 3x faster than fp32 here), else the model's dtype. Measured on
    SmolLM2 at 0.4 (docs/benchmarks.md): the PPL difference is within noise."""
    if config.calibration_dtype != "auto":
        return getattr(torch, config.calibration_dtype)
    if device.startswith("cuda") or _cpu_has_bf16():
        return torch.bfloat16
    return getattr(torch, config.dtype)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def safetensors_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@dataclass
class Run:
    """A job's common state from its start on: progress, device, output folder, clock."""

    config: CompressConfig
    rep: Reporter
    device: str
    out: Path | None
    t_start: float


@dataclass
class Loaded:
    """The dense model and what every later stage reads from it."""

    source: str
    gguf_file: str | None
    model: torch.nn.Module
    tok: object
    names: list[str]                 # the target linears
    dense: tuple[int, int, int]      # parameters, target-linear parameters, FLOPs per token
    calib: data_mod.Windows
    method: Method
    t_load: float
    job: streaming.StreamingJob | None = None
    tmp_out: tempfile.TemporaryDirectory | None = None
    stream_reason: str = ""
    allocation_choice: dict | None = None   # what `allocation="auto"` chose and why (None: not auto)


def start(config: CompressConfig, out_dir, progress, should_cancel) -> Run:
    """Seed, device, output folder: the first step of every run."""
    torch.manual_seed(config.seed)
    return Run(config, Reporter(progress, should_cancel), pick_device(config.device),
               Path(out_dir) if out_dir is not None else None, time.perf_counter())


def check_inputs(run: Run) -> None:
    """Refuse a used output folder and text sources that cannot be read, before any loading."""
    config = run.config
    if run.out is not None and run.out.exists() and any(run.out.iterdir()):
        raise UserError(f"output folder {run.out} is not empty")
    data_mod.check_source(config.calibration)
    if config.evaluation.enabled:
        data_mod.check_source(config.evaluation.data)
    if config.recover.type in ("lora", "adalora"):
        data_mod.check_source(config.recover.data)


def _load_dense(run: Run, source: str, stream: bool):
    """(model, tokenizer, source, streaming job, its temporary folder)."""
    config = run.config
    if not stream:
        model, tok, source = load_model(config.model, config.dtype, run.device, config.allow_pickle,
                                        config.trust_remote_code)
        return model, tok, source, None, None
    tmp_out = tempfile.TemporaryDirectory(prefix="svdforge-stream-") if run.out is None else None
    job = streaming.StreamingJob(config, source, run.device, run.out if run.out is not None else Path(tmp_out.name))
    return job.model, load_tokenizer(source, trust_remote_code=config.trust_remote_code), source, job, tmp_out


def load(run: Run, *, sweep: bool = False) -> Loaded:
    """The `load` stage: the dense model (whole, or its skeleton when streaming), its target
    linears, the calibration windows and the method. A sweep never streams."""
    config, rep = run.config, run.rep
    rep.stage_started("load", "loading model")
    t0 = time.perf_counter()
    source, gguf_file = resolve_source(config.model, config.allow_pickle)
    model_config = model_config_of(source, gguf_file, config.trust_remote_code)
    architectures.require(model_config.get("model_type"))
    architectures.require_positions(config.window_lengths(), model_config)
    stream, reason = streaming.decide(config, source, gguf_file)
    if stream and sweep:
        raise UserError(f"this model would have to stream ({reason}), which a sweep cannot do: it keeps "
                        "the dense model in memory; run one compression per ratio")
    model, tok, source, job, tmp_out = _load_dense(run, source, stream)
    if job:
        rep.log(f"streaming one layer at a time: {reason}", "load")
    t_load = time.perf_counter() - t0
    names = target_names(model, config.targets)
    if not names:
        raise UserError(f"targets {config.targets!r} selects no linear of this model")
    dense = (count_params(model), sum(model.get_submodule(n).weight.numel() for n in names),
             flops_per_token(model, config.evaluation.seq_len))
    choice = _choose_allocation(run, model, names, job is not None)
    calib = data_mod.calibration_windows(tok, config.calibration)
    rep.stage_finished("load", t_load)
    return Loaded(source, gguf_file, model, tok, names, dense, calib,
                  get_method(config.method, config.method_options), t_load, job, tmp_out, reason, choice)


def _choose_allocation(run: Run, model, names: list[str], streams: bool) -> dict | None:
    """`allocation="auto"` becomes `loss` or `uniform` here, once the model is loaded (or known to
    stream): run.config carries the choice from now on; returns the report's `allocation_choice`."""
    if run.config.allocation != "auto":
        return None
    chosen, why = choose_allocation(model, names, streams)
    run.config = replace(run.config, allocation=chosen)
    run.rep.log(f"allocation auto: {chosen} ({why})", "load")
    return {"requested": "auto", "chosen": chosen, "reason": why}


def estimate_fisher(run: Run, loaded: Loaded, note: str = "") -> tuple[dict | None, float]:
    """(Fisher information or None, seconds): squared gradients, for methods that need them."""
    if "fisher" not in loaded.method.needs:
        return None, 0.0
    t0 = time.perf_counter()
    run.rep.log(f"estimating Fisher information{note}", "whiten")
    fisher = collect_fisher(loaded.model, loaded.calib.ids[: loaded.method.config.samples], loaded.names, run.device)
    return fisher, time.perf_counter() - t0


def stats_cache(config: CompressConfig, loaded: Loaded, fdt: torch.dtype, device: str, update: bool):
    """(StatsCache or None, the report's entry when there is none)."""
    reason = _cache_off(config, loaded) or (
        "refine runs every layer's calibration forward (it trains on the dense outputs)"
        if config.recover.refine_passes else None)
    if reason:
        return None, {"status": "off", "reason": reason}
    key = stats_key(config, _keyed_source(loaded), loaded.calib.ids, loaded.method.needs - {"fisher"}, fdt,
                    device, update)
    limit = int(os.environ.get("SVDFORGE_STATS_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))
    return StatsCache(models_cache_dir(), key, limit), None


def _cache_off(config: CompressConfig, loaded: Loaded) -> str | None:
    """Why a job keeps no cache (statistics or rank plan); None: it keeps one."""
    if not config.stats_cache:
        return "stats_cache is false"
    if not Path(loaded.source).exists():
        return "the model is not a local folder or file: its revision cannot be keyed"
    return None


def _keyed_source(loaded: Loaded) -> str:
    return loaded.source if loaded.gguf_file is None else str(Path(loaded.source) / loaded.gguf_file)


def plan_passes(run: Run, loaded: Loaded, fisher, fdt: torch.dtype, layer_io=None,
                activations=None) -> tuple[dict, dict | None, dict]:
    """`plan_spectra` through the plan cache (`svdforge.core.stats_cache.PlanCache`) where the job
    keeps a cache: (spectra, loss scores or None, the report's `plan_cache`)."""
    config = run.config
    off = _cache_off(config, loaded)
    cache = None
    if off is None:
        cache = PlanCache(models_cache_dir(), plan_key(config, _keyed_source(loaded), loaded.calib.ids, fdt,
                                                       run.device))
        if cache.status == "hit" and (got := cache.load()) is not None:
            run.rep.log("rank plan: spectra" + (" and loss scores" if got[1] else "") + " from the cache", "whiten")
            return (*got, cache.report())
    spectra, scores = plan_spectra(loaded.model, loaded.calib.ids, config, run.device, run.rep, fisher, fdt,
                                   layer_io, activations, run.rep.check_cancel)
    if cache is None:
        return spectra, scores, {"status": "off", "reason": off}
    cache.save(spectra, scores)
    return spectra, scores, cache.report()


def activation_store(config: CompressConfig, device: str) -> ActivationStore | None:
    """In memory, the activations stay tensors on the device unless a budget is given."""
    if config.max_activation_bytes is None:
        return None
    return ActivationStore(device, config.max_activation_bytes, os.environ.get("SVDFORGE_TMP"))


def _rank_fn(run: Run, loaded: Loaded, fisher) -> tuple:
    """(rank function, the report's `allocation_info` / `rank_rounding` where they apply). Global
    allocation and rank rounding take the spectra from one dense pass (streamed when the job is)."""
    config = run.config
    if not needs_spectra(config):
        return uniform_ranks(config.ratio), {}
    t0 = time.perf_counter()
    layer_io, activations = loaded.job.spectra_io() if loaded.job else (None, None)
    spectra, scores, cached = plan_passes(run, loaded, fisher, calibration_dtype(config, run.device), layer_io,
                                          activations)
    rank_fn, info, rounding = rank_plan(spectra, config, config.ratio, time.perf_counter() - t0, scores)
    return rank_fn, {k: v for k, v in (("allocation_info", info), ("rank_rounding", rounding)) if v} | \
        {"plan_cache": cached}


def calibrate_and_decompose(run: Run, loaded: Loaded) -> tuple[CalibrationResult, dict]:
    """The `whiten` and `svd` stages: the layer loop compresses the model in place.
    Returns its result and the report entries it adds (allocation, cache, timings)."""
    config, rep, device, job = run.config, run.rep, run.device, loaded.job
    rep.stage_started("whiten")
    t0 = time.perf_counter()
    fisher, _ = estimate_fisher(run, loaded)
    rank_fn, plan_info = _rank_fn(run, loaded, fisher)
    t_pre = time.perf_counter() - t0   # Fisher information and the rank plan's passes (spectra, gradients)
    update = config.recover.type == "update" or config.recover.update
    fdt = calibration_dtype(config, device)
    cache, cache_off = stats_cache(config, loaded, fdt, device, update)
    rep.stage_started("svd")
    res = compress_layers(loaded.model, loaded.calib.ids, loaded.method, rank_fn, targets=config.targets,
                          mode=config.calibration_mode, batch_size=config.calibration_batch_size, device=device,
                          fisher=fisher, reporter=rep, forward_dtype=fdt, update=update,
                          update_mix=config.recover.update_mix, layer_io=job.layers if job else None,
                          activations=job.store if job else activation_store(config, device), stats_cache=cache,
                          refine=_refine(config, rep))
    rep.stage_finished("whiten", res.timings["calibrate"] + t_pre)
    rep.stage_finished("svd", res.timings["decompose"])
    extra = {"calibration_cache": cache.report() if cache else cache_off, "t_pre": t_pre, **plan_info}
    return res, extra


def _refine(config: CompressConfig, rep: Reporter) -> Refine | None:
    rc = config.recover
    if not rc.refine_passes:
        return None
    return Refine(rc.refine_passes, rc.refine_lr, norms=rc.refine_norms, seed=rc.seed, reporter=rep)


def _recover_stage(run: Run, loaded: Loaded, res: CalibrationResult) -> tuple[dict | None, float]:
    if run.config.recover.type == "none":
        return None, 0.0
    t0 = time.perf_counter()
    run.rep.stage_started("recover")
    report = recover(loaded.model, loaded.tok, run.config, loaded.calib, run.device, run.rep, calibration=res)
    run.rep.stage_finished("recover")
    return report, time.perf_counter() - t0


def _save(run: Run, loaded: Loaded, report: dict) -> None:
    """The `save` stage: weights, config and tokenizer into the output folder."""
    run.rep.stage_started("save")
    if loaded.job:
        loaded.job.save(loaded.tok)
    else:
        save_model(loaded.model, loaded.tok, run.out)
    ids = loaded.calib.ids[:1, :16]
    report["post_save_check"] = check_saved_keys(run.out) if loaded.job else \
        check_saved(run.out, loaded.model, ids, run.device)
    run.rep.stage_finished("save")
    report["bytes"] = {"dense": loaded.dense[0] * torch.finfo(loaded.model.dtype).bits // 8,
                       "compressed": safetensors_bytes(run.out)}


def _single_report(run: Run, loaded: Loaded, res: CalibrationResult, recover_report, extra: dict) -> dict:
    report = compressed_report(run.config, loaded.source, loaded.model, run.device, loaded.calib, res,
                               recover_report, loaded.dense)
    job = loaded.job
    report["streaming"] = job.report(loaded.stream_reason) if job else {"enabled": False,
                                                                         "reason": loaded.stream_reason}
    report["calibration_cache"] = extra["calibration_cache"]
    report["whitening_paths"] = count_paths(res.ranks)
    report["ranks"] = res.ranks
    report.update({k: extra[k] for k in ("allocation_info", "rank_rounding", "plan_cache") if k in extra})
    if loaded.allocation_choice:
        report["allocation_choice"] = loaded.allocation_choice
    if res.refine is not None:
        report["refine"] = res.refine
    return report


def compress(config: CompressConfig, out_dir: str | Path | None = None, progress=None,
             should_cancel=None, *, on_saved=None, resume: dict | None = None) -> dict:
    """Run the pipeline; write the artifact and report.json into out_dir (if given).

    `on_saved(out_dir, report)` is called once the weights, config and tokenizer are in
    out_dir and before evaluation, with the report so far (plain JSON): enough to checkpoint
    the run. `resume=<that report>`, with out_dir holding those same files, skips loading,
    calibration, decomposition, recovery and saving: the compressed model is rebuilt from
    out_dir (in memory, or layer by layer if the first run streamed) and only evaluated.
    The service uses the pair so that a job retried after a lost worker does not start over.
    """
    run = start(config, out_dir, progress, should_cancel)
    if resume is not None:
        return _resume(run, resume)
    check_inputs(run)
    loaded = load(run)
    res, extra = calibrate_and_decompose(run, loaded)
    recover_report, t_recover = _recover_stage(run, loaded, res)
    report = _single_report(run, loaded, res, recover_report, extra)
    if run.out is not None:
        _save(run, loaded, report)
    report["timings_s"] = {"load": loaded.t_load, "calibrate": res.timings["calibrate"] + extra["t_pre"],
                           "decompose": res.timings["decompose"], "refine": res.timings.get("refine", 0.0),
                           "recover": t_recover,
                           "total": time.perf_counter() - run.t_start}
    if run.out is not None and on_saved is not None:
        on_saved(run.out, json.loads(json.dumps(report, default=str)))
    return _evaluate_and_finish(run, report, loaded.model, loaded.tok, loaded.job, loaded.tmp_out)


def _resume(run: Run, saved: dict) -> dict:
    """`compress` from the state it had right after saving, rebuilt from out_dir and the saved report."""
    config, out = run.config, run.out
    if out is None:
        raise UserError("resuming needs the output folder that holds the saved artifact")
    report = json.loads(json.dumps(saved))
    ranks = {name: e["rank"] for name, e in report["ranks"].items()}
    run.rep.log(f"resumed from a checkpoint: {', '.join(RESUMED_STAGES)} already done", "evaluate")
    report["resumed"] = {"skipped_stages": list(RESUMED_STAGES),
                         "checkpoint_timings_s": report.get("timings_s", {})}
    if (report.get("streaming") or {}).get("enabled"):
        source, _ = resolve_source(config.model, config.allow_pickle)
        job = streaming.StreamingJob(config, source, run.device, out)
        apply_ranks(job.model, ranks)  # the skeleton is on the meta device: no memory taken
        tok = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
        return _evaluate_and_finish(run, report, None, tok, job, None)
    return _evaluate_and_finish(run, report, load_weights(out, ranks, run.device), None, None, None)


def _evaluate_saved(run: Run, report: dict, model, tok, job) -> None:
    """The `evaluate` stage of `compress`: streamed, or against a freshly loaded dense teacher."""
    config = run.config
    if job:
        if run.out is None:
            job.save(tok)
        report.update(evaluate_streaming(job, tok, config.evaluation, run.rep))
        return
    own_weights(model)  # the dense checkpoint's memory map goes, the teacher maps it anew
    trim_heap()         # calibration's freed heap, before the teacher comes in
    teacher, teacher_tok, _ = load_model(config.model, config.dtype, run.device, config.allow_pickle,
                                         config.trust_remote_code)
    run.rep.check_cancel()  # loading the teacher is one call: stop right after it
    report.update(evaluate_models(teacher, model, tok if tok is not None else teacher_tok,
                                  config.evaluation, run.device, run.rep))


def _evaluate_and_finish(run: Run, report: dict, model, tok, job, tmp_out) -> dict:
    """Evaluate (in memory, or streamed), then write report.json and the manifest."""
    t_eval = 0.0
    if run.config.evaluation.enabled:
        run.rep.check_cancel()
        t0 = time.perf_counter()
        _evaluate_saved(run, report, model, tok, job)
        t_eval = time.perf_counter() - t0
    if tmp_out is not None:
        tmp_out.cleanup()
    before = report.pop("timings_s", {})
    report["timings_s"] = {k: before.get(k, 0.0) for k in ("load", "calibrate", "decompose", "refine", "recover")}
    report["timings_s"].update(evaluate=t_eval, total=time.perf_counter() - run.t_start)
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["versions"] = package_versions()
    report["threads"] = torch.get_num_threads()
    if run.out is not None:
        write_report_and_manifest(run.out, report)
    return report


def evaluate_models(teacher, student, tokenizer, ev: EvalConfig, device: str, rep: Reporter) -> dict:
    """Metrics of student vs teacher (teacher may be None: then only the student's perplexity),
    throughput, zero-shot and greedy sample completions of both."""
    rep.stage_started("evaluate")
    t0 = time.perf_counter()
    win = data_mod.evaluation_windows(tokenizer, ev.data, ev.seq_len, ev.max_tokens)
    metrics = compare(teacher, student, win.ids, ev.batch_size, device,
                      on_batch=lambda f: rep.progress("evaluate", 0.9 * f, "perplexity / fidelity"),
                      check_cancel=rep.check_cancel)
    out = {"metrics": metrics, "evaluation": win.spec | {"scored_tokens": metrics["compressed"]["tokens"]}}
    if ev.throughput:
        models = {"dense": teacher, "compressed": student} if teacher is not None else {"compressed": student}
        out["throughput"] = throughput(models, len(tokenizer), ev.throughput_seq_len, ev.throughput_runs, device,
                                       check_cancel=rep.check_cancel)
        if teacher is not None:
            out["throughput"]["speedup"] = (out["throughput"]["compressed"]["tokens_per_s"]
                                            / out["throughput"]["dense"]["tokens_per_s"])
    rep.check_cancel()
    out["zero_shot"] = zero_shot(student, tokenizer, ev.zero_shot, data_mod.offline())
    rep.progress("evaluate", 0.95, "sample completions")
    models = {"dense": teacher, "compressed": student} if teacher is not None else {"compressed": student}
    out["samples"] = greedy_samples(models, tokenizer, ev.prompts, ev.sample_tokens, device, rep.check_cancel)
    rep.stage_finished("evaluate", time.perf_counter() - t0)
    rep.metrics("evaluate", metrics)
    return out


def evaluate_streaming(job, tokenizer, ev: EvalConfig, rep: Reporter) -> dict:
    """`evaluate_models` for a streamed model: perplexity and fidelity layer by layer
    (`svdforge.core.evaluate.compare_streamed`). Throughput, zero-shot and the sample
    completions need the whole model on the device and are skipped with that reason."""
    rep.stage_started("evaluate")
    t0 = time.perf_counter()
    win = data_mod.evaluation_windows(tokenizer, ev.data, ev.seq_len, ev.max_tokens)
    metrics = compare_streamed(job, win.ids, ev.batch_size,
                               on_batch=lambda f: rep.progress("evaluate", f, "perplexity / fidelity"), reporter=rep)
    why = "streaming: the whole model is never in memory at once"
    out = {"metrics": metrics, "evaluation": win.spec | {"scored_tokens": metrics["compressed"]["tokens"],
                                                         "streamed": True}}
    if ev.throughput:
        out["throughput"] = {"skipped": True, "reason": why}
    out["samples"] = {"skipped": True, "max_new_tokens": ev.sample_tokens, "reason": why}
    out["zero_shot"] = {"skipped": True, "tasks": ev.zero_shot, "reason": why} if ev.zero_shot else \
        {"skipped": True, "reason": "no zero-shot tasks requested"}
    rep.stage_finished("evaluate", time.perf_counter() - t0)
    rep.metrics("evaluate", metrics)
    return out


def evaluate_artifact(path: str | Path, evaluation: EvalConfig | None = None, teacher_model: str | None = None,
                      device: str = "auto", progress=None) -> dict:
    """Re-evaluate an artifact against its dense teacher (the manifest's model unless given)."""
    rep = Reporter(progress)
    device = pick_device(device)
    manifest = read_manifest(path)
    t0 = time.perf_counter()
    student, tok = load_artifact(path, device=device)
    name = teacher_model or manifest.get("model")
    teacher = load_model(name, "float32", device)[0] if name else None
    report = {"artifact": str(path), "model": name, "method": manifest.get("method"),
              "target_ratio": manifest.get("target_ratio"), "params": manifest.get("params")}
    report.update(evaluate_models(teacher, student, tok, evaluation or EvalConfig(), device, rep))
    report["timings_s"] = {"evaluate": time.perf_counter() - t0}
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def default_threads() -> None:
    """Use every core the process may run on unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
