"""Streaming (issue 7): one decoder layer at a time from the shards, same artifact as in memory."""
import json

import pytest
import torch

from svdforge.core.activations import ActivationStore, DiskTensor
from svdforge.core.artifact import _state_dict_from_safetensors, load_artifact
from svdforge.core.checkpoint import ShardWriter, build_skeleton
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig, RecoverConfig
from svdforge.core.errors import UserError
from svdforge.core.layers import decoder_layers
from svdforge.core.models import load_model
from svdforge.core.pipeline import compress
from svdforge.core.streaming import StreamingLayers
from svdforge.core.testing import make_tiny_model


def _cfg(model, **kw):
    # uniform ranks: the tests compare streamed with in-memory jobs, and a streamed job cannot take the
    # default's (auto) loss-aware ranks
    base = dict(model=str(model), ratio=0.4, allocation="uniform", calibration=DataSpec(samples=8, seq_len=32),
                evaluation=EvalConfig(seq_len=32, max_tokens=256, throughput=False), stats_cache=False)
    base.update(kw)
    return CompressConfig(**base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_tensor_round_trip(dtype):
    x = torch.randn(7, 5, 3).to(dtype)
    d = DiskTensor(x.shape, dtype, "cpu")
    d[0:4] = x[0:4]
    d[4:7] = x[4:7]
    assert torch.equal(d[2:6], x[2:6]) and d[2:6].dtype == dtype
    with pytest.raises(ValueError):
        d[0:2] = x[0:3]


def test_activation_store_offloads_past_its_budget():
    store = ActivationStore("cpu", budget_bytes=1000)
    small = store.empty((2, 10, 10), torch.float32)     # 800 bytes: in memory
    big = store.empty((2, 10, 10), torch.float32)       # 1600 in all: on disk
    assert torch.is_tensor(small) and isinstance(big, DiskTensor)
    assert store.report() == {"in_memory_bytes": 800, "on_disk_bytes": 800, "budget_bytes": 1000}
    src = torch.randn(2, 10, 10)
    big[0:2] = src
    assert torch.equal(store.copy(big)[0:2], src)


def test_skeleton_plus_streamed_layers_is_the_model(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    sk, reader, prefix = build_skeleton(str(tiny_llama))
    layers, _ = decoder_layers(sk)
    assert all(p.is_meta for p in layers.parameters())
    assert not any(p.is_meta for n, p in sk.named_parameters() if not n.startswith(prefix + "."))
    io = StreamingLayers(reader, prefix, torch.float32, "cpu")
    for i, layer in enumerate(layers):
        io.load(i, layer)
    ids = torch.randint(0, 500, (2, 16))
    assert torch.equal(sk(input_ids=ids).logits, model(input_ids=ids).logits)
    io.done(0, layers[0])
    assert all(p.is_meta for p in layers[0].parameters())


def test_shard_writer_shards_like_transformers(tmp_path):
    sd = {f"t{i}": torch.randn(100, 100) for i in range(5)}   # 40 kB each
    w = ShardWriter(tmp_path / "a", max_shard_bytes=90_000)
    w.add(sd)
    files = w.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    back = _state_dict_from_safetensors(tmp_path / "a")
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    w1 = ShardWriter(tmp_path / "b")
    w1.add(sd)
    assert [f.name for f in w1.close()] == ["model.safetensors"]


def _logits(path, ids):
    model, _ = load_artifact(path)
    return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_streaming_gives_the_in_memory_artifact(tiny_llama, tmp_path, mode):
    mem = compress(_cfg(tiny_llama, streaming="off", calibration_mode=mode), tmp_path / "mem")
    st = compress(_cfg(tiny_llama, streaming="on", calibration_mode=mode), tmp_path / "st")
    assert st["streaming"]["enabled"] and not mem["streaming"]["enabled"]
    assert st["samples"]["skipped"] and "streaming" in st["samples"]["reason"] and mem["samples"]["items"]
    assert "Skipped: streaming" in (tmp_path / "st" / "samples.md").read_text()
    assert {k: e["rank"] for k, e in st["ranks"].items()} == {k: e["rank"] for k, e in mem["ranks"].items()}
    assert st["params"] == mem["params"]
    ids = torch.randint(0, 500, (2, 24))
    assert (_logits(tmp_path / "st", ids) - _logits(tmp_path / "mem", ids)).abs().max() < 1e-5
    # layer-wise streamed evaluation gives the in-memory metrics
    for who in ("dense", "compressed"):
        assert st["metrics"][who]["ppl"] == pytest.approx(mem["metrics"][who]["ppl"], rel=1e-5)
    assert st["metrics"]["compressed"]["teacher_kl"] == pytest.approx(mem["metrics"]["compressed"]["teacher_kl"],
                                                                     rel=1e-4, abs=1e-7)


def test_streaming_offloads_activations_to_disk(tiny_llama, tmp_path):
    compress(_cfg(tiny_llama, streaming="off", evaluation=EvalConfig(enabled=False)), tmp_path / "mem")
    st = compress(_cfg(tiny_llama, streaming="on", max_activation_bytes=0, evaluation=EvalConfig(enabled=False)),
                  tmp_path / "st")
    act = st["streaming"]["activations"]
    assert act["in_memory_bytes"] == 0 and act["on_disk_bytes"] > 0
    ids = torch.randint(0, 500, (2, 24))
    assert (_logits(tmp_path / "st", ids) - _logits(tmp_path / "mem", ids)).abs().max() < 1e-5


def test_streaming_tied_embeddings_and_many_shards(tmp_path, monkeypatch):
    path = make_tiny_model(tmp_path / "tied", "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    sd = load_file(path / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    mem = compress(_cfg(path, streaming="off", evaluation=EvalConfig(enabled=False)), tmp_path / "mem")
    monkeypatch.setattr("svdforge.core.streaming.MAX_SHARD_BYTES", 100_000)
    st = compress(_cfg(path, streaming="on", evaluation=EvalConfig(enabled=False)), tmp_path / "st")
    assert st["params"] == mem["params"]
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]
    ids = torch.randint(0, 500, (2, 24))
    assert (_logits(tmp_path / "st", ids) - _logits(tmp_path / "mem", ids)).abs().max() < 1e-5


def test_streaming_says_what_needs_the_whole_model(tiny_llama):
    with pytest.raises(UserError, match="whole compressed model"):
        compress(_cfg(tiny_llama, streaming="on", recover=RecoverConfig(type="lora", max_steps=1)))
    with pytest.raises(UserError, match="Fisher"):
        compress(_cfg(tiny_llama, streaming="on", method="fwsvd"))


def test_streaming_auto_stays_in_memory_for_small_models(tiny_llama, tmp_path):
    r = compress(_cfg(tiny_llama, evaluation=EvalConfig(enabled=False)), tmp_path / "a")
    assert r["streaming"]["enabled"] is False and "fits in memory" in r["streaming"]["reason"]


def test_streaming_auto_streams_when_memory_is_short(tiny_llama, tmp_path, monkeypatch):
    import types

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=10_000))
    with pytest.raises(UserError, match="cannot stream: lora recovery"):
        compress(_cfg(tiny_llama, recover=RecoverConfig(type="lora", max_steps=1)))
    monkeypatch.setattr("svdforge.core.streaming.default_activation_budget", lambda device: 0)
    r = compress(_cfg(tiny_llama, evaluation=EvalConfig(enabled=False)), tmp_path / "a")
    assert r["streaming"]["enabled"] and "over 60%" in r["streaming"]["reason"]
    assert r["streaming"]["activations"]["on_disk_bytes"] > 0
