"""What a run reports: the report of one compressed model, of a sweep, and the manifest."""
from __future__ import annotations

import json
import re
from pathlib import Path

from svdforge.core.artifact import write_manifest
from svdforge.core.config import CompressConfig
from svdforge.core.evaluate import count_params, flops_per_token
from svdforge.core.methods import get_method


def compressed_report(config: CompressConfig, source: str, model, device: str, calib, res,
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
        "rank_multiple": config.rank_multiple,
    }


def count_paths(ranks: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in ranks.values():
        key = e.get("path") or "dense"
        out[key] = out.get(key, 0) + 1
    return out



MANIFEST_KEYS = ("model", "source", "architecture", "method", "target_ratio", "allocation", "targets",
                 "calibration_mode", "calibration", "recover", "params", "versions", "ranks")


def _fenced(text: str) -> list[str]:
    """Text verbatim as a fenced block (its fence longer than any backtick run inside it)."""
    if not text.strip():
        return ["*(no text: the model stopped at once)*"]
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return [fence + "text", text, fence]


def samples_markdown(report: dict) -> str:
    """`samples.md`: the report's greedy completions, one section per prompt, dense then
    compressed, each text verbatim in a fenced block (nothing to escape)."""
    samples = report["samples"]
    lines = ["# Sample completions", "", f"{report.get('model', '?')} at ratio {report.get('target_ratio', '?')}"]
    if samples.get("skipped"):
        return "\n".join(lines + ["", f"Skipped: {samples['reason']}.", ""])
    lines[-1] += (f": greedy, up to {samples['max_new_tokens']} new tokens per completion "
                  "(the text after the prompt).")
    for n, item in enumerate(samples["items"], 1):
        lines += ["", f"## {n}. {item['source']} prompt", "", *_fenced(item["prompt"])]
        for who in ("dense", "compressed"):
            if who in item:
                lines += ["", f"{who}:", "", *_fenced(item[who])]
    return "\n".join(lines + [""])


def write_report_and_manifest(out: Path, report: dict) -> None:
    """report.json, samples.md (when evaluation ran) and, last, the manifest with their sha256."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if "samples" in report:
        (out / "samples.md").write_text(samples_markdown(report), encoding="utf-8")
    write_manifest(out, {k: report[k] for k in MANIFEST_KEYS} | {"metrics": report.get("metrics")})


def _sweep_time(n: int, res, entries: list[dict], t_load: float, t_calibrate: float, teacher_loads: int) -> dict:
    """`sweep.time_s`: spent (measured) vs what independent single-ratio jobs would spend."""
    shared = res.timings["decompose_shared"]
    per_ratio = [e["timings_s"]["decompose"] for e in entries]
    spent_cd = t_calibrate + res.timings["decompose"]
    indep_cd = n * (t_calibrate + shared) + sum(per_ratio)
    rest = sum(e["timings_s"][k] for e in entries for k in ("recover", "save", "evaluate"))
    spent = t_load + spent_cd + rest
    indep = (n + teacher_loads) * t_load + indep_cd + rest
    return {
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
    }


def sweep_report(config: CompressConfig, ratios: list[float], source: str, device: str, calib, res,
                 entries: list[dict], t_load: float, t_calibrate: float, cache_report: dict) -> dict:
    """The sweep's report, with the time the shared work saved.

    Spent is measured. What independent single-ratio jobs would spend on the same work is an
    estimate from the same measurements: each would load the model (and again its teacher to
    evaluate), calibrate, and decompose every linear (the shared part `decompose_shared` plus
    its own truncation); per-ratio work (truncation, recovery, saving, evaluation) is the same
    either way and appears on both sides."""
    cfg = config.to_dict()
    cfg["ratio"] = None
    teacher_loads = len(ratios) if config.evaluation.enabled else 0
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
            "time_s": _sweep_time(len(ratios), res, entries, t_load, t_calibrate, teacher_loads),
        },
        "timings_s": {"load": t_load, "calibrate": t_calibrate, "decompose": res.timings["decompose"],
                      "decompose_shared": res.timings["decompose_shared"],
                      **{k: sum(e["timings_s"][k] for e in entries) for k in ("recover", "save", "evaluate")}},
    }
