"""A quality budget instead of a ratio (`compress_to_target`): the largest ratio that meets it.

A `QualityTarget` bounds one metric of the compressed model against the dense one on the
job's evaluation data: `max_ppl_ratio` (compressed PPL / dense PPL) or `max_teacher_kl`
(mean KL(dense || compressed) per token). The search reuses ONE calibration, as a sweep
does (`svdforge.core.sweeps`): the model is loaded once and stays dense (it is every
probe's source and the evaluation teacher), the calibration statistics (and the Fisher
information, the allocation spectra) are computed once, and every linear's decomposition
(`method.prepare`) is computed once and kept (`svdforge.core.decompose.Decompositions`);
each probed ratio only truncates it, builds the compressed copy and evaluates it
(perplexity and Teacher-KL on the job's evaluation windows, the same windows for every
probe).

Search over [ratio_min, ratio_max]: probe ratio_min (if it misses, the job fails with
`TargetUnmet`: no artifact is written), then ratio_max (if it meets, it is chosen), then
bisect the bracket (largest ratio known to meet, smallest known to miss) until it is
narrower than `tolerance` or `max_probes` ratios were evaluated. The metrics grow with the
ratio nearly monotonically; where they do not, bisection still returns a probed ratio that
meets the target (the largest one probed), and the report shows every probe.

The output is ONE artifact, the chosen ratio's, in `out_dir` itself: the same files as
`compress` at that ratio in parallel mode (its weights equal to 1e-5 on the logits), whose
report.json gains `target`: the bound, every probe with its metrics, the chosen ratio and
why. Cost: one load, one calibration and decomposition, and one evaluation (teacher and
student forwards over the evaluation windows) per probe, plus the chosen ratio's full
evaluation (throughput, samples). Needs what a sweep needs (parallel calibration, no
closed-form update, no streaming), evaluation enabled, and no LoRA/AdaLoRA recovery (a
probe is not trained).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from svdforge.core import data as data_mod
from svdforge.core.allocation import needs_spectra, rank_plan
from svdforge.core.artifact import check_saved, package_versions, save_model
from svdforge.core.config import CompressConfig, QualityTarget
from svdforge.core.decompose import CalibrationResult, Decompositions, compress_layers, uniform_ranks
from svdforge.core.errors import TargetUnmet, UserError
from svdforge.core.evaluate import compare
from svdforge.core.memory import peak_rss_bytes
from svdforge.core.pipeline import (
    Loaded,
    Run,
    activation_store,
    calibration_dtype,
    check_inputs,
    estimate_fisher,
    evaluate_models,
    load,
    plan_passes,
    safetensors_bytes,
    start,
    stats_cache,
)
from svdforge.core.report import compressed_report, count_paths, write_report_and_manifest
from svdforge.core.sweeps import _refuse as _refuse_sweep
from svdforge.core.sweeps import _student


def as_target(target) -> QualityTarget:
    """A `QualityTarget` from itself or its dict (unknown keys refused with the field named)."""
    if isinstance(target, QualityTarget):
        return target
    if not isinstance(target, dict):
        raise UserError(f"target must be an object such as {{\"max_ppl_ratio\": 1.5}}, got {target!r}")
    unknown = set(target) - {f.name for f in dataclasses.fields(QualityTarget)}
    if unknown:
        raise UserError(f"target: unknown field(s): {', '.join(sorted(unknown))}")
    return QualityTarget(**target)


def _refuse(config: CompressConfig) -> None:
    _refuse_sweep(config)
    if config.recover.type in ("lora", "adalora"):
        raise UserError(f"a targeted job evaluates every probed ratio without training, so it cannot use "
                        f"recovery {config.recover.type!r}; use recover 'none', or give a ratio")
    if not config.evaluation.enabled:
        raise UserError("a targeted job measures every probed ratio on the evaluation data: evaluation "
                        "must be enabled")


@dataclasses.dataclass
class Shared:
    """What every probe reuses: the decompositions, the ratio -> rank function map, the timings."""

    store: Decompositions
    plan: object            # ratio -> (rank function, report entries of allocation / rounding)
    res: CalibrationResult
    t_calibrate: float
    cache_report: dict


def _calibrate(run: Run, loaded: Loaded) -> Shared:
    """The `whiten` and `svd` stages, once: statistics and every linear's decomposition."""
    config, rep = run.config, run.rep
    rep.stage_started("whiten")
    t0 = time.perf_counter()
    fisher, _ = estimate_fisher(run, loaded, " (once for every probed ratio)")
    fdt = calibration_dtype(config, run.device)
    spectra, scores, cached = plan_passes(run, loaded, fisher, fdt) if needs_spectra(config) else (None, None, None)
    t_pre = time.perf_counter() - t0

    def plan(r: float):
        if spectra is None:
            return uniform_ranks(r), {}
        fn, info, rounding = rank_plan(spectra, config, r, t_pre, scores)
        return fn, {k: v for k, v in (("allocation_info", info), ("rank_rounding", rounding)) if v} | \
            {"plan_cache": cached}

    cache, cache_off = stats_cache(config, loaded, fdt, run.device, False)
    store = Decompositions()
    rep.stage_started("svd")
    res = compress_layers(loaded.model, loaded.calib.ids, loaded.method, None, targets=config.targets,
                          mode="parallel", batch_size=config.calibration_batch_size, device=run.device,
                          fisher=fisher, reporter=rep, forward_dtype=fdt,
                          activations=activation_store(config, run.device), stats_cache=cache, keep=store)
    t_calibrate = res.timings["calibrate"] + t_pre
    rep.stage_finished("whiten", t_calibrate)
    rep.stage_finished("svd", res.timings["decompose"])
    return Shared(store, plan, res, t_calibrate, cache.report() if cache else cache_off)


def _metric_value(metrics: dict, metric: str) -> float:
    c, d = metrics["compressed"], metrics["dense"]
    return c["ppl"] / d["ppl"] if metric == "ppl_ratio" else c["teacher_kl"]


def _probe(run: Run, loaded: Loaded, shared: Shared, windows: torch.Tensor, target: QualityTarget,
           r: float, n: int) -> dict:
    """Truncate at ratio `r`, build the compressed copy, evaluate it; the curve's entry."""
    run.rep.check_cancel()
    t0 = time.perf_counter()
    rank_fn, _ = shared.plan(r)
    student = _student(loaded.model, shared.store.truncate(rank_fn).modules)
    ev = run.config.evaluation
    metrics = compare(loaded.model, student, windows, ev.batch_size, run.device, check_cancel=run.rep.check_cancel)
    del student
    metric, bound = target.metric
    value = _metric_value(metrics, metric)
    c = metrics["compressed"]
    entry = {"ratio": r, "ppl_ratio": c["ppl"] / metrics["dense"]["ppl"], "teacher_kl": c["teacher_kl"],
             "ppl": c["ppl"], "dense_ppl": metrics["dense"]["ppl"], "top10_recall": c["top10_recall"],
             "meets": bool(math.isfinite(value) and value <= bound), "seconds": time.perf_counter() - t0}
    run.rep.log(f"probe {n}: ratio {r:g}: {metric} {value:.4g} "
                f"{'<=' if entry['meets'] else '>'} {bound:g}", "evaluate")
    run.rep.progress("evaluate", min(n / target.max_probes, 1.0), f"probe {n}: ratio {r:g}")
    return entry


def search(run: Run, loaded: Loaded, shared: Shared, windows: torch.Tensor, target: QualityTarget) -> dict:
    """Bracket and bisect the ratio; returns the report's `target` section (without the final metrics)."""
    metric, bound = target.metric
    probes: list[dict] = []

    def probe(r: float) -> bool:
        probes.append(_probe(run, loaded, shared, windows, target, round(r, 4), len(probes) + 1))
        return probes[-1]["meets"]

    lo, hi = target.ratio_min, target.ratio_max
    if not probe(lo):
        p = probes[0]
        raise TargetUnmet(f"target {metric} <= {bound:g} is not met even at the smallest ratio {lo:g} "
                          f"({metric} {p[metric]:.4g}); lower target ratio_min or loosen the bound")
    if probe(hi):
        return _section(target, probes, hi, None, f"the largest ratio of the range, {hi:g}, meets the target")
    good, bad = lo, hi
    while bad - good > target.tolerance and len(probes) < target.max_probes:
        mid = round((good + bad) / 2, 4)
        if probe(mid):
            good = mid
        else:
            bad = mid
    why = (f"the bracket is narrower than the tolerance {target.tolerance:g}" if bad - good <= target.tolerance
           else f"max_probes ({target.max_probes}) reached")
    return _section(target, probes, good, [good, bad], f"the largest probed ratio meeting {metric} <= {bound:g}: "
                    f"{good:g} meets it, {bad:g} does not; {why}")


def _section(target: QualityTarget, probes: list[dict], chosen: float, bracket, reason: str) -> dict:
    metric, bound = target.metric
    return {"metric": metric, "max": bound, "request": dataclasses.asdict(target),
            "range": [target.ratio_min, target.ratio_max], "probes": probes,
            "curve": sorted(({"ratio": p["ratio"], metric: p[metric], "meets": p["meets"]} for p in probes),
                            key=lambda e: e["ratio"]),
            "chosen": chosen, "bracket": bracket, "reason": reason, "probe_count": len(probes),
            "probe_s": sum(p["seconds"] for p in probes)}


def compress_to_target(config: CompressConfig, target, out_dir: str | Path | None = None, progress=None,
                       should_cancel=None) -> dict:
    """Compress at the largest ratio that meets `target` (a `QualityTarget` or its dict); returns
    the chosen ratio's report, with `target` (see the module doc). `config.ratio` is ignored."""
    target = as_target(target)
    _refuse(config)
    run = start(config, out_dir, progress, should_cancel)
    check_inputs(run)
    loaded = load(run, sweep=True)
    shared = _calibrate(run, loaded)
    ev = config.evaluation
    windows = data_mod.evaluation_windows(loaded.tok, ev.data, ev.seq_len, ev.max_tokens).ids
    run.rep.stage_started("evaluate", "probing ratios")
    section = search(run, loaded, shared, windows, target)
    run.rep.stage_finished("evaluate", section["probe_s"])
    return _finish(run, loaded, shared, section)


def _finish(run: Run, loaded: Loaded, shared: Shared, section: dict) -> dict:
    """The chosen ratio: its artifact in run.out and its fully evaluated report, as `compress` writes them."""
    r = section["chosen"]
    cfg = dataclasses.replace(run.config, ratio=r)
    rank_fn, plan_info = shared.plan(r)
    chosen = shared.store.truncate(rank_fn)
    student = _student(loaded.model, chosen.modules)
    chosen.modules.clear()
    report = compressed_report(cfg, loaded.source, student, run.device, loaded.calib, chosen.result, None,
                               loaded.dense)
    report["streaming"] = {"enabled": False, "reason": loaded.stream_reason}
    report["calibration_cache"] = shared.cache_report
    report["whitening_paths"] = count_paths(chosen.result.ranks)
    report["ranks"] = chosen.result.ranks
    report.update(plan_info)
    if loaded.allocation_choice:
        report["allocation_choice"] = loaded.allocation_choice
    t_save = 0.0
    if run.out is not None:
        run.rep.stage_started("save")
        t0 = time.perf_counter()
        save_model(student, loaded.tok, run.out)
        report["post_save_check"] = check_saved(run.out, student, loaded.calib.ids[:1, :16], run.device)
        t_save = time.perf_counter() - t0
        run.rep.stage_finished("save")
        report["bytes"] = {"dense": loaded.dense[0] * torch.finfo(loaded.model.dtype).bits // 8,
                           "compressed": safetensors_bytes(run.out)}
    t0 = time.perf_counter()
    report.update(evaluate_models(loaded.model, student, loaded.tok, cfg.evaluation, run.device, run.rep))
    section["final"] = {"ppl_ratio": _metric_value(report["metrics"], "ppl_ratio"),
                        "teacher_kl": report["metrics"]["compressed"]["teacher_kl"],
                        "meets": _metric_value(report["metrics"], section["metric"]) <= section["max"]}
    report["target"] = section
    report["timings_s"] = {"load": loaded.t_load, "calibrate": shared.t_calibrate,
                           "decompose": shared.res.timings["decompose"] + chosen.result.timings["decompose"],
                           "recover": 0.0, "probe": section["probe_s"], "save": t_save,
                           "evaluate": time.perf_counter() - t0, "total": time.perf_counter() - run.t_start}
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["versions"] = package_versions()
    report["threads"] = torch.get_num_threads()
    if run.out is not None:
        write_report_and_manifest(run.out, report)
    return report
