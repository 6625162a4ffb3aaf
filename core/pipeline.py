"""The whole job: load -> whiten + svd (layer by layer) -> recover -> evaluate -> save.

`compress(config, out_dir, progress, should_cancel)` is what the CLI, the Python API and
the service worker all call.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from svdforge.core import data as data_mod
from svdforge.core import streaming
from svdforge.core.artifact import package_versions, read_manifest, save_model, write_manifest
from svdforge.core.calibrate import (SweepTarget, collect_fisher, compress_layers, decoder_layers, select_linears,
                            uniform_ranks)
from svdforge.core.config import CompressConfig, EvalConfig, check_ratios
from svdforge.core.errors import UserError
from svdforge.core.evaluate import compare, count_params, flops_per_token, matmul_params, throughput, zero_shot
from svdforge.core.methods import get_method
from svdforge.core.models import cache_dir as models_cache_dir
from svdforge.core.models import load_model, load_tokenizer, own_weights, pick_device, resolve_source
from svdforge.core.progress import Reporter
from svdforge.core.stats_cache import DEFAULT_MAX_BYTES, StatsCache, stats_key


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
    from svdforge.core.allocation import global_ranks  # noqa: PLC0415

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
    cache, cache_off = _stats_cache(config, source, gguf_file, calib.ids, method, fdt, device, update)
    rep.stage_started("svd")
    res = compress_layers(model, calib.ids, method, rank_fn, targets=config.targets,
                          mode=config.calibration_mode, batch_size=config.calibration_batch_size,
                          device=device, fisher=fisher, reporter=rep,
                          method_options={"alpha": config.asvd_alpha},
                          forward_dtype=fdt, update=update, update_mix=config.recover.update_mix,
                          layer_io=job.layers if job else None,
                          activations=job.store if job else _activation_store(config, device),
                          stats_cache=cache)
    del fisher
    rep.stage_finished("whiten", res.timings["calibrate"] + t_fisher)
    rep.stage_finished("svd", res.timings["decompose"])

    recover_report = None
    t0 = time.perf_counter()
    if config.recover.type != "none":
        from svdforge.core.recover import recover  # noqa: PLC0415

        rep.stage_started("recover")
        recover_report = recover(model, tok, config, calib, device, rep, calibration=res)
        rep.stage_finished("recover")
    t_recover = time.perf_counter() - t0

    report = _compressed_report(config, source, model, device, calib, res, recover_report,
                                (dense_params, dense_linear_params, dense_flops))
    report["streaming"] = job.report(stream_reason) if job else {"enabled": False, "reason": stream_reason}
    report["calibration_cache"] = cache.report() if cache else cache_off
    report["whitening_paths"] = _count_paths(res.ranks)
    report["ranks"] = res.ranks
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
    from svdforge.core.lowrank import apply_ranks  # noqa: PLC0415

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
    from svdforge.core.artifact import load_weights  # noqa: PLC0415

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
            own_weights(model)  # the dense checkpoint's memory map goes, the teacher maps it anew
            streaming.trim_heap()  # calibration's freed heap, before the teacher comes in
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
        _write_report_and_manifest(out, report)
    return report


def ratio_dirs(ratios: list[float]) -> list[str]:
    """Folder names of a sweep's artifacts: `ratio-0.40`, with more decimals only if needed."""
    for digits in (2, 3, 4):
        names = [f"ratio-{r:.{digits}f}" for r in ratios]
        if len(set(names)) == len(names):
            return names
    raise UserError(f"ratios must be distinct to 4 decimals, got {ratios}")


def sweep(config: CompressConfig, ratios, out_dir: str | Path | None = None, progress=None,
          should_cancel=None, figures: bool = True) -> dict:
    """Compress one model at several ratios from one calibration; returns the sweep report.

    What is done once and shared by every ratio: loading the model (it stays dense in
    memory: every ratio's compressed model is built from it, and it is the evaluation and
    distillation teacher), tokenizing the calibration windows, the calibration forward
    passes and their per-layer statistics (and the Fisher information for `fwsvd`, the
    spectra pass for `allocation="global"`), and for every linear the method's decomposition
    of its scaled weight (for svd-llm: the whitening of its input Gram and the
    eigendecomposition of `W S`, which do not depend on the rank): each ratio only truncates
    it at its own rank. The statistics come from the stats cache when it holds them (the same
    key as a single-ratio parallel job). Memory: the dense model, every ratio's factors
    (sum of (1 - r) of the compressed linears' weights) and one compressed copy at a time.

    Then, per ratio: the compressed model (a copy of the dense one with that ratio's
    factors), LoRA/AdaLoRA recovery if asked, its own artifact folder `out_dir/ratio-0.40/`
    (model.safetensors, svdforge.json with every sha256, report.json: the same as a
    single-ratio job's), and its evaluation against the dense model.

    Mode. Shared statistics are exact only in `calibration_mode="parallel"` (every layer
    calibrated on the dense model's activations); in `sequential` mode layer l's statistics
    depend on the ratio of the layers before it, so a sweep refuses it (run one `compress`
    per ratio instead), and likewise the closed-form update (`recover.type="update"` or
    `recover.update`, defined on sequential activations) and streaming (a sweep holds the
    dense model in memory). Each ratio's artifact equals `compress` of the same config at
    that ratio in parallel mode (tested to 1e-5 on the logits). `config.ratio` is ignored.

    out_dir gets `report.json` (the sweep report: `sweep.ratios[i]` per ratio, and
    `sweep.time_s`: time spent vs. an estimate of what independent jobs would spend, from
    the times measured here) and, with `figures`, `ppl_vs_ratio.png` plus each ratio's
    `ranks.png` / `metrics.png` (`svdforge.core.figures`).
    """
    ratios = check_ratios(ratios)
    rep = Reporter(progress, should_cancel)
    t_start = time.perf_counter()
    if config.calibration_mode != "parallel":
        raise UserError("a sweep shares one calibration between its ratios, which is exact only with "
                        "calibration_mode 'parallel' (sequential statistics depend on the ratio); "
                        "use parallel mode, or run one compression per ratio")
    if config.recover.type == "update" or config.recover.update:
        raise UserError("the closed-form update needs sequential calibration, which depends on the ratio "
                        "and cannot be shared by a sweep; run one compression per ratio")
    if config.streaming == "on":
        raise UserError("a sweep keeps the dense model in memory (the source of every ratio and the "
                        "evaluation teacher), so it cannot stream; use streaming 'auto' or 'off'")
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty")
    data_mod.check_source(config.calibration)
    if config.evaluation.enabled:
        data_mod.check_source(config.evaluation.data)
    if config.recover.type in ("lora", "adalora"):
        data_mod.check_source(config.recover.data)
    configs = [dataclasses.replace(config, ratio=r) for r in ratios]
    names_out = ratio_dirs(ratios)

    rep.stage_started("whiten", "loading model")
    t0 = time.perf_counter()
    source, gguf_file = resolve_source(config.model, config.allow_pickle)
    stream, stream_reason = streaming.decide(config, source, gguf_file)
    if stream:
        raise UserError(f"this model would have to stream ({stream_reason}), which a sweep cannot do: it keeps "
                        "the dense model in memory; run one compression per ratio")
    model, tok, source = load_model(config.model, config.dtype, device, config.allow_pickle,
                                    config.trust_remote_code)
    t_load = time.perf_counter() - t0
    names = _target_names(model, config.targets)
    if not names:
        raise UserError(f"targets {config.targets!r} selects no linear of this model")
    dense = (count_params(model), sum(model.get_submodule(n).weight.numel() for n in names),
             flops_per_token(model, config.evaluation.seq_len))
    calib = data_mod.calibration_windows(tok, config.calibration)
    method = get_method(config.method)

    t0 = time.perf_counter()
    fisher = None
    if "fisher" in method.needs:
        rep.log("estimating Fisher information (once for every ratio)", "whiten")
        fisher = collect_fisher(model, calib.ids[: config.fisher_samples], names, device)
    fdt = calibration_dtype(config, device)
    allocation_infos: list[dict | None] = [None] * len(ratios)
    if config.allocation == "uniform":
        rank_fns = [uniform_ranks(r) for r in ratios]
    else:
        from svdforge.core.allocation import allocate_ratio, global_spectra  # noqa: PLC0415

        spectra = global_spectra(model, calib.ids, config, device, rep, fisher, fdt)
        t_spectra = time.perf_counter() - t0
        pairs = [allocate_ratio(spectra, r, t_spectra) for r in ratios]
        rank_fns, allocation_infos = [p[0] for p in pairs], [p[1] for p in pairs]
        del spectra
    t_pre = time.perf_counter() - t0   # Fisher information and global spectra: once for every ratio

    cache, cache_off = _stats_cache(config, source, gguf_file, calib.ids, method, fdt, device, False)
    targets = [SweepTarget(fn) for fn in rank_fns]
    rep.stage_started("svd")
    res = compress_layers(model, calib.ids, method, None, targets=config.targets, mode="parallel",
                          batch_size=config.calibration_batch_size, device=device, fisher=fisher, reporter=rep,
                          method_options={"alpha": config.asvd_alpha}, forward_dtype=fdt,
                          activations=_activation_store(config, device), stats_cache=cache, sweep=targets)
    del fisher
    t_calibrate = res.timings["calibrate"] + t_pre
    rep.stage_finished("whiten", t_calibrate)
    rep.stage_finished("svd", res.timings["decompose"])

    entries = []
    for i, (r, cfg, target, name) in enumerate(zip(ratios, configs, targets, names_out)):
        rep.check_cancel()
        rep.log(f"ratio {r:g} ({i + 1}/{len(ratios)}): {name}", "svd")
        t_ratio = {"decompose": target.result.timings["decompose"], "recover": 0.0, "save": 0.0, "evaluate": 0.0}
        student = _student(model, target.modules)
        target.modules.clear()
        recover_report = None
        if cfg.recover.type != "none":
            from svdforge.core.recover import recover  # noqa: PLC0415

            t0 = time.perf_counter()
            rep.stage_started("recover", f"ratio {r:g}")
            torch.manual_seed(config.seed)
            recover_report = recover(student, tok, cfg, calib, device, rep, teacher=model)
            rep.stage_finished("recover")
            t_ratio["recover"] = time.perf_counter() - t0
        report = _compressed_report(cfg, source, student, device, calib, target.result, recover_report, dense)
        report["whitening_paths"] = _count_paths(target.result.ranks)
        report["ranks"] = target.result.ranks
        if allocation_infos[i]:
            report["allocation_info"] = allocation_infos[i]
        report["sweep_of"] = {"ratios": ratios, "index": i}
        folder = out / name if out is not None else None
        if folder is not None:
            rep.stage_started("save", f"ratio {r:g}")
            t0 = time.perf_counter()
            save_model(student, tok, folder)
            t_ratio["save"] = time.perf_counter() - t0
            rep.stage_finished("save")
            report["bytes"] = {"dense": dense[0] * torch.finfo(model.dtype).bits // 8,
                               "compressed": _safetensors_bytes(folder)}
        if config.evaluation.enabled:
            rep.check_cancel()
            t0 = time.perf_counter()
            report.update(evaluate_models(model, student, tok, config.evaluation, device, rep))
            t_ratio["evaluate"] = time.perf_counter() - t0
        del student
        report["timings_s"] = t_ratio
        report["versions"] = package_versions()
        if folder is not None:
            _write_report_and_manifest(folder, report)
        entries.append({"ratio": r, "artifact": name, **{k: v for k, v in report.items()
                                                         if k not in ("config", "sweep_of", "versions")}})
    del model

    out_report = _sweep_report(config, ratios, source, device, calib, res, entries, t_load, t_calibrate,
                               cache.report() if cache else cache_off)
    out_report["timings_s"]["total"] = time.perf_counter() - t_start
    out_report["peak_rss_bytes"] = peak_rss_bytes()
    out_report["versions"] = package_versions()
    out_report["threads"] = torch.get_num_threads()
    if out is not None:
        if figures:
            from svdforge.core.figures import render_figures  # noqa: PLC0415

            out_report["figures"] = render_figures(out_report, out)
        (out / "report.json").write_text(json.dumps(out_report, indent=2))
    return out_report


def _student(dense, modules: dict):
    """A copy of `dense` with `modules` (by full name) in place of their linears. The copy's
    memo maps each replaced linear to its new module, so the dense weights of the compressed
    linears are never copied; everything else (embeddings, norms, head) is."""
    memo = {id(dense.get_submodule(name)): mod for name, mod in modules.items()}
    return copy.deepcopy(dense, memo)


def _sweep_report(config: CompressConfig, ratios: list[float], source: str, device: str, calib, res,
                  entries: list[dict], t_load: float, t_calibrate: float, cache_report: dict) -> dict:
    """The sweep's report, with the time the shared work saved.

    Spent is measured. What independent single-ratio jobs would spend on the same work is an
    estimate from the same measurements: each would load the model (and again its teacher to
    evaluate), calibrate, and decompose every linear (the shared part `decompose_shared` plus
    its own truncation); per-ratio work (truncation, recovery, saving, evaluation) is the same
    either way and appears on both sides."""
    n = len(ratios)
    shared = res.timings["decompose_shared"]
    per_ratio = [e["timings_s"]["decompose"] for e in entries]
    spent_cd = t_calibrate + res.timings["decompose"]
    indep_cd = n * (t_calibrate + shared) + sum(per_ratio)
    teacher_loads = n if config.evaluation.enabled else 0
    rest = sum(e["timings_s"][k] for e in entries for k in ("recover", "save", "evaluate"))
    spent = t_load + spent_cd + rest
    indep = (n + teacher_loads) * t_load + indep_cd + rest
    cfg = config.to_dict()
    cfg["ratio"] = None
    return {
        "model": config.model,
        "source": source,
        "method": config.method,
        "target_ratios": ratios,
        "allocation": config.allocation,
        "targets": config.targets,
        "calibration_mode": "parallel",
        "calibration": calib.spec,
        "config": cfg | {"ratios": ratios},
        "device": device,
        "dtype": config.dtype,
        "calibration_cache": cache_report,
        "shared_inputs": res.shared_inputs,
        "sweep": {
            "ratios": entries,
            "shared": ["model load (and evaluation teacher)", "calibration windows",
                       "calibration statistics (parallel mode: they depend on the dense model only)",
                       "per-linear whitening and eigendecomposition of the scaled weight"]
                      + (["Fisher information"] if "fisher" in get_method(config.method).needs else [])
                      + (["global allocation spectra"] if config.allocation == "global" else []),
            "time_s": {
                "spent": {"load": t_load, "calibrate": t_calibrate, "decompose": res.timings["decompose"],
                          "decompose_shared": shared, "calibrate_decompose": spent_cd, "total": spent},
                "independent_estimate": {"load": (n + teacher_loads) * t_load, "calibrate": n * t_calibrate,
                                         "decompose": n * shared + sum(per_ratio),
                                         "calibrate_decompose": indep_cd, "total": indep},
                "saved": {"calibrate_decompose": indep_cd - spent_cd, "total": indep - spent},
                "ratio_calibrate_decompose": spent_cd / indep_cd if indep_cd > 0 else None,
                "estimate": "independent jobs: each ratio loads the model (and its evaluation teacher), "
                            "calibrates (measured once here) and decomposes (the shared part measured "
                            "here plus its own truncation); recovery, saving and evaluation are per "
                            "ratio on both sides",
            },
        },
        "timings_s": {"load": t_load, "calibrate": t_calibrate, "decompose": res.timings["decompose"],
                      "decompose_shared": shared,
                      "recover": sum(e["timings_s"]["recover"] for e in entries),
                      "save": sum(e["timings_s"]["save"] for e in entries),
                      "evaluate": sum(e["timings_s"]["evaluate"] for e in entries)},
    }


MANIFEST_KEYS = ("model", "source", "architecture", "method", "target_ratio", "allocation", "targets",
                 "calibration_mode", "calibration", "recover", "params", "versions", "ranks")


def _write_report_and_manifest(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_manifest(out, {k: report[k] for k in MANIFEST_KEYS} | {"metrics": report.get("metrics")})


def _stats_cache(config: CompressConfig, source: str, gguf_file: str | None, calib_ids, method, fdt,
                 device: str, update: bool):
    """(StatsCache or None, the report's entry when there is none)."""
    cache_off = {"status": "off", "reason": "stats_cache is false"}
    if config.stats_cache and not Path(source).exists():
        cache_off["reason"] = "the model is not a local folder or file: its revision cannot be keyed"
    elif config.stats_cache:
        return StatsCache(models_cache_dir(), stats_key(config, source if gguf_file is None else
                                                        str(Path(source) / gguf_file), calib_ids,
                                                        method.needs - {"fisher"}, fdt, device, update),
                          int(os.environ.get("SVDFORGE_STATS_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))), None
    return None, cache_off


def _compressed_report(config: CompressConfig, source: str, model, device: str, calib, res,
                       recover_report: dict | None, dense: tuple[int, int, int]) -> dict:
    """The report's description of one compressed model (what, from which data, how big)."""
    dense_params, dense_linear_params, dense_flops = dense
    compressed_params = count_params(model)
    compressed_linear_params = sum(e["params"] for e in res.ranks.values())
    return {
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
    }


def _activation_store(config: CompressConfig, device: str):
    """In memory, the activations stay tensors on the device unless a budget is given."""
    if config.max_activation_bytes is None:
        return None
    return streaming.ActivationStore(device, config.max_activation_bytes, os.environ.get("SVDFORGE_TMP"))


def evaluate_streaming(job, tokenizer, ev: EvalConfig, rep: Reporter) -> dict:
    """`evaluate_models` for a streamed model: perplexity and fidelity layer by layer
    (`svdforge.core.streaming.stream_compare`). Throughput and zero-shot need the whole model on
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
    from svdforge.core.artifact import load_artifact  # noqa: PLC0415

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
