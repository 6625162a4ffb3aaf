"""Global rank allocation from the whitened spectra (core.allocation)."""
from __future__ import annotations

import pytest
import torch

from svdforge.core.allocation import allocate, global_ranks, params_of, uniform_cost
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.decompose import compress_layers
from svdforge.core.errors import UserError
from svdforge.core.linalg import saves_params
from svdforge.core.methods import get_method
from svdforge.core.models import load_model
from svdforge.core.testing import make_tiny_model


def _spectra(seed=0, count=12):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        m, n = [int(x) for x in torch.randint(8, 64, (2,), generator=g)]
        decay = float(torch.rand((), generator=g)) * 0.5
        scale = float(torch.rand((), generator=g) * 100)
        sigma = torch.exp(-decay * torch.arange(min(m, n), dtype=torch.float64)) * scale
        out[f"l{i}"] = (m, n, sigma)
    return out


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_and_no_useless_ranks(ratio, seed):
    spectra = _spectra(seed)
    shapes = {k: (m, n) for k, (m, n, _) in spectra.items()}
    budget = sum(uniform_cost(m, n, ratio) for m, n in shapes.values())
    ranks = allocate(spectra, budget)
    used = params_of(ranks, shapes)
    assert used <= budget
    assert used >= budget - max(m + n for m, n in shapes.values())   # nothing left that a rank could buy
    for name, k in ranks.items():
        m, n = shapes[name]
        assert k is None or saves_params(m, n, k), (name, k, m, n)


def test_flat_important_spectrum_stays_dense_and_is_charged_in_full():
    flat = torch.ones(16, dtype=torch.float64)                 # every direction matters
    steep = torch.tensor([10.0 ** -i for i in range(16)], dtype=torch.float64)
    spectra = {"flat": (16, 16, flat), "steep": (16, 16, steep)}
    budget = 2 * uniform_cost(16, 16, 0.2)                     # uniform: rank 6 each
    ranks = allocate(spectra, budget)
    assert ranks["flat"] is None and ranks["steep"] < 6
    assert params_of(ranks, {"flat": (16, 16), "steep": (16, 16)}) == 256 + 32 * ranks["steep"]


def test_allocation_is_scale_invariant_per_linear():
    spectra = _spectra(3)
    budget = sum(uniform_cost(m, n, 0.4) for m, n, _ in spectra.values())
    scaled = {k: (m, n, s * (1000.0 if i % 2 else 1e-3)) for i, (k, (m, n, s)) in enumerate(spectra.items())}
    assert allocate(spectra, budget) == allocate(scaled, budget)


def test_more_energy_in_the_tail_gets_more_rank():
    slow = torch.exp(-0.05 * torch.arange(32, dtype=torch.float64))
    fast = torch.exp(-1.0 * torch.arange(32, dtype=torch.float64))
    ranks = allocate({"slow": (32, 32, slow), "fast": (32, 32, fast)}, 2 * uniform_cost(32, 32, 0.5))
    assert ranks["slow"] > ranks["fast"] >= 1


def test_budget_too_small_is_a_user_error():
    with pytest.raises(UserError, match="budget"):
        allocate(_spectra(0), 10)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", intermediate=192)


def test_global_ranks_on_a_model_matches_uniform_params(tiny_path):
    model, _, _ = load_model(str(tiny_path))
    ids = torch.randint(1, 500, (8, 40), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(model=str(tiny_path), ratio=0.4, allocation="global")
    rank_fn, info = global_ranks(model, ids, cfg, "cpu")
    assert abs(info["allocated_params"] - info["uniform_params"]) <= 0.005 * info["uniform_params"]
    assert len(info["ranks"]) == 14 and set(info["ranks"]) == set(info["uniform_ranks"])
    assert len(set(info["ranks"].values())) > 2          # not uniform in disguise
    res = compress_layers(model, ids, get_method("svd-llm"), rank_fn)
    for name, e in res.ranks.items():
        assert e["rank"] == info["ranks"][name]
        m, n = e["shape"]
        assert e["rank"] is None or saves_params(m, n, e["rank"])


def test_pipeline_global_vs_uniform_params(tiny_path):
    from svdforge.core.pipeline import compress

    reports = {}
    for alloc in ("uniform", "global"):
        cfg = CompressConfig(model=str(tiny_path), ratio=0.3, allocation=alloc,
                             calibration=DataSpec(samples=4, seq_len=32),
                             evaluation=EvalConfig(enabled=False))
        reports[alloc] = compress(cfg)
    u, g = reports["uniform"]["params"], reports["global"]["params"]
    assert abs(g["linears_compressed"] - u["linears_compressed"]) <= 0.005 * u["linears_compressed"]
    info = reports["global"]["allocation_info"]
    assert info["ranks"] and "by_kind" in info
    assert {n: e["rank"] for n, e in reports["global"]["ranks"].items()} == info["ranks"]


def test_reference_normalisation_ignores_a_dominant_head():
    """A linear whose first singular value owns nearly all the energy (massive activations)
    is starved to rank 1 by total-energy normalisation, not by the tail at the reference."""
    g = torch.Generator().manual_seed(5)
    tail = torch.sort(torch.rand(32, generator=g, dtype=torch.float64), descending=True).values
    spiky = tail.clone()
    spiky[0] = 1e4
    plain = torch.exp(-0.1 * torch.arange(32, dtype=torch.float64))
    spectra = {"spiky": (32, 32, spiky), "plain": (32, 32, plain)}
    budget = 2 * uniform_cost(32, 32, 0.5)
    assert allocate(spectra, budget)["spiky"] == 1
    ranks = allocate(spectra, budget, reference={"spiky": 8, "plain": 8})
    assert ranks["spiky"] > 4


def test_global_keeps_each_kinds_budget(tiny_path):
    model, _, _ = load_model(str(tiny_path))
    ids = torch.randint(1, 500, (8, 40), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(model=str(tiny_path), ratio=0.4, allocation="global")
    _, info = global_ranks(model, ids, cfg, "cpu")
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in info["ranks"]}
    for kind in {n.rsplit(".", 1)[-1] for n in shapes}:
        names = [n for n in shapes if n.endswith("." + kind)]
        got = params_of({n: info["ranks"][n] for n in names}, shapes)
        cap = sum(uniform_cost(*shapes[n], 0.4) for n in names)
        assert got <= cap, kind
