"""PNG figures of a compression report, for people rather than programs.

`render_figures(report, out_dir)` writes what the report has the data for and returns
`{figure: file name}`:

* `ranks.png`: the kept rank of every compressed linear by layer (one line per linear
  kind, e.g. q_proj, down_proj), and below it the whitened energy each one retained;
* `metrics.png`: dense vs compressed perplexity, teacher KL, top-10 recall and ARR (the
  dense model against itself is the reference: KL 0, top-10 1, ARR 100 %);
* `loss.png`: the recovery training loss curve (`report["recover"]["loss_curve"]`,
  `[[step, loss], ...]`), for jobs that trained an adapter;
* for a sweep report (`report["sweep"]["ratios"]`, `svdforge.core.pipeline.sweep`): `ppl_vs_ratio.png`,
  perplexity and teacher KL of every ratio against the dense model, and each ratio's own
  figures above in its artifact folder (`ratio-0.40/ranks.png`, ...).

Matplotlib's object API on the Agg canvas: no pyplot, no display, no global state, so it
is safe in a worker thread. Imports nothing of the service.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

FIGURES = ("ranks", "metrics", "loss", "ppl_vs_ratio")
_LAYER = re.compile(r"\.(\d+)\.")


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})


def _title(report: dict[str, Any]) -> str:
    parts = [str(report.get("model") or "")]
    if report.get("method"):
        parts.append(str(report["method"]))
    if _finite(report.get("target_ratio")) is not None:
        parts.append(f"ratio {float(report['target_ratio']):g}")
    return ", ".join(p for p in parts if p)


def ranks_figure(report: dict[str, Any], path: Path) -> bool:
    """Kept rank and retained energy per linear kind by layer; False when there are no ranks."""
    series: dict[str, list[tuple[int, int, float | None]]] = defaultdict(list)
    dense = 0
    for name, entry in (report.get("ranks") or {}).items():
        if not isinstance(entry, dict):
            continue
        m = _LAYER.search(name)
        if entry.get("rank") is None:
            dense += 1
            continue
        layer = int(m.group(1)) if m else 0
        series[name.rsplit(".", 1)[-1]].append((layer, int(entry["rank"]), _finite(entry.get("retained_energy"))))
    if not series:
        return False
    fig = _new_figure(10, 7)
    ax_rank, ax_energy = fig.subplots(2, 1, sharex=True)
    lowest = 1.0
    for i, kind in enumerate(sorted(series)):
        points = sorted(series[kind])
        layers = [p[0] for p in points]
        # distinct markers and dashes: under uniform allocation several kinds share one rank
        style = {"marker": "os^vDPX*"[i % 8], "ms": 4, "linestyle": ["-", "--", ":", "-."][i % 4], "label": kind}
        ax_rank.plot(layers, [p[1] for p in points], **style)
        energy = [(p[0], p[2]) for p in points if p[2] is not None]
        if energy:
            ax_energy.plot([e[0] for e in energy], [e[1] for e in energy], **style)
            lowest = min(lowest, *(e[1] for e in energy))
    ax_rank.set_ylabel("kept rank k")
    ax_rank.set_title(f"Kept rank per linear by layer ({_title(report)})"
                      + (f"; {dense} linears kept dense" if dense else ""))
    ax_rank.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_rank.grid(alpha=0.3)
    ax_energy.set_ylabel("retained energy")
    ax_energy.set_xlabel("layer")
    ax_energy.set_ylim(max(0.0, lowest - 0.05), 1.005)
    ax_energy.set_title("Whitened spectral energy retained, sum(sigma_i^2, i<=k) / sum(sigma_i^2)")
    ax_energy.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax_energy.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)
    return True


def metrics_figure(report: dict[str, Any], path: Path) -> bool:
    """Dense vs compressed bars; False without both a dense and a compressed perplexity."""
    metrics = report.get("metrics") or {}
    dense, comp = metrics.get("dense") or {}, metrics.get("compressed") or {}
    if _finite(dense.get("ppl")) is None or _finite(comp.get("ppl")) is None:
        return False
    panels = [("Perplexity (lower is better)", _finite(dense.get("ppl")), _finite(comp.get("ppl")), "{:.2f}"),
              ("Teacher KL (nats/token)", 0.0, _finite(comp.get("teacher_kl")), "{:.4f}"),
              ("Top-10 recall", 1.0, _finite(comp.get("top10_recall")), "{:.3f}"),
              ("ARR: top-1 agreement (%)", 100.0, _finite(comp.get("agreement")), "{:.1f}")]
    fig = _new_figure(12, 3.8)
    axes = fig.subplots(1, 4)
    for ax, (label, d, c, fmt) in zip(axes, panels):
        values = [d or 0.0, c if c is not None else 0.0]
        bars = ax.bar(["dense", "compressed"], values, color=["#4c72b0", "#dd8452"])
        for bar, v, shown in zip(bars, values, [d, c]):
            ax.annotate("n/a" if shown is None else fmt.format(v), (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=9)
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(f"Dense vs compressed ({_title(report)})")
    _save(fig, path)
    return True


def loss_figure(report: dict[str, Any], path: Path) -> bool:
    """The recovery loss curve; False when the job trained nothing."""
    recover = report.get("recover") or {}
    curve = [(p[0], _finite(p[1])) for p in (recover.get("loss_curve") or [])
             if isinstance(p, (list, tuple)) and len(p) == 2]
    curve = [(int(s), v) for s, v in curve if v is not None]
    if not curve:
        return False
    fig = _new_figure(8, 4.5)
    ax = fig.subplots()
    ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o" if len(curve) < 40 else None, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Recovery ({recover.get('type', '')}) training loss ({_title(report)})")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def ppl_vs_ratio_figure(report: dict[str, Any], path: Path) -> bool:
    """A sweep's perplexity (and teacher KL) by ratio; False without two measured ratios."""
    points = []
    dense_ppl = None
    for e in (report.get("sweep") or {}).get("ratios") or []:
        if not isinstance(e, dict):
            continue
        metrics = e.get("metrics") or {}
        comp = metrics.get("compressed") or {}
        r, ppl = _finite(e.get("ratio")), _finite(comp.get("ppl"))
        if r is None or ppl is None:
            continue
        points.append((r, ppl, _finite(comp.get("teacher_kl"))))
        dense_ppl = dense_ppl or _finite((metrics.get("dense") or {}).get("ppl"))
    if len(points) < 2:
        return False
    points.sort()
    fig = _new_figure(11, 4.2)
    ax_ppl, ax_kl = fig.subplots(1, 2)
    xs = [p[0] for p in points]
    ax_ppl.plot(xs, [p[1] for p in points], marker="o", label="compressed")
    for x, y, _ in points:
        ax_ppl.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if dense_ppl is not None:
        ax_ppl.axhline(dense_ppl, color="#4c72b0", linestyle="--", label=f"dense ({dense_ppl:.1f})")
    values = [p[1] for p in points] + ([dense_ppl] if dense_ppl is not None else [])
    log = max(values) > 3 * min(values) > 0    # a log axis only where the range asks for one
    if log:
        ax_ppl.set_yscale("log")
    ax_ppl.set_xlabel("ratio (fraction of each compressed linear's parameters removed)")
    ax_ppl.set_ylabel("perplexity" + (" (log scale" if log else " (") + ", lower is better)")
    ax_ppl.set_title("Perplexity by ratio")
    ax_ppl.legend(fontsize=8)
    ax_ppl.grid(alpha=0.3, which="both")
    kl = [(p[0], p[2]) for p in points if p[2] is not None]
    if kl:
        ax_kl.plot([k[0] for k in kl], [k[1] for k in kl], marker="s", color="#dd8452")
    ax_kl.set_xlabel("ratio")
    ax_kl.set_ylabel("teacher KL (nats/token)")
    ax_kl.set_title("KL to the dense model by ratio" if kl else "KL to the dense model: not measured")
    ax_kl.grid(alpha=0.3)
    for ax in (ax_ppl, ax_kl):
        ax.set_xticks(xs)
    fig.suptitle(f"Sweep: {len(points)} ratios from one calibration ({_title(report)}, "
                 f"{report.get('calibration_mode', '')} statistics)")
    _save(fig, path)
    return True


_DRAW = (("ranks", ranks_figure), ("metrics", metrics_figure), ("loss", loss_figure))


def render_figures(report: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write the figures the report has data for into `out_dir`; return {figure: file name}.

    A sweep report also gets `ppl_vs_ratio`, and each ratio's figures go into its artifact
    folder under the keys `<folder>/<figure>` (e.g. `ratio-0.40/ranks`)."""
    out_dir = Path(out_dir)
    written = {}
    for name, draw in _DRAW:
        if draw(report, out_dir / f"{name}.png"):
            written[name] = f"{name}.png"
    sweep = report.get("sweep")
    if isinstance(sweep, dict):
        if ppl_vs_ratio_figure(report, out_dir / "ppl_vs_ratio.png"):
            written["ppl_vs_ratio"] = "ppl_vs_ratio.png"
        for entry in sweep.get("ratios") or []:
            folder = entry.get("artifact") if isinstance(entry, dict) else None
            if not isinstance(folder, str) or not re.fullmatch(r"ratio-[0-9.]+", folder):
                continue
            for name, draw in _DRAW:
                if draw(entry, out_dir / folder / f"{name}.png"):
                    written[f"{folder}/{name}"] = f"{folder}/{name}.png"
    return written
