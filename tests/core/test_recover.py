"""Recovery: closed-form update, LoRA / AdaLoRA on the factors, merged back (core.recover)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdforge.core.config import CompressConfig, DataSpec, EvalConfig, RecoverConfig
from svdforge.core.decompose import compress_layers, uniform_ranks
from svdforge.core.errors import UserError
from svdforge.core.linalg import gram_sqrt, truncate_right
from svdforge.core.lowrank import LowRankLinear
from svdforge.core.methods import get_method
from svdforge.core.models import load_model
from svdforge.core.recover import (
    adapter_loss,
    attach_adapters,
    least_squares_update,
    merge_adapters,
    optimizer_steps,
    recover_with_adapters,
)
from svdforge.core.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 500, (8, 48), generator=g)


def _compressed(path, ids, update=False, ratio=0.4):
    model, tok, _ = load_model(str(path))
    res = compress_layers(model, ids, get_method("svd-llm"), uniform_ranks(ratio), batch_size=4, update=update)
    return model, res


def _text_ids(path, n=16, L=48, seed=1):
    from svdforge.core.data import calibration_windows

    _, tok, _ = load_model(str(path))
    return calibration_windows(tok, DataSpec(samples=n, seq_len=L, seed=seed)).ids


# ---------------------------------------------------------------- closed-form update

def test_update_is_exact_least_squares():
    torch.manual_seed(0)
    m, n, k, T = 12, 10, 4, 200
    W = torch.randn(m, n, dtype=torch.float64)
    X = torch.randn(n, T, dtype=torch.float64)              # dense inputs
    Xc = X + 0.3 * torch.randn(n, T, dtype=torch.float64)   # compressed-path inputs
    G, C = Xc @ Xc.T, X @ Xc.T
    f = truncate_right(W, gram_sqrt(G).S, k)
    new, info = least_squares_update(W, f.u, f.v, G, C, mix=1.0, ridge=0.0)
    # reference: solve min ||W X - u (v Xc)||_F directly on the data
    ref = torch.linalg.lstsq((f.v @ Xc).T, (W @ X).T).solution.T
    assert torch.allclose(new, ref, atol=1e-8)
    before = torch.linalg.norm(W @ X - f.u @ f.v @ Xc)
    after = torch.linalg.norm(W @ X - new @ f.v @ Xc)
    assert after < before and info["gain"] > 0


def test_update_mix_interpolates_between_the_two_targets():
    """mix = 1 fits the dense output W X; mix = 0 the dense weight on X' (a no-op here); in
    between it is the least-squares fit of the mixed target, computed on the data."""
    torch.manual_seed(2)
    m, n, k, T = 12, 10, 4, 300
    W = torch.randn(m, n, dtype=torch.float64)
    X = torch.randn(n, T, dtype=torch.float64)
    Xc = X + 0.5 * torch.randn(n, T, dtype=torch.float64)
    G, C = Xc @ Xc.T, X @ Xc.T
    f = truncate_right(W, gram_sqrt(G).S, k)
    full, _ = least_squares_update(W, f.u, f.v, G, C, mix=1.0, ridge=0.0)
    none, _ = least_squares_update(W, f.u, f.v, G, C, mix=0.0, ridge=0.0)
    half, info = least_squares_update(W, f.u, f.v, G, C, mix=0.3, ridge=0.0)
    assert torch.allclose(none, f.u, atol=1e-8)
    ref = torch.linalg.lstsq((f.v @ Xc).T, (W @ (0.3 * X + 0.7 * Xc)).T).solution.T
    assert torch.allclose(half, ref, atol=1e-8)
    assert torch.allclose(half, 0.3 * full + 0.7 * none, atol=1e-8)   # linear in the target
    assert info["gain"] > 0
    with pytest.raises(UserError, match="mix"):
        least_squares_update(W, f.u, f.v, G, C, mix=1.5)
    # the ridge only shrinks the correction: none at mix 0, smaller as it grows, exact at 0
    corrections = [float((least_squares_update(W, f.u, f.v, G, C, mix=0.3, ridge=r)[0] - none).norm())
                   for r in (0.0, 0.1, 1.0, 10.0)]
    assert corrections[0] == pytest.approx(float((half - none).norm()))
    assert all(a > b > 0 for a, b in zip(corrections, corrections[1:]))
    assert torch.allclose(least_squares_update(W, f.u, f.v, G, C, mix=0.0, ridge=1.0)[0], f.u, atol=1e-8)
    with pytest.raises(UserError, match="update_mix"):
        RecoverConfig(type="update", update_mix=-0.1)


def test_update_is_a_no_op_when_whitened_on_the_same_inputs():
    """With X = X' the official target is already met by the whitened factors (see docstring)."""
    torch.manual_seed(1)
    W = torch.randn(9, 7, dtype=torch.float64)
    X = torch.randn(7, 100, dtype=torch.float64)
    G = X @ X.T
    f = truncate_right(W, gram_sqrt(G).S, 3)
    new, info = least_squares_update(W, f.u, f.v, G, G)
    assert torch.allclose(new, f.u, atol=1e-8)
    assert abs(info["gain"]) < 1e-10


def test_update_in_layer_loop_changes_only_w_u(tiny_path, tiny_ids):
    """Each compressed linear's W_u is re-fitted (objective never worse), W_v and shapes are kept.
    Whether that lowers held-out perplexity is a benchmark question."""
    plain, _ = _compressed(tiny_path, tiny_ids)
    upd, res = _compressed(tiny_path, tiny_ids, update=True)
    entries = [e for e in res.ranks.values() if e["rank"] is not None]
    assert entries and all("update" in e and e["update"]["gain"] >= -1e-9 for e in entries)
    assert any(e["update"]["gain"] > 1e-4 for e in entries)
    layer0 = [n for n in res.ranks if ".0." in n and n.rsplit(".", 1)[-1] in ("q_proj", "gate_proj")]
    assert all(abs(res.ranks[n]["update"]["gain"]) < 1e-8 for n in layer0)   # X = X': nothing to fix
    changed = 0
    for name, mod in plain.named_modules():
        if isinstance(mod, LowRankLinear):
            other = upd.get_submodule(name)
            assert other.u.weight.shape == mod.u.weight.shape and other.v.weight.shape == mod.v.weight.shape
            if ".0." in name:   # same inputs up to here, so same W_v
                assert torch.allclose(other.v.weight, mod.v.weight, atol=1e-5)
            changed += not torch.allclose(other.u.weight, mod.u.weight, atol=1e-5)
    assert changed > 0
    # on the calibration windows it fits, the output is closer to the dense model's
    dense, _, _ = load_model(str(tiny_path))
    with torch.no_grad():
        h = dense(input_ids=tiny_ids, output_hidden_states=True).hidden_states[-1]
        e_plain = (plain(input_ids=tiny_ids, output_hidden_states=True).hidden_states[-1] - h).norm()
        e_upd = (upd(input_ids=tiny_ids, output_hidden_states=True).hidden_states[-1] - h).norm()
    assert e_upd < e_plain


def test_update_refuses_parallel_mode(tiny_path, tiny_ids):
    model, _, _ = load_model(str(tiny_path))
    with pytest.raises(UserError, match="sequential"):
        compress_layers(model, tiny_ids, get_method("svd-llm"), uniform_ranks(0.4), mode="parallel", update=True)


# ---------------------------------------------------------------- adapters

def test_merge_keeps_shapes_and_reproduces_adapted_logits(tiny_path, tiny_ids):
    model, _ = _compressed(tiny_path, tiny_ids)
    shapes = {n: (m.in_features, m.rank, m.out_features) for n, m in model.named_modules()
              if isinstance(m, LowRankLinear)}
    n_params = sum(p.numel() for p in model.parameters())
    peft_model = attach_adapters(model, RecoverConfig(type="lora"), total_steps=1)
    with torch.no_grad():  # a non-trivial adapter (B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        adapted = peft_model(input_ids=tiny_ids).logits
    merged = merge_adapters(peft_model, shapes)
    assert merged is model
    with torch.no_grad():
        out = merged(input_ids=tiny_ids).logits
    assert torch.allclose(out, adapted, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in merged.parameters()) == n_params
    for name, (n, k, m) in shapes.items():
        mod = merged.get_submodule(name)
        assert type(mod.u) is nn.Linear and type(mod.v) is nn.Linear
        assert mod.v.weight.shape == (k, n) and mod.u.weight.shape == (m, k)
    assert not any("lora" in k for k in merged.state_dict())


def test_training_loss_decreases_and_is_reproducible(tiny_path, tiny_ids):
    ids = _text_ids(tiny_path)
    rc = RecoverConfig(type="lora", objective="ntp", lr=3e-3, batch_size=4, epochs=8, rank=4, alpha=8)
    runs = []
    for _ in range(2):
        model, _ = _compressed(tiny_path, tiny_ids)
        runs.append(recover_with_adapters(model, ids, rc, "cpu"))
    curve = [loss for _, loss in runs[0]["loss_curve"]]
    assert runs[0]["steps"] == optimizer_steps(16, rc) == 32
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.05
    assert runs[0]["loss_curve"] == runs[1]["loss_curve"]
    assert runs[0]["trainable_params"] > 0


def test_kl_objective_needs_and_uses_the_teacher(tiny_path, tiny_ids):
    ids = _text_ids(tiny_path, n=8)
    teacher, _, _ = load_model(str(tiny_path))
    model, _ = _compressed(tiny_path, tiny_ids)
    rc = RecoverConfig(type="lora", objective="kl", lr=3e-3, batch_size=4, epochs=6)
    with pytest.raises(UserError, match="teacher"):
        recover_with_adapters(copy.deepcopy(model), ids, rc, "cpu")
    out = recover_with_adapters(model, ids, rc, "cpu", teacher=teacher)
    curve = [loss for _, loss in out["loss_curve"]]
    assert set(out["loss_parts_last"]) == {"kl"} and curve[-1] < curve[0]
    # KL of a model with itself is zero
    logits = torch.randn(2, 5, 11)
    loss, parts = adapter_loss(logits, torch.zeros(2, 5, dtype=torch.long), logits, "kl")
    assert abs(parts["kl"]) < 1e-6


def test_adalora_budget_shrinks_to_target(tiny_path, tiny_ids):
    ids = _text_ids(tiny_path)
    model, _ = _compressed(tiny_path, tiny_ids)
    rc = RecoverConfig(type="adalora", objective="ntp", lr=5e-3, batch_size=2, epochs=2, max_steps=12,
                       init_r=6, target_r=3)
    out = recover_with_adapters(model, ids, rc, "cpu")
    ranks = out["final_ranks"]
    assert len(ranks) == out["adapted_modules"] == 2 * 14
    assert sum(ranks.values()) == out["final_rank_total"] == 3 * len(ranks)
    assert max(ranks.values()) <= 6 and out["steps"] == 12 and out["tfinal"] >= 1
    assert all(type(m.u) is nn.Linear for m in model.modules() if isinstance(m, LowRankLinear))


def test_adalora_needs_a_schedule(tiny_path, tiny_ids):
    model, _ = _compressed(tiny_path, tiny_ids)
    with pytest.raises(UserError, match="AdaLoRA"):
        attach_adapters(model, RecoverConfig(type="adalora"), total_steps=1)


def test_config_validation():
    with pytest.raises(UserError, match="autocast"):
        RecoverConfig(autocast="int8")
    with pytest.raises(UserError, match="objective"):
        RecoverConfig(objective="mse")
    with pytest.raises(UserError, match="update"):
        RecoverConfig(update="yes")
    assert optimizer_steps(10, RecoverConfig(batch_size=4, grad_accum=2, epochs=3)) == 6
    assert optimizer_steps(10, RecoverConfig(batch_size=4, grad_accum=2, epochs=3, max_steps=4)) == 4


@pytest.mark.parametrize("kind", ["lora", "update"])
def test_pipeline_report_and_artifact(tiny_path, tmp_path, kind):
    from svdforge.core.artifact import load_artifact
    from svdforge.core.pipeline import compress

    def cfg(rec):
        return CompressConfig(model=str(tiny_path), ratio=0.4, calibration=DataSpec(samples=4, seq_len=32),
                              recover=rec, evaluation=EvalConfig(seq_len=32, max_tokens=256, throughput=False))

    base = compress(cfg(RecoverConfig()), tmp_path / "base")
    rec = RecoverConfig(type=kind, objective="both", batch_size=2, max_steps=3, data=DataSpec(samples=8, seq_len=32))
    r = compress(cfg(rec), tmp_path / "out")
    assert r["params"]["compressed"] == base["params"]["compressed"]
    assert r["recover"]["type"] == kind
    if kind == "lora":
        assert r["recover"]["trainable_params"] > 0 and len(r["recover"]["loss_curve"]) == 3
        assert r["recover"]["training_s"] > 0 and r["recover"]["data"]["samples"] == 8
    else:
        assert r["recover"]["updated_linears"] == sum(1 for e in r["ranks"].values() if e["rank"])
    student, _ = load_artifact(tmp_path / "out")
    assert sum(p.numel() for p in student.parameters()) == r["params"]["compressed"]
    assert not any("lora" in k for k in student.state_dict())
