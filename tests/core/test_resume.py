"""Checkpoint and resume (issue 5): `compress(on_saved=...)` hands over the saved artifact
before evaluation; `compress(resume=...)` evaluates it without redoing whiten/svd/recover/save,
and ends with the same weights, the same metrics and a valid manifest."""
import json
import shutil

import pytest

from svdforge.core.artifact import load_artifact, read_manifest, verify_files
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.errors import UserError
from svdforge.core.pipeline import RESUMED_STAGES, compress


def _cfg(model, **kw):
    base = dict(model=str(model), ratio=0.4, calibration=DataSpec(samples=8, seq_len=32),
                evaluation=EvalConfig(seq_len=32, max_tokens=256, throughput=False), stats_cache=False)
    base.update(kw)
    return CompressConfig(**base)


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_resume_skips_to_evaluation_and_matches_a_full_run(tiny_llama, tmp_path, streaming):
    config = _cfg(tiny_llama, streaming=streaming)
    saved = {}

    def on_saved(out, report):
        saved["report"] = report
        saved["files"] = sorted(p.name for p in out.iterdir())
        shutil.copytree(out, tmp_path / "checkpoint")  # what the service uploads

    full = compress(config, tmp_path / "full", on_saved=on_saved)
    json.dumps(saved["report"])  # plain JSON: it goes into a database column
    assert "model.safetensors" in saved["files"] and "config.json" in saved["files"]
    assert "svdforge.json" not in saved["files"] and "metrics" not in saved["report"]

    events = []
    resumed = compress(config, tmp_path / "checkpoint", progress=events.append, resume=saved["report"])
    started = {e["stage"] for e in events if e["type"] == "stage_started"}
    assert started == {"evaluate"}  # nothing before evaluation ran again
    assert resumed["resumed"]["skipped_stages"] == list(RESUMED_STAGES)
    for who in ("dense", "compressed"):
        assert resumed["metrics"][who] == pytest.approx(full["metrics"][who], rel=1e-5), who
    assert resumed["ranks"] == full["ranks"] and resumed["params"] == full["params"]
    manifest = read_manifest(tmp_path / "checkpoint")
    verify_files(tmp_path / "checkpoint", manifest)
    assert manifest["files"]["model.safetensors"] == read_manifest(tmp_path / "full")["files"]["model.safetensors"]
    load_artifact(tmp_path / "checkpoint", verify=True)


def test_resume_needs_the_output_folder(tiny_llama):
    with pytest.raises(UserError, match="output folder"):
        compress(_cfg(tiny_llama), None, resume={"ranks": {}})
