"""Sweeps (`svdforge.core.sweeps.sweep`): several ratios from one calibration.

What is pinned: the calibration forward passes run once for all ratios (counted), every
linear is decomposed once and truncated per ratio (counted), each ratio's artifact equals
a single-ratio parallel-mode `compress` of the same ratio (logits to 1e-5), the report has
per-ratio metrics, times and the PPL-vs-ratio figure, and what cannot be shared is refused.
"""
import dataclasses
import json

import pytest
import torch
from transformers.models.llama import modeling_llama

from svdforge.core import pipeline
from svdforge.core import sweeps as sweep_mod
from svdforge.core.artifact import load_artifact
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig, RecoverConfig, SweepConfig, check_ratios
from svdforge.core.errors import UserError
from svdforge.core.methods import svd_llm

PNG = b"\x89PNG\r\n\x1a\n"
CALIB = DataSpec(split="calibration", samples=6, seq_len=32)
NO_EVAL = EvalConfig(enabled=False, seq_len=32)
SMALL_EVAL = EvalConfig(seq_len=32, max_tokens=256, throughput=False)


def config(model, **kw) -> CompressConfig:
    # uniform unless a test names another: the counts of decompositions below are uniform's (loss-aware
    # ranks add the spectra pass's own; tests/core/test_sensitivity.py covers them)
    base = dict(model=str(model), ratio=0.5, allocation="uniform", calibration=CALIB, calibration_mode="parallel",
                calibration_batch_size=2, evaluation=NO_EVAL, stats_cache=False)
    return CompressConfig(**(base | kw))


@pytest.fixture
def layer_forwards(monkeypatch):
    """How many times a Llama decoder layer ran (every calibration forward is one)."""
    calls = {"n": 0}
    forward = modeling_llama.LlamaDecoderLayer.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counting)

    def uncounted(check):  # the post-save check's forwards are not calibration
        def run(*args, **kwargs):
            n = calls["n"]
            out = check(*args, **kwargs)
            calls["n"] = n
            return out
        return run

    monkeypatch.setattr(pipeline, "check_saved", uncounted(pipeline.check_saved))
    monkeypatch.setattr(sweep_mod, "check_saved", uncounted(sweep_mod.check_saved))
    return calls


def _logits(path, ids):
    model, _ = load_artifact(path, verify=True)
    with torch.no_grad():
        return model(ids).logits


def test_statistics_are_computed_once_for_every_ratio(tiny_llama, tmp_path, layer_forwards, monkeypatch):
    single_cfg = config(tiny_llama, ratio=0.4)
    pipeline.compress(single_cfg, tmp_path / "single")
    one_job = layer_forwards["n"]
    assert one_job > 0

    prepared = []
    prepare = svd_llm.SVDLLM.prepare

    def counting_prepare(self, W, stats, fisher):
        prepared.append(W.shape)
        return prepare(self, W, stats, fisher)

    monkeypatch.setattr(svd_llm.SVDLLM, "prepare", counting_prepare)
    layer_forwards["n"] = 0
    report = sweep_mod.sweep(config(tiny_llama), [0.2, 0.4, 0.6], tmp_path / "sweep")
    # one calibration: exactly the decoder-layer forwards of ONE single-ratio job, not three
    assert layer_forwards["n"] == one_job
    # one decomposition (whitening + eigh of W S) per linear, truncated at three ranks
    n_linears = len(report["sweep"]["ratios"][0]["ranks"])
    assert len(prepared) == n_linears
    assert report["calibration_mode"] == "parallel"
    t = report["sweep"]["time_s"]
    assert t["spent"]["calibrate"] == pytest.approx(report["timings_s"]["calibrate"])
    assert t["independent_estimate"]["calibrate"] == pytest.approx(3 * t["spent"]["calibrate"])
    assert t["saved"]["calibrate_decompose"] > 0 and 0 < t["ratio_calibrate_decompose"] < 1


@pytest.mark.parametrize(("method", "allocation"), [("svd-llm", "uniform"), ("svd-llm", "global"),
                                                    ("fwsvd", "uniform")])
def test_each_ratio_equals_a_single_ratio_parallel_job(tiny_llama, tmp_path, method, allocation):
    cfg = config(tiny_llama, method=method, allocation=allocation,
                 method_options={"samples": 2} if method == "fwsvd" else {})
    ratios = [0.3, 0.6]
    report = sweep_mod.sweep(cfg, ratios, tmp_path / "sweep", figures=False)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    for r, entry in zip(ratios, report["sweep"]["ratios"]):
        single = pipeline.compress(dataclasses.replace(cfg, ratio=r), tmp_path / f"single-{r}")
        assert entry["ratio"] == r and entry["artifact"] == f"ratio-{r:.2f}"
        assert {n: e["rank"] for n, e in entry["ranks"].items()} == {n: e["rank"] for n, e in single["ranks"].items()}
        assert entry["params"] == single["params"]
        diff = (_logits(tmp_path / "sweep" / entry["artifact"], ids) - _logits(tmp_path / f"single-{r}", ids)).abs()
        assert float(diff.max()) < 1e-5
        if allocation == "global":
            assert entry["allocation_info"]["ranks"] == single["allocation_info"]["ranks"]


def test_sweep_report_artifacts_and_figure(tiny_llama, tmp_path):
    out = tmp_path / "sweep"
    report = sweep_mod.sweep(config(tiny_llama, evaluation=SMALL_EVAL), [0.6, 0.2, 0.4], out)
    assert report["target_ratios"] == [0.2, 0.4, 0.6]        # sorted
    entries = report["sweep"]["ratios"]
    assert [e["ratio"] for e in entries] == [0.2, 0.4, 0.6]
    reductions = [e["params"]["reduction"] for e in entries]
    assert reductions == sorted(reductions) and reductions[0] > 0
    for e in entries:
        assert e["metrics"]["compressed"]["ppl"] > 1 and e["metrics"]["dense"]["ppl"] > 1
        assert e["metrics"]["compressed"]["teacher_kl"] >= 0
        for key in ("decompose", "save", "evaluate"):
            assert e["timings_s"][key] > 0
        folder = out / e["artifact"]
        per_ratio = json.loads((folder / "report.json").read_text())
        assert per_ratio["target_ratio"] == e["ratio"] and per_ratio["calibration_mode"] == "parallel"
        assert per_ratio["metrics"] == e["metrics"]
        manifest = json.loads((folder / "svdforge.json").read_text())
        assert "model.safetensors" in manifest["files"] and manifest["target_ratio"] == e["ratio"]
        assert "samples.md" in manifest["files"] and per_ratio["samples"] == e["samples"]
        load_artifact(folder, verify=True)                   # every sha256 checks out
        assert (folder / "ranks.png").read_bytes().startswith(PNG)
    # the teacher was the in-memory dense model: one dense PPL for all ratios
    assert len({e["metrics"]["dense"]["ppl"] for e in entries}) == 1
    assert len({tuple(i["dense"] for i in e["samples"]["items"]) for e in entries}) == 1
    assert report["figures"]["ppl_vs_ratio"] == "ppl_vs_ratio.png"
    png = (out / "ppl_vs_ratio.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 5000
    assert json.loads((out / "report.json").read_text())["sweep"]["time_s"] == report["sweep"]["time_s"]
    assert set(report["timings_s"]) >= {"load", "calibrate", "decompose", "evaluate", "total"}


def test_the_sweep_statistics_are_the_single_jobs_cache_entry(tiny_llama, tmp_path):
    cfg = config(tiny_llama, stats_cache=True, calibration=dataclasses.replace(CALIB, seed=7))
    report = sweep_mod.sweep(cfg, [0.3, 0.5], tmp_path / "sweep", figures=False)
    assert report["calibration_cache"]["status"] == "stored"
    single = pipeline.compress(dataclasses.replace(cfg, ratio=0.4), tmp_path / "single")
    assert single["calibration_cache"] == {**report["calibration_cache"], "status": "hit"}


def test_lora_recovery_runs_per_ratio(tiny_llama, tmp_path):
    rc = RecoverConfig(type="lora", rank=2, max_steps=2, batch_size=2,
                       data=DataSpec(split="calibration", samples=4, seq_len=32, seed=1))
    report = sweep_mod.sweep(config(tiny_llama, recover=rc), [0.3, 0.5], tmp_path / "sweep", figures=False)
    for e in report["sweep"]["ratios"]:
        assert e["recover"]["type"] == "lora" and e["recover"]["optimizer_steps"] == 2
        assert e["timings_s"]["recover"] > 0
        model, _ = load_artifact(tmp_path / "sweep" / e["artifact"])
        assert sum(p.numel() for p in model.parameters()) == e["params"]["compressed"]


@pytest.mark.parametrize(("kw", "needle"), [
    ({"calibration_mode": "sequential"}, "parallel"),
    ({"recover": RecoverConfig(type="update")}, "closed-form update"),
    ({"streaming": "on"}, "stream"),
])
def test_what_a_sweep_cannot_share_is_refused(tiny_llama, tmp_path, kw, needle):
    with pytest.raises(UserError, match=needle):
        sweep_mod.sweep(config(tiny_llama, **kw), [0.2, 0.4], tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("ratios", "needle"), [
    ([0.4], "2 to 8"), ([0.1 * i for i in range(1, 10)] + [0.05], "2 to 8"), ([0.2, 0.2], "distinct"),
    ([0.2, 1.0], r"\(0, 1\)"), ([0.2, "x"], "number"), ("0.2,0.5", None),
])
def test_check_ratios(ratios, needle):
    if needle is None:
        assert check_ratios(ratios) == [0.2, 0.5]
        assert SweepConfig(CompressConfig(model="m", ratio=0.5), [0.5, 0.2]).ratios == [0.2, 0.5]
        return
    with pytest.raises(UserError, match=needle):
        check_ratios(ratios)


def test_ratio_folders_are_distinct():
    assert sweep_mod.ratio_dirs([0.2, 0.4]) == ["ratio-0.20", "ratio-0.40"]
    assert sweep_mod.ratio_dirs([0.2, 0.205]) == ["ratio-0.200", "ratio-0.205"]
