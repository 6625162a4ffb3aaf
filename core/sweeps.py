"""Several ratios of one compression from one calibration (`sweep`).

What is done once and shared by every ratio: loading the model (it stays dense in memory:
every ratio's compressed model is built from it, and it is the evaluation and distillation
teacher), tokenizing the calibration windows, the calibration forward passes and their
per-layer statistics (and the Fisher information for `fwsvd`, the spectra pass for
`allocation="global"`), and for every linear the method's decomposition of its scaled weight
(for svd-llm: the whitening of its input Gram and the eigendecomposition of `W S`, which do
not depend on the rank): each ratio only truncates it at its own rank (the layer loop with
`svdforge.core.decompose.SweepDecompose`). The statistics come from the stats cache when it
holds them (the same key as a single-ratio parallel job). Memory: the dense model, every
ratio's factors (sum of (1 - r) of the compressed linears' weights) and one compressed copy
at a time.

Then, per ratio: the compressed model (a copy of the dense one with that ratio's factors),
LoRA/AdaLoRA recovery if asked, its own artifact folder `out_dir/ratio-0.40/`
(model.safetensors, svdforge.json with every sha256, report.json: the same as a single-ratio
job's), and its evaluation against the dense model.

Mode. Shared statistics are exact only in `calibration_mode="parallel"` (every layer
calibrated on the dense model's activations); in `sequential` mode layer l's statistics
depend on the ratio of the layers before it, so a sweep refuses it (run one `compress` per
ratio instead), and likewise the closed-form update (`recover.type="update"` or
`recover.update`, defined on sequential activations) and streaming (a sweep holds the dense
model in memory). Each ratio's artifact equals `compress` of the same config at that ratio in
parallel mode (tested to 1e-5 on the logits). `config.ratio` is ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from svdforge.core.allocation import needs_spectra, rank_plan
from svdforge.core.artifact import check_saved, package_versions, save_model
from svdforge.core.config import CompressConfig, check_ratios
from svdforge.core.decompose import CalibrationResult, SweepTarget, compress_layers, uniform_ranks
from svdforge.core.errors import UserError
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
from svdforge.core.recover import recover
from svdforge.core.report import compressed_report, count_paths, sweep_report, write_report_and_manifest


def ratio_dirs(ratios: list[float]) -> list[str]:
    """Folder names of a sweep's artifacts: `ratio-0.40`, with more decimals only if needed."""
    for digits in (2, 3, 4):
        names = [f"ratio-{r:.{digits}f}" for r in ratios]
        if len(set(names)) == len(names):
            return names
    raise UserError(f"ratios must be distinct to 4 decimals, got {ratios}")


def _refuse(config: CompressConfig) -> None:
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


def _rank_fns(run: Run, loaded: Loaded, ratios: list[float], fisher, fdt, t0: float):
    """Every ratio's rank function and report entries (`allocation_info`, `rank_rounding`): global
    allocation and rank rounding from one spectra pass for every ratio."""
    config = run.config
    if not needs_spectra(config):
        return [uniform_ranks(r) for r in ratios], [{} for _ in ratios]
    spectra, scores, cached = plan_passes(run, loaded, fisher, fdt)
    t_spectra = time.perf_counter() - t0
    plans = [rank_plan(spectra, config, r, t_spectra, scores) for r in ratios]
    return [p[0] for p in plans], [{k: v for k, v in (("allocation_info", p[1]), ("rank_rounding", p[2])) if v}
                                   | {"plan_cache": cached} for p in plans]


def _shared_calibration(run: Run, loaded: Loaded, ratios: list[float]):
    """The `whiten` and `svd` stages, once: (targets, allocation infos, result, calibrate time, cache report)."""
    config, rep = run.config, run.rep
    rep.stage_started("whiten")
    t0 = time.perf_counter()
    fisher, _ = estimate_fisher(run, loaded, " (once for every ratio)")
    fdt = calibration_dtype(config, run.device)
    rank_fns, plan_infos = _rank_fns(run, loaded, ratios, fisher, fdt, t0)
    t_pre = time.perf_counter() - t0   # Fisher information and global spectra: once for every ratio
    cache, cache_off = stats_cache(config, loaded, fdt, run.device, False)
    targets = [SweepTarget(fn) for fn in rank_fns]
    rep.stage_started("svd")
    res = compress_layers(loaded.model, loaded.calib.ids, loaded.method, None, targets=config.targets,
                          mode="parallel", batch_size=config.calibration_batch_size, device=run.device,
                          fisher=fisher, reporter=rep, forward_dtype=fdt,
                          activations=activation_store(config, run.device), stats_cache=cache, sweep=targets)
    t_calibrate = res.timings["calibrate"] + t_pre
    rep.stage_finished("whiten", t_calibrate)
    rep.stage_finished("svd", res.timings["decompose"])
    return targets, plan_infos, res, t_calibrate, cache.report() if cache else cache_off


def _student(dense, modules: dict):
    """A copy of `dense` with `modules` (by full name) in place of their linears. The copy's
    memo maps each replaced linear to its new module, so the dense weights of the compressed
    linears are never copied; everything else (embeddings, norms, head) is."""
    memo = {id(dense.get_submodule(name)): mod for name, mod in modules.items()}
    return copy.deepcopy(dense, memo)


def _recover_ratio(run: Run, loaded: Loaded, cfg: CompressConfig, student, r: float, t_ratio: dict):
    if cfg.recover.type == "none":
        return None
    t0 = time.perf_counter()
    run.rep.stage_started("recover", f"ratio {r:g}")
    torch.manual_seed(run.config.seed)
    report = recover(student, loaded.tok, cfg, loaded.calib, run.device, run.rep, teacher=loaded.model)
    run.rep.stage_finished("recover")
    t_ratio["recover"] = time.perf_counter() - t0
    return report


def _ratio_report(run: Run, loaded: Loaded, cfg: CompressConfig, student, target: SweepTarget,
                  recover_report, plan_info, index: int, ratios: list[float]) -> dict:
    report = compressed_report(cfg, loaded.source, student, run.device, loaded.calib, target.result,
                               recover_report, loaded.dense)
    report["whitening_paths"] = count_paths(target.result.ranks)
    report["ranks"] = target.result.ranks
    report.update(plan_info)
    report["sweep_of"] = {"ratios": ratios, "index": index}
    return report


def _one_ratio(run: Run, loaded: Loaded, ratios: list[float], index: int, target: SweepTarget,
               plan_info, name: str) -> dict:
    """Build, recover, save and evaluate ratio `index`; returns its entry of the sweep report."""
    r = ratios[index]
    cfg = dataclasses.replace(run.config, ratio=r)
    run.rep.check_cancel()
    run.rep.log(f"ratio {r:g} ({index + 1}/{len(ratios)}): {name}", "svd")
    t_ratio = {"decompose": target.result.timings["decompose"], "recover": 0.0, "save": 0.0, "evaluate": 0.0}
    student = _student(loaded.model, target.modules)
    target.modules.clear()
    recover_report = _recover_ratio(run, loaded, cfg, student, r, t_ratio)
    report = _ratio_report(run, loaded, cfg, student, target, recover_report, plan_info, index, ratios)
    if loaded.allocation_choice:
        report["allocation_choice"] = loaded.allocation_choice
    folder = run.out / name if run.out is not None else None
    if folder is not None:
        run.rep.stage_started("save", f"ratio {r:g}")
        t0 = time.perf_counter()
        save_model(student, loaded.tok, folder)
        report["post_save_check"] = check_saved(folder, student, loaded.calib.ids[:1, :16], run.device)
        t_ratio["save"] = time.perf_counter() - t0
        run.rep.stage_finished("save")
        report["bytes"] = {"dense": loaded.dense[0] * torch.finfo(loaded.model.dtype).bits // 8,
                           "compressed": safetensors_bytes(folder)}
    if run.config.evaluation.enabled:
        run.rep.check_cancel()
        t0 = time.perf_counter()
        report.update(evaluate_models(loaded.model, student, loaded.tok, run.config.evaluation, run.device, run.rep))
        t_ratio["evaluate"] = time.perf_counter() - t0
    report["timings_s"] = t_ratio
    report["versions"] = package_versions()
    if folder is not None:
        write_report_and_manifest(folder, report)
    return {"ratio": r, "artifact": name, **{k: v for k, v in report.items()
                                             if k not in ("config", "sweep_of", "versions")}}


def sweep(config: CompressConfig, ratios, out_dir: str | Path | None = None, progress=None,
          should_cancel=None, figures: bool = True) -> dict:
    """Compress one model at several ratios from one calibration; returns the sweep report
    (see the module doc for what is shared and what is per ratio).

    out_dir gets `report.json` (the sweep report: `sweep.ratios[i]` per ratio, and
    `sweep.time_s`: time spent vs. an estimate of what independent jobs would spend, from
    the times measured here) and, with `figures`, `ppl_vs_ratio.png` plus each ratio's
    `ranks.png` / `metrics.png` (`svdforge.core.figures`).
    """
    ratios = check_ratios(ratios)
    _refuse(config)
    run = start(config, out_dir, progress, should_cancel)
    check_inputs(run)
    names_out = ratio_dirs(ratios)
    loaded = load(run, sweep=True)
    targets, plan_infos, res, t_calibrate, cache_report = _shared_calibration(run, loaded, ratios)
    entries = [_one_ratio(run, loaded, ratios, i, targets[i], plan_infos[i], names_out[i])
               for i in range(len(ratios))]
    return _finish(run, loaded, ratios, res, entries, t_calibrate, cache_report, figures)


def _finish(run: Run, loaded: Loaded, ratios: list[float], res: CalibrationResult, entries: list[dict],
            t_calibrate: float, cache_report: dict, figures: bool) -> dict:
    report = sweep_report(run.config, ratios, loaded.source, run.device, loaded.calib, res, entries,
                          loaded.t_load, t_calibrate, cache_report)
    report["timings_s"]["total"] = time.perf_counter() - run.t_start
    if loaded.allocation_choice:
        report["allocation_choice"] = loaded.allocation_choice
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["versions"] = package_versions()
    report["threads"] = torch.get_num_threads()
    if run.out is not None:
        if figures:
            from svdforge.core.figures import render_figures

            report["figures"] = render_figures(report, run.out)
        (run.out / "report.json").write_text(json.dumps(report, indent=2))
    return report
