"""The whole job: load -> whiten + svd (layer by layer) -> recover -> evaluate -> save.

`compress(config, out_dir, progress, should_cancel)` is what the CLI, the Python API and
the service worker all call.
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from core import data as data_mod
from core import streaming
from core.artifact import package_versions, read_manifest, save_model, write_manifest
from core.calibrate import collect_fisher, compress_layers, decoder_layers, select_linears, uniform_ranks
from core.config import CompressConfig, EvalConfig
from core.errors import UserError
from core.evaluate import compare, count_params, flops_per_token, matmul_params, throughput, zero_shot
from core.methods import get_method
from core.models import cache_dir as models_cache_dir
from core.models import load_model, load_tokenizer, pick_device, resolve_source
from core.progress import Reporter
from core.stats_cache import DEFAULT_MAX_BYTES, StatsCache, stats_key


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM where Linux has it: `ru_maxrss` includes the
    parent's RSS at fork time (carried over exec), which overstates a worker's own peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _target_names(model, targets: str) -> list[str]:
    layers, prefix = decoder_layers(model)
    return [n for i, layer in enumerate(layers) for n, _ in select_linears(layer, f"{prefix}.{i}", targets)]


def _rank_fn(config: CompressConfig, model, calib_ids, device, rep: Reporter, fisher=None):
    if config.allocation == "uniform":
        return uniform_ranks(config.ratio), None
    from core.allocation import global_ranks  # noqa: PLC0415

    return global_ranks(model, calib_ids, config, device, rep, fisher=fisher,
                        forward_dtype=calibration_dtype(config, device))


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


def _safetensors_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def evaluate_models(teacher, student, tokenizer, ev: EvalConfig, device: str, rep: Reporter) -> dict:
    """Metrics of student vs teacher (either may be None: then only the other's perplexity)."""
    rep.stage_started("evaluate")
    t0 = time.perf_counter()
    win = data_mod.evaluation_windows(tokenizer, ev.data, ev.seq_len, ev.max_tokens)
    metrics = compare(teacher, student, win.ids, ev.batch_size, device,
                      on_batch=lambda f: rep.progress("evaluate", 0.9 * f, "perplexity / fidelity"))
    out = {"metrics": metrics, "evaluation": win.spec | {"scored_tokens": metrics["compressed"]["tokens"]}}
    if ev.throughput:
        models = {"dense": teacher, "compressed": student} if teacher is not None else {"compressed": student}
        out["throughput"] = throughput(models, len(tokenizer), ev.throughput_seq_len, ev.throughput_runs, device)
        if teacher is not None:
            out["throughput"]["speedup"] = (out["throughput"]["compressed"]["tokens_per_s"]
                                            / out["throughput"]["dense"]["tokens_per_s"])
    out["zero_shot"] = zero_shot(student, tokenizer, ev.zero_shot, data_mod.offline())
    rep.stage_finished("evaluate", time.perf_counter() - t0)
    rep.metrics("evaluate", metrics)
    return out


# The stages a resumed run skips: everything up to and including writing the weights.
RESUMED_STAGES = ("whiten", "svd", "recover", "save")


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
    rep = Reporter(progress, should_cancel)
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    out = Path(out_dir) if out_dir is not None else None
    if resume is not None:
        if out is None:
            raise UserError("resuming needs the output folder that holds the saved artifact")
        report, model, tok, job = _resumed(config, out, resume, device, rep)
        return _evaluate_and_finish(config, out, report, model, tok, job, None, device, rep, t_start)
    if out is not None and out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty")

    data_mod.check_source(config.calibration)
    if config.evaluation.enabled:
        data_mod.check_source(config.evaluation.data)
    if config.recover.type in ("lora", "adalora"):
        data_mod.check_source(config.recover.data)
    rep.stage_started("whiten", "loading model")
    t0 = time.perf_counter()
    source, gguf_file = resolve_source(config.model, config.allow_pickle)
    stream, stream_reason = streaming.decide(config, source, gguf_file)
    job = tmp_out = None
    if stream:
        if out is None:
            tmp_out = tempfile.TemporaryDirectory(prefix="svdforge-stream-")
        job = streaming.StreamingJob(config, source, device, out if out is not None else Path(tmp_out.name))
        model, tok = job.model, load_tokenizer(source, trust_remote_code=config.trust_remote_code)
        rep.log(f"streaming one layer at a time: {stream_reason}", "whiten")
    else:
        model, tok, source = load_model(config.model, config.dtype, device, config.allow_pickle,
                                        config.trust_remote_code)
    t_load = time.perf_counter() - t0
    dense_params = count_params(model)
    dense_flops = flops_per_token(model, config.evaluation.seq_len)
    names = _target_names(model, config.targets)
    if not names:
        raise UserError(f"targets {config.targets!r} selects no linear of this model")
    dense_linear_params = sum(model.get_submodule(n).weight.numel() for n in names)
    calib = data_mod.calibration_windows(tok, config.calibration)
    method = get_method(config.method)

    fisher = None
    t0 = time.perf_counter()
    if "fisher" in method.needs:
        rep.log("estimating Fisher information", "whiten")
        fisher = collect_fisher(model, calib.ids[: config.fisher_samples], names, device)
    t_fisher = time.perf_counter() - t0
    rank_fn, allocation_info = _rank_fn(config, model, calib.ids, device, rep, fisher)

    update = config.recover.type == "update" or config.recover.update
    fdt = calibration_dtype(config, device)
    cache, cache_off = None, {"status": "off", "reason": "stats_cache is false"}
    if config.stats_cache and not Path(source).exists():
        cache_off["reason"] = "the model is not a local folder or file: its revision cannot be keyed"
    elif config.stats_cache:
        cache = StatsCache(models_cache_dir(), stats_key(config, source if gguf_file is None else
                                                         str(Path(source) / gguf_file), calib.ids,
                                                         method.needs - {"fisher"}, fdt, device, update),
                           int(os.environ.get("SVDFORGE_STATS_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES)))
    rep.stage_started("svd")
    res = compress_layers(model, calib.ids, method, rank_fn, targets=config.targets,
                          mode=config.calibration_mode, batch_size=config.calibration_batch_size,
                          device=device, fisher=fisher, reporter=rep,
                          method_options={"alpha": config.asvd_alpha},
                          forward_dtype=fdt, update=update,
                          layer_io=job.layers if job else None,
                          activations=job.store if job else _activation_store(config, device),
                          stats_cache=cache)
    del fisher
    rep.stage_finished("whiten", res.timings["calibrate"] + t_fisher)
    rep.stage_finished("svd", res.timings["decompose"])

    recover_report = None
    t0 = time.perf_counter()
    if config.recover.type != "none":
        from core.recover import recover  # noqa: PLC0415

        rep.stage_started("recover")
        recover_report = recover(model, tok, config, calib, device, rep, calibration=res)
        rep.stage_finished("recover")
    t_recover = time.perf_counter() - t0

    compressed_params = count_params(model)
    compressed_linear_params = sum(e["params"] for e in res.ranks.values())
    report: dict = {
        "model": config.model,
        "source": source,
        "architecture": type(model).__name__,
        "method": config.method,
        "target_ratio": config.ratio,
        "allocation": config.allocation,
        "targets": config.targets,
        "calibration_mode": config.calibration_mode,
        "recover": recover_report or {"type": "none"},
        "calibration": calib.spec,
        "config": config.to_dict(),
        "device": device,
        "dtype": config.dtype,
        "params": {
            "dense": dense_params,
            "compressed": compressed_params,
            "reduction": 1 - compressed_params / dense_params,
            "linears_dense": dense_linear_params,
            "linears_compressed": compressed_linear_params,
            "linears_reduction": 1 - compressed_linear_params / dense_linear_params,
            "linears_kept_dense": sorted(n for n, e in res.ranks.items() if e["rank"] is None),
        },
        "flops_per_token": {"dense": dense_flops,
                            "compressed": flops_per_token(model, config.evaluation.seq_len),
                            "context": config.evaluation.seq_len},
        "shared_inputs": res.shared_inputs,
        "streaming": job.report(stream_reason) if job else {"enabled": False, "reason": stream_reason},
        "calibration_cache": cache.report() if cache else cache_off,
        "whitening_paths": _count_paths(res.ranks),
        "ranks": res.ranks,
    }
    if allocation_info:
        report["allocation_info"] = allocation_info

    if out is not None:
        rep.stage_started("save")
        if job:
            job.save(tok)
        else:
            save_model(model, tok, out)
        rep.stage_finished("save")
        report["bytes"] = {"dense": dense_params * torch.finfo(model.dtype).bits // 8,
                           "compressed": _safetensors_bytes(out)}
    report["timings_s"] = {"load": t_load, "calibrate": res.timings["calibrate"] + t_fisher,
                           "decompose": res.timings["decompose"], "recover": t_recover,
                           "total": time.perf_counter() - t_start}
    if out is not None and on_saved is not None:
        on_saved(out, json.loads(json.dumps(report, default=str)))
    return _evaluate_and_finish(config, out, report, model, tok, job, tmp_out, device, rep, t_start)


def _resumed(config: CompressConfig, out: Path, saved: dict, device: str, rep: Reporter):
    """The state `compress` had right after saving, rebuilt from out_dir and the saved report."""
    from core.lowrank import apply_ranks  # noqa: PLC0415

    report = json.loads(json.dumps(saved))
    ranks = {name: e["rank"] for name, e in report["ranks"].items()}
    rep.log(f"resumed from a checkpoint: {', '.join(RESUMED_STAGES)} already done", "evaluate")
    report["resumed"] = {"skipped_stages": list(RESUMED_STAGES),
                         "checkpoint_timings_s": report.get("timings_s", {})}
    if (report.get("streaming") or {}).get("enabled"):
        source, _ = resolve_source(config.model, config.allow_pickle)
        job = streaming.StreamingJob(config, source, device, out)
        apply_ranks(job.model, ranks)  # the skeleton is on the meta device: no memory taken
        return report, None, load_tokenizer(source, trust_remote_code=config.trust_remote_code), job
    from core.artifact import load_weights  # noqa: PLC0415

    return report, load_weights(out, ranks, device), None, None


def _evaluate_and_finish(config: CompressConfig, out: Path | None, report: dict, model, tok, job, tmp_out,
                         device: str, rep: Reporter, t_start: float) -> dict:
    """Evaluate (in memory, or streamed), then write report.json and the manifest."""
    t_eval = 0.0
    if config.evaluation.enabled:
        rep.check_cancel()
        t0 = time.perf_counter()
        if job:
            if out is None:
                job.save(tok)
            report.update(evaluate_streaming(job, tok, config.evaluation, rep))
        else:
            teacher, teacher_tok, _ = load_model(config.model, config.dtype, device, config.allow_pickle,
                                                 config.trust_remote_code)
            report.update(evaluate_models(teacher, model, tok if tok is not None else teacher_tok,
                                          config.evaluation, device, rep))
            del teacher
        t_eval = time.perf_counter() - t0
    if tmp_out is not None:
        tmp_out.cleanup()

    before = report.pop("timings_s", {})
    report["timings_s"] = {k: before.get(k, 0.0) for k in ("load", "calibrate", "decompose", "recover")}
    report["timings_s"].update(evaluate=t_eval, total=time.perf_counter() - t_start)
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["versions"] = package_versions()
    report["threads"] = torch.get_num_threads()
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        write_manifest(out, {k: report[k] for k in (
            "model", "source", "architecture", "method", "target_ratio", "allocation", "targets",
            "calibration_mode", "calibration", "recover", "params", "versions", "ranks")}
            | {"metrics": report.get("metrics")})
    return report


def _activation_store(config: CompressConfig, device: str):
    """In memory, the activations stay tensors on the device unless a budget is given."""
    if config.max_activation_bytes is None:
        return None
    return streaming.ActivationStore(device, config.max_activation_bytes, os.environ.get("SVDFORGE_TMP"))


def evaluate_streaming(job, tokenizer, ev: EvalConfig, rep: Reporter) -> dict:
    """`evaluate_models` for a streamed model: perplexity and fidelity layer by layer
    (`core.streaming.stream_compare`). Throughput and zero-shot need the whole model on
    the device and are skipped with that reason."""
    rep.stage_started("evaluate")
    t0 = time.perf_counter()
    win = data_mod.evaluation_windows(tokenizer, ev.data, ev.seq_len, ev.max_tokens)
    metrics = streaming.stream_compare(job, win.ids, ev.batch_size,
                                       on_batch=lambda f: rep.progress("evaluate", f, "perplexity / fidelity"))
    why = "streaming: the whole model is never in memory at once"
    out = {"metrics": metrics, "evaluation": win.spec | {"scored_tokens": metrics["compressed"]["tokens"],
                                                         "streamed": True}}
    if ev.throughput:
        out["throughput"] = {"skipped": True, "reason": why}
    out["zero_shot"] = {"skipped": True, "tasks": ev.zero_shot, "reason": why} if ev.zero_shot else \
        {"skipped": True, "reason": "no zero-shot tasks requested"}
    rep.stage_finished("evaluate", time.perf_counter() - t0)
    rep.metrics("evaluate", metrics)
    return out


def _count_paths(ranks: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in ranks.values():
        key = e.get("path") or "dense"
        out[key] = out.get(key, 0) + 1
    return out


def evaluate_artifact(path: str | Path, evaluation: EvalConfig | None = None, teacher_model: str | None = None,
                      device: str = "auto", progress=None) -> dict:
    """Re-evaluate an artifact against its dense teacher (the manifest's model unless given)."""
    from core.artifact import load_artifact  # noqa: PLC0415

    rep = Reporter(progress)
    device = pick_device(device)
    manifest = read_manifest(path)
    ev = evaluation or EvalConfig()
    t0 = time.perf_counter()
    student, tok = load_artifact(path, device=device)
    teacher = None
    name = teacher_model or manifest.get("model")
    if name:
        teacher, _, _ = load_model(name, "float32", device)
    report = {"artifact": str(path), "model": name, "method": manifest.get("method"),
              "target_ratio": manifest.get("target_ratio"), "params": manifest.get("params")}
    report.update(evaluate_models(teacher, student, tok, ev, device, rep))
    report["timings_s"] = {"evaluate": time.perf_counter() - t0}
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def default_threads() -> None:
    """Use every core the process may run on unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
