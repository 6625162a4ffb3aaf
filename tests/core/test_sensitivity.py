"""Loss-aware allocation: component scores (core.sensitivity) and one whole-model budget (core.allocation)."""
import json
import time

import pytest
import torch

from svdforge.core.allocation import allocate_loss, greedy_ranks, params_of, uniform_cost
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.errors import UserError
from svdforge.core.linalg import LeftTruncation, RightTruncation
from svdforge.core.models import load_model
from svdforge.core.sensitivity import component_gradients, concave, score
from svdforge.core.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", intermediate=192)


def _gram(n, seed):
    x = torch.randn(4 * n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.T @ x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_components_sum_to_the_weight_and_their_prefix_is_the_truncation(shape):
    m, n = shape
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    S = torch.linalg.cholesky(_gram(n, 2))
    for t in (RightTruncation(W, S), LeftTruncation(W, torch.rand(m, dtype=torch.float64) + 0.5)):
        P, Q = t.components()
        assert torch.allclose(P @ Q.T, W, atol=1e-9)
        for k in (1, 7, min(m, n) - 1):
            f = t.factors(k)
            assert torch.allclose(f.u @ f.v, P[:, :k] @ Q[:, :k].T, atol=1e-9)


def test_component_gradients_are_the_directional_derivatives_of_each_windows_loss(tiny_path):
    """g_{s,i} = <dL_s/dW, p_i q_i^T>: the projections equal autograd's weight gradient, window by window."""
    model, _, _ = load_model(str(tiny_path))
    model.float()
    ids = torch.randint(1, 500, (5, 24), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    comps = {}
    for name in names:
        W = model.get_submodule(name).weight.detach().double()
        comps[name] = tuple(c.float() for c in RightTruncation(W, torch.linalg.cholesky(_gram(W.shape[1], 3)))
                            .components())
    got = component_gradients(model, ids, comps)
    for name in names:
        lin = model.get_submodule(name)
        P, Q = comps[name]
        per_window = []
        for s in range(ids.shape[0]):
            model.zero_grad()
            logits = model(input_ids=ids[s:s + 1]).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[s, 1:])
            G, = torch.autograd.grad(loss, lin.weight)
            per_window.append(torch.einsum("mi,mn,ni->i", P, G, Q).double())
        g = torch.stack(per_window)
        assert torch.allclose(got[name]["first"], g.mean(0), rtol=1e-3, atol=1e-7)
        assert torch.allclose(got[name]["fisher"], g.pow(2).mean(0), rtol=1e-3, atol=1e-10)
        assert got[name]["tokens"] == 23
    assert all(p.requires_grad for p in model.parameters())     # restored after the pass


def test_bf16_gradient_pass_scores_within_a_few_percent_of_fp32(tiny_path):
    """The job's calibration dtype runs the pass: bf16 (autocast) moves each linear's scores by ~1%,
    which keeps their order; the model's own weights and dtype are untouched."""
    model, _, _ = load_model(str(tiny_path))
    model.float()
    ids = torch.randint(1, 500, (4, 48), generator=torch.Generator().manual_seed(0))
    comps = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        W = model.get_submodule(name).weight.detach().double()
        comps[name] = tuple(c.float() for c in RightTruncation(W, torch.linalg.cholesky(_gram(W.shape[1], 3)))
                            .components())
    full = component_gradients(model, ids, comps)
    low = component_gradients(model, ids, comps, dtype=torch.bfloat16)
    for name in comps:
        a, b = score(full[name]), score(low[name])
        rel = float((a - b).abs().sum() / a.abs().sum())
        assert 0 < rel < 0.05, (name, rel)          # bf16 did run (not bit-identical), and stays close
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.999
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())


def test_scores_are_nonnegative_loss_estimates():
    g = {"first": torch.tensor([0.5, -0.2, 0.0], dtype=torch.float64),
         "fisher": torch.tensor([0.01, 0.02, 0.0], dtype=torch.float64), "tokens": 10}
    assert score(g, "fisher").tolist() == pytest.approx([0.05, 0.1, 0.0])
    assert score(g, "taylor").tolist() == pytest.approx([0.0, 0.3, 0.0])    # -0.45 clamped at 0
    with pytest.raises(ValueError):
        score(g, "nope")


def test_concave_envelope_is_non_increasing_and_keeps_sums():
    gains = torch.tensor([5.0, 1.0, 3.0, 0.5, 0.5, 2.0], dtype=torch.float64)
    env = concave(gains)
    assert all(a >= b for a, b in zip(env.tolist(), env.tolist()[1:]))
    assert float(env.sum()) == pytest.approx(float(gains.sum()))
    assert env.tolist() == pytest.approx([5.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    assert concave(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)).tolist() == [3.0, 2.0, 1.0]


def test_one_budget_moves_rank_across_kinds_and_may_keep_a_linear_dense():
    """Scores in loss units compare across kinds: the linear whose components cost the loss gets the
    rank (here: dense), the one the loss ignores gets what is left, within uniform's total."""
    sigma = torch.ones(32, dtype=torch.float64)
    spectra = {"a.q_proj": (32, 32, sigma), "a.down_proj": (32, 32, sigma)}
    scores = {"scores": {"a.q_proj": torch.full((32,), 1.0, dtype=torch.float64),
                         "a.down_proj": torch.full((32,), 1e-6, dtype=torch.float64)},
              "kind": "fisher", "windows": 4, "gradient_seconds": 0.0}
    rank_fn, info = allocate_loss(spectra, scores, 0.4)
    # budget 2 x 9 x 64 = 1152: q_proj dense (1024), down_proj the rest (2 x 64)
    assert info["ranks"]["a.q_proj"] is None and info["ranks"]["a.down_proj"] == 2
    assert info["allocated_params"] == info["budget_params"] == 2 * uniform_cost(32, 32, 0.4)
    assert info["kept_dense"] == ["a.q_proj"] and rank_fn("a.down_proj", 32, 32) == 2


def test_greedy_ranks_spends_the_budget_on_the_largest_gains():
    gains = {"x": (16, 16, torch.tensor([4.0, 3, 2, 1] + [0.0] * 12)),
             "y": (16, 16, torch.tensor([4.0, 0.5, 0.5, 0.5] + [0.0] * 12))}
    ranks = greedy_ranks(gains, 5 * 32)
    assert ranks == {"x": 4, "y": 1}
    assert params_of(ranks, {"x": (16, 16), "y": (16, 16)}) == 5 * 32


def test_greedy_ranks_in_blocks_gives_multiples_within_the_budget():
    gains = {"x": (16, 16, torch.tensor([4.0, 3, 2, 1] + [0.0] * 12)),
             "y": (16, 16, torch.tensor([4.0, 0.5, 0.5, 0.5] + [0.0] * 12)),
             "z": (3, 3, torch.ones(3, dtype=torch.float64))}       # no multiple of 2 saves parameters: dense
    ranks = greedy_ranks(gains, 6 * 32 + 9, step=2)
    assert ranks == {"x": 4, "y": 2, "z": None}                     # x's 2 + 1 beats y's 0.5 + 0.5
    with pytest.raises(UserError, match="rank_multiple 4 is too large for this model"):
        greedy_ranks(gains, 6 * 32 + 9, step=4)


def test_loss_ranks_round_to_multiples_where_per_kind_rounding_refuses(tiny_path):
    """The loss plan leaves some kinds below N; rounding each kind in its own budget cannot pay for
    their round-ups, choosing blocks of N under the plan's one budget can."""
    from svdforge.core.pipeline import compress
    from svdforge.core.rounding import round_ranks

    def cfg(**kw):
        return CompressConfig(model=str(tiny_path), ratio=0.2, allocation="loss", stats_cache=False,
                              calibration=DataSpec(samples=6, seq_len=32), evaluation=EvalConfig(enabled=False), **kw)
    plain = compress(cfg())
    spectra = {n: (*e["shape"], torch.ones(min(e["shape"]), dtype=torch.float64)) for n, e in plain["ranks"].items()}
    with pytest.raises(UserError, match="rank_multiple 16 is too large"):
        round_ranks(spectra, {n: e["rank"] for n, e in plain["ranks"].items()}, 16)
    report = compress(cfg(rank_multiple=16))
    ranks = {n: e["rank"] for n, e in report["ranks"].items()}
    assert all(k is None or k % 16 == 0 for k in ranks.values()) and any(k is not None for k in ranks.values())
    rounding = report["rank_rounding"]
    assert rounding["used_params"] == report["params"]["linears_compressed"] <= rounding["budget_params"]
    assert rounding["budget_params"] == plain["allocation_info"]["budget_params"]
    assert rounding["unrounded"] == {n: e["rank"] for n, e in plain["ranks"].items()}


def test_pipeline_loss_allocation_spends_uniforms_parameters(tiny_path, monkeypatch):
    from svdforge.core import allocation
    from svdforge.core.pipeline import calibration_dtype, compress

    real = allocation.component_gradients      # made slow, so that its time must show in `calibrate`
    monkeypatch.setattr(allocation, "component_gradients", lambda *a, **k: time.sleep(0.5) or real(*a, **k))
    reports = {}
    for alloc in ("uniform", "loss"):
        cfg = CompressConfig(model=str(tiny_path), ratio=0.4, allocation=alloc, stats_cache=False,  # passes run
                             calibration=DataSpec(samples=6, seq_len=32), evaluation=EvalConfig(enabled=False))
        reports[alloc] = compress(cfg)
    u, g = reports["uniform"]["params"], reports["loss"]["params"]
    assert g["linears_compressed"] <= u["linears_compressed"]
    assert abs(g["linears_compressed"] - u["linears_compressed"]) <= 0.005 * u["linears_compressed"]
    info = reports["loss"]["allocation_info"]
    assert info["score"] == "fisher" and info["gradient_windows"] == 6 and info["gradient_seconds"] > 0
    # the gradient pass runs in the job's calibration dtype (bf16 where this CPU has bf16 matmuls)
    assert info["gradient_dtype"] == str(calibration_dtype(cfg, "cpu")).removeprefix("torch.")
    assert {n: e["rank"] for n, e in reports["loss"]["ranks"].items()} == info["ranks"]
    assert info["ranks"] != {n: e["rank"] for n, e in reports["uniform"]["ranks"].items()}
    # the allocation's passes (spectra, gradients) are part of the job's calibration time
    assert info["seconds"] >= info["gradient_seconds"] >= 0.5
    assert reports["loss"]["timings_s"]["calibrate"] >= info["seconds"]


def test_loss_allocation_cannot_stream_and_names_its_score(tiny_path):
    from svdforge.core.pipeline import compress

    with pytest.raises(UserError, match="loss-aware allocation back-propagates"):
        compress(CompressConfig(model=str(tiny_path), ratio=0.4, allocation="loss", streaming="on",
                                calibration=DataSpec(samples=2, seq_len=16), evaluation=EvalConfig(enabled=False)))
    with pytest.raises(UserError, match="loss_score"):
        CompressConfig(model=str(tiny_path), ratio=0.4, allocation="loss", loss_score="second")


def test_a_sweep_and_a_targeted_job_score_once_and_plan_every_ratio_with_one_budget(tiny_path, tmp_path,
                                                                                    monkeypatch):
    from svdforge.core import allocation, sensitivity
    from svdforge.core import targets as targets_mod
    from svdforge.core.config import QualityTarget
    from svdforge.core.sweeps import sweep

    calls = []
    real = sensitivity.component_gradients
    monkeypatch.setattr(allocation, "component_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = dict(model=str(tiny_path), ratio=0.4, allocation="loss", calibration=DataSpec(samples=4, seq_len=32),
                calibration_mode="parallel", stats_cache=False,
                evaluation=EvalConfig(seq_len=32, max_tokens=128, throughput=False))
    sweep(CompressConfig(**base), [0.3, 0.5], tmp_path / "s", figures=False)
    assert len(calls) == 1
    for folder in ("ratio-0.30", "ratio-0.50"):
        info = json.loads((tmp_path / "s" / folder / "report.json").read_text())["allocation_info"]
        assert info["score"] == "fisher" and info["allocated_params"] <= info["budget_params"]
    t = targets_mod.compress_to_target(CompressConfig(**base), QualityTarget(max_ppl_ratio=50.0, ratio_max=0.9),
                                       tmp_path / "t")
    assert len(calls) == 2 and t["allocation_info"]["score"] == "fisher" and t["target"]["chosen"] == 0.9


def test_auto_allocation_is_loss_in_memory_and_uniform_when_streaming_or_short_of_memory(tiny_path, monkeypatch):
    """The default (`auto`): loss-aware ranks when the dense model is in memory and the pass fits, uniform
    when the job streams or the pass would not fit; the report says which and why."""
    import collections

    import psutil

    from svdforge.core.allocation import loss_pass_bytes
    from svdforge.core.pipeline import compress

    assert CompressConfig(model=str(tiny_path), ratio=0.4).allocation == "auto"
    base = dict(model=str(tiny_path), ratio=0.4, calibration=DataSpec(samples=4, seq_len=32),
                evaluation=EvalConfig(enabled=False), stats_cache=False)
    r = compress(CompressConfig(**base))
    assert r["allocation"] == "loss" and r["allocation_choice"]["chosen"] == "loss"
    assert r["allocation_choice"]["requested"] == "auto" and r["allocation_info"]["score"] == "fisher"
    assert r["config"]["allocation"] == "loss"

    streamed = compress(CompressConfig(**base, streaming="on"))
    assert streamed["allocation"] == "uniform" and "allocation_info" not in streamed
    assert "streams" in streamed["allocation_choice"]["reason"]

    from svdforge.core.layers import target_names
    model, _, _ = load_model(str(tiny_path))
    need = loss_pass_bytes(model, target_names(model, "all"))
    real = psutil.virtual_memory
    fake = collections.namedtuple("vm", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake(int(need * 1.5), real().total))
    short = compress(CompressConfig(**base, streaming="off"))
    assert short["allocation"] == "uniform" and "would need" in short["allocation_choice"]["reason"]
    explicit = compress(CompressConfig(**base, allocation="uniform"))
    assert "allocation_choice" not in explicit and explicit["allocation"] == "uniform"
