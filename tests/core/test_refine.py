"""Layer-local refinement (core.refine): each compressed layer trained towards the dense layer's outputs."""
from __future__ import annotations

import pytest
import torch

from svdforge.core.artifact import _state_dict_from_safetensors, load_artifact
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig, RecoverConfig
from svdforge.core.decompose import compress_layers, uniform_ranks
from svdforge.core.errors import UserError
from svdforge.core.methods import get_method
from svdforge.core.models import load_model
from svdforge.core.pipeline import compress
from svdforge.core.refine import Refine, trainable
from svdforge.core.stats_cache import StatsCache


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 500, (12, 32), generator=torch.Generator().manual_seed(0))


def _compress(path, ids, refine=None, mode="sequential"):
    model, _, _ = load_model(str(path))
    res = compress_layers(model, ids, get_method("svd-llm"), uniform_ranks(0.4), batch_size=4, mode=mode,
                          refine=refine)
    return model, res


@torch.no_grad()
def _output_error(model, dense, ids) -> float:
    """Relative error of the last decoder layer's output (the final hidden states) against the dense model."""
    a = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    b = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float((a - b).pow(2).sum() / a.pow(2).sum())


def test_refine_reduces_the_layer_output_error(tiny_llama, ids):
    dense, _, _ = load_model(str(tiny_llama))
    plain, _ = _compress(tiny_llama, ids)
    refined, res = _compress(tiny_llama, ids, Refine(3, 1e-3))
    assert _output_error(refined, dense, ids) < 0.9 * _output_error(plain, dense, ids)
    layers = res.refine["layers"]
    assert [e["layer"] for e in layers] == [0, 1] and all(e["error_after"] < e["error_before"] for e in layers)
    assert all(len(e["pass_losses"]) == 3 and e["seconds"] > 0 for e in layers)
    assert res.timings["refine"] == pytest.approx(sum(e["seconds"] for e in layers))
    # shapes and module types are those of the unrefined compression; only the factors (not the norms) moved
    p_sd, r_sd = plain.state_dict(), refined.state_dict()
    assert {k: v.shape for k, v in p_sd.items()} == {k: v.shape for k, v in r_sd.items()}
    assert all(torch.equal(p_sd[k], r_sd[k]) for k in p_sd if "norm" in k)
    assert not torch.equal(p_sd["model.layers.1.mlp.down_proj.u.weight"], r_sd["model.layers.1.mlp.down_proj.u.weight"])
    assert all(not p.requires_grad or p.grad is None for p in refined.parameters())


def test_refine_is_seeded_and_can_train_the_norms(tiny_llama, ids):
    a, _ = _compress(tiny_llama, ids, Refine(2, 1e-3, seed=1))
    b, _ = _compress(tiny_llama, ids, Refine(2, 1e-3, seed=1))
    c, res = _compress(tiny_llama, ids, Refine(2, 1e-3, seed=2, norms=True))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)                # same seed: the same bits
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "norm" in k and "layers" in k)
    names = [n for n, _ in trainable(c.model.layers[0], norms=True)]
    assert "input_layernorm.weight" in names and "self_attn.q_proj.v.weight" in names
    assert res.refine["norms"] and res.refine["trainable_params"] > 0


def test_refine_is_refused_where_it_cannot_run(tiny_llama, ids, tmp_path):
    with pytest.raises(UserError, match="sequential"):
        _compress(tiny_llama, ids, Refine(1, 1e-3), mode="parallel")
    model, _, _ = load_model(str(tiny_llama))
    with pytest.raises(UserError, match="statistics cache"):
        compress_layers(model, ids, get_method("svd-llm"), uniform_ranks(0.4), refine=Refine(1, 1e-3),
                        stats_cache=StatsCache(tmp_path, {"k": 1}))
    for bad, match in ((dict(refine_passes=-1), "refine_passes"), (dict(refine_passes=101), "refine_passes"),
                       (dict(refine_passes=1.5), "refine_passes"), (dict(refine_passes=True), "refine_passes"),
                       (dict(refine_lr=0), "refine_lr"), (dict(refine_lr=1), "refine_lr"),
                       (dict(refine_lr="fast"), "refine_lr"), (dict(refine_norms="yes"), "refine_norms")):
        with pytest.raises(UserError, match=match):
            RecoverConfig(**bad)
    with pytest.raises(UserError, match="sequential"):
        CompressConfig(model="m", ratio=0.4, calibration_mode="parallel", recover=RecoverConfig(refine_passes=1))
    for passes, lr in ((0, 1e-3), (2, 0.0)):
        with pytest.raises(UserError, match="refine"):
            Refine(passes, lr)


def _cfg(model, streaming):
    return CompressConfig(model=str(model), ratio=0.4, allocation="uniform",  # streamed = in-memory
                          calibration=DataSpec(samples=8, seq_len=32), calibration_batch_size=4,
                          streaming=streaming, evaluation=EvalConfig(enabled=False),
                          recover=RecoverConfig(type="update", refine_passes=2, refine_lr=1e-3))


def test_refine_streams_reports_and_keeps_the_artifact_format(tiny_llama, tmp_path):
    events: list[dict] = []
    mem = compress(_cfg(tiny_llama, "off"), tmp_path / "mem", progress=events.append)
    st = compress(_cfg(tiny_llama, "on"), tmp_path / "st")
    assert st["streaming"]["enabled"] and not mem["streaming"]["enabled"]
    a, b = (_state_dict_from_safetensors(tmp_path / d) for d in ("mem", "st"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    for r in (mem, st):   # report.json: per-layer and total seconds, next to the other timings
        assert r["timings_s"]["refine"] == pytest.approx(r["refine"]["seconds"]) and r["refine"]["seconds"] > 0
        assert [e["layer"] for e in r["refine"]["layers"]] == [0, 1]
        assert r["calibration_cache"]["status"] == "off" and "refine" in r["calibration_cache"]["reason"]
    assert mem["post_save_check"]["passed"]
    lines = [e["message"] for e in events if e["type"] == "progress" and "refine_pass" in e]
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        f"layer {i}/2 refine pass {k}/2 loss" for i in (1, 2) for k in (1, 2)]
    model, _ = load_artifact(tmp_path / "mem", verify=True)   # the format every artifact has
    assert sum(p.numel() for p in model.parameters()) == mem["params"]["compressed"]
