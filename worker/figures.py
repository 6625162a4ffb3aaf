"""The job's figures: rendered into the artifact folder before upload, linked from the report.

`svdforge.core.figures` draws them; this module decides they are part of a succeeded job. The PNGs
are written next to `model.safetensors`, so they are uploaded, listed and downloaded like
every other artifact, and the job report gets

    "figures": {"ranks": {"name": "ranks.png", "artifact_id": "art_...",
                          "content_url": "/v1/jobs/<job>/artifacts/art_.../content"}, ...}

A figure that cannot be drawn never fails the job: the failure is logged and the report
says so under `figures_error`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from svdforge.persistence.jobs import API_PREFIX

log = logging.getLogger("svdforge.worker")


def render_job_figures(report: dict[str, Any], out_dir: Path) -> tuple[dict[str, str], str | None]:
    """{figure: artifact name} for what was drawn, and the error if drawing failed."""
    try:
        from svdforge.core.figures import render_figures

        return render_figures(report, out_dir), None
    except Exception as e:  # figures are a courtesy: never lose a finished job to them
        log.exception("figures could not be drawn")
        from svdforge.core.figures import FIGURES

        for name in FIGURES:  # a sweep's per-ratio figures are in its artifact folders
            for png in Path(out_dir).rglob(f"{name}.png"):
                png.unlink(missing_ok=True)
        return {}, f"{type(e).__name__}: {e}"


def link_figures(report: dict[str, Any] | None, job_id: str, figures: dict[str, str], error: str | None,
                 uploaded: list) -> dict[str, Any] | None:  # worker.runner.Uploaded
    """The report with a `figures` entry naming each figure's artifact and content URL."""
    if report is None or (not figures and error is None):
        return report
    by_name = {u.name: u for u in uploaded}
    links = {}
    for figure, name in figures.items():
        u = by_name.get(name)
        if u is not None:
            links[figure] = {"name": name, "artifact_id": u.id,
                             "content_url": f"{API_PREFIX}/jobs/{job_id}/artifacts/{u.id}/content"}
    report = {**report, "figures": links}
    if error is not None:
        report["figures_error"] = error
    return report
