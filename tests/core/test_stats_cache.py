"""Calibration cache (issue 7): a second job on the same model and data skips calibration; any
change to the key (model revision, data, windows, seed, method, mode, ...) misses."""
import dataclasses
import os
import time

import pytest
import torch

import svdforge.core.layer_loop as layer_loop
import svdforge.core.statistics as statistics
from svdforge.core import data as data_mod
from svdforge.core.artifact import load_artifact
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.models import load_tokenizer
from svdforge.core.pipeline import compress
from svdforge.core.stats_cache import key_digest, stats_key


def _cfg(model, **kw):
    # uniform: loss-aware ranks (the default, auto) need the dense passes the cache is meant to skip
    base = dict(model=str(model), ratio=0.4, allocation="uniform", calibration=DataSpec(samples=4, seq_len=32),
                evaluation=EvalConfig(enabled=False))
    base.update(kw)
    return CompressConfig(**base)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _digest(model, cfg, **over):
    cfg = dataclasses.replace(cfg, **over)
    tok = load_tokenizer(str(model))
    ids = data_mod.calibration_windows(tok, cfg.calibration).ids
    return key_digest(stats_key(cfg, str(model), ids, {"gram"}, torch.float32, "cpu", False))


@pytest.mark.parametrize("change", [
    {"calibration": DataSpec(samples=4, seq_len=32, seed=1)},           # seed
    {"calibration": DataSpec(samples=5, seq_len=32)},                   # windows
    {"calibration": DataSpec(samples=4, seq_len=48)},                   # window length
    {"calibration": DataSpec(split="evaluation", samples=4, seq_len=32)},   # data
    {"method": "asvd"},
    {"calibration_mode": "parallel"},
    {"targets": "mlp"},
    {"calibration_batch_size": 2},
    {"ratio": 0.2},                                                     # sequential: depends on it
    {"rank_multiple": 8},                                               # likewise
])
def test_every_key_part_changes_the_key(tiny_llama, change):
    cfg = _cfg(tiny_llama)
    assert _digest(tiny_llama, cfg) == _digest(tiny_llama, cfg)
    assert _digest(tiny_llama, cfg, **change) != _digest(tiny_llama, cfg)


def test_parallel_statistics_do_not_depend_on_the_ratio(tiny_llama):
    cfg = _cfg(tiny_llama, calibration_mode="parallel")
    assert _digest(tiny_llama, cfg, ratio=0.2) == _digest(tiny_llama, cfg)
    assert _digest(tiny_llama, cfg, rank_multiple=8) == _digest(tiny_llama, cfg)


def test_rank_multiple_1_keeps_the_keys_of_earlier_runs(tiny_llama):
    cfg = _cfg(tiny_llama)
    tok = load_tokenizer(str(tiny_llama))
    ids = data_mod.calibration_windows(tok, cfg.calibration).ids
    assert "rank_multiple" not in stats_key(cfg, str(tiny_llama), ids, {"gram"}, torch.float32, "cpu", False)


def test_model_revision_is_part_of_the_key(tiny_models, tmp_path):
    import shutil

    path = shutil.copytree(tiny_models["mistral"], tmp_path / "m")
    cfg = _cfg(path)
    before = _digest(path, cfg)
    w = path / "model.safetensors"
    os.utime(w, ns=(time.time_ns(), time.time_ns() + 10**9))     # weights rewritten
    assert _digest(path, cfg) != before
    before = _digest(path, cfg)
    (path / "config.json").write_text((path / "config.json").read_text() + "\n")
    assert _digest(path, cfg) != before                         # config.json changed


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_second_job_skips_calibration(tiny_llama, tmp_path, cache, monkeypatch, streaming):
    cfg = _cfg(tiny_llama, streaming=streaming)
    first = compress(cfg, tmp_path / "a")
    assert first["calibration_cache"]["status"] == "stored"

    def no_forward(*a, **k):
        raise AssertionError("calibration ran despite a cache hit")

    with monkeypatch.context() as m:   # a hit runs no calibration forward at all
        m.setattr(statistics.StatsCollector, "_accumulate", no_forward)
        m.setattr(layer_loop, "capture_layer0_inputs", no_forward)
        second = compress(cfg, tmp_path / "b")
    assert second["calibration_cache"]["status"] == "hit"
    assert second["calibration_cache"]["key"] == first["calibration_cache"]["key"]
    assert second["ranks"] == first["ranks"]
    ids = torch.randint(0, 500, (2, 16))
    a, _ = load_artifact(tmp_path / "a")
    b, _ = load_artifact(tmp_path / "b")
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    # a changed key part misses (and is stored under its own key)
    third = compress(_cfg(tiny_llama, streaming=streaming, calibration=DataSpec(samples=4, seq_len=32, seed=3)))
    assert third["calibration_cache"]["status"] == "stored"
    assert third["calibration_cache"]["key"] != first["calibration_cache"]["key"]


def test_cache_off_and_size_limit(tiny_llama, cache, monkeypatch):
    r = compress(_cfg(tiny_llama, stats_cache=False))
    assert r["calibration_cache"]["status"] == "off"
    monkeypatch.setenv("SVDFORGE_STATS_CACHE_MAX_BYTES", "1000")
    r = compress(_cfg(tiny_llama, calibration=DataSpec(samples=4, seq_len=32, seed=9)))
    assert r["calibration_cache"]["status"] == "skipped" and "limit" in r["calibration_cache"]["reason"]
    assert not (cache / "stats" / r["calibration_cache"]["key"]).exists()


# --- the rank plan's passes (PlanCache) ---------------------------------------------------

def test_a_loss_plan_is_cached_across_ratios_and_modes(tiny_llama, cache, monkeypatch):
    """The spectra and loss scores depend on the dense model and windows only: a second job at another
    ratio and mode skips both passes and plans the same ranks as a job without any cache."""
    import svdforge.core.allocation as allocation

    first = compress(_cfg(tiny_llama, allocation="loss"))
    assert first["plan_cache"]["status"] == "stored"
    assert (cache / "plans" / f"{first['plan_cache']['key']}.safetensors").is_file()

    def no_pass(*a, **k):
        raise AssertionError("a rank plan pass ran despite a plan cache hit")

    cfg = _cfg(tiny_llama, allocation="loss", ratio=0.2, calibration_mode="parallel")
    with monkeypatch.context() as m:
        m.setattr(allocation, "component_gradients", no_pass)
        m.setattr(allocation, "whitened_spectra", no_pass)
        second = compress(cfg)
    assert second["plan_cache"] == {"status": "hit", "key": first["plan_cache"]["key"]}
    assert second["allocation_info"]["gradient_seconds"] == 0.0
    fresh = compress(dataclasses.replace(cfg, stats_cache=False))
    assert fresh["plan_cache"]["status"] == "off"
    assert second["allocation_info"]["ranks"] == fresh["allocation_info"]["ranks"]
    assert second["ranks"] == fresh["ranks"]
    # another score, another method: other keys
    assert compress(_cfg(tiny_llama, allocation="loss", loss_score="taylor"))["plan_cache"]["status"] == "stored"
    assert compress(_cfg(tiny_llama, allocation="global"))["plan_cache"]["status"] == "stored"


def test_a_damaged_plan_entry_is_recomputed(tiny_llama, cache):
    first = compress(_cfg(tiny_llama, allocation="global"))
    (cache / "plans" / f"{first['plan_cache']['key']}.safetensors").write_bytes(b"not safetensors")
    again = compress(_cfg(tiny_llama, allocation="global"))
    assert again["plan_cache"]["status"] == "stored" and "unreadable" in again["plan_cache"]["reason"]
    assert again["ranks"] == first["ranks"]
    assert compress(_cfg(tiny_llama, allocation="global"))["plan_cache"]["status"] == "hit"
