"""Ranks rounded to multiples of N within the same parameters (core.rounding, `rank_multiple`).

The bound these tests hold the code to: the compressed linears never use more parameters
than at their unrounded ranks (the budget), and what is left unspent is less than one block,
N (m + n), of a linear that could still have grown (so less than N times the largest m + n).
"""
from __future__ import annotations

import pytest
import torch

from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.decompose import compress_layers, uniform_ranks
from svdforge.core.errors import UserError
from svdforge.core.linalg import saves_params
from svdforge.core.methods import get_method
from svdforge.core.models import load_model
from svdforge.core.pipeline import compress
from svdforge.core.rounding import Candidate, candidate, check_layers, cost, rank_cap, round_layer
from svdforge.core.sweeps import sweep


def _cands(seed: int, count: int = 7, ratio: float = 0.4) -> list[Candidate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        m, n = [int(x) for x in torch.randint(16, 96, (2,), generator=g)]
        sigma = torch.exp(-float(torch.rand((), generator=g)) * 0.3 * torch.arange(min(m, n), dtype=torch.float64))
        k = int(m * n * (1 - ratio) / (m + n))
        out.append(candidate(f"l{i}", m, n, k, sigma * float(torch.rand((), generator=g) * 100)))
    return out


def _used(cands, ranks) -> int:
    return sum(cost(c.m, c.n, ranks[c.name]) for c in cands)


@pytest.mark.parametrize("multiple", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_layer_gets_multiples_within_its_budget(seed, multiple):
    cands = _cands(seed)
    budget = sum(cost(c.m, c.n, c.k) for c in cands)
    ranks, left = round_layer(cands, multiple)
    for c in cands:
        r = ranks[c.name]
        assert r is None or (r % multiple == 0 and saves_params(c.m, c.n, r)), (c, r)
    assert left == budget - _used(cands, ranks) >= 0
    growable = [c for c in cands
                if ranks[c.name] is not None and ranks[c.name] + multiple <= rank_cap(c.m, c.n, multiple)]
    assert all(left < multiple * (c.m + c.n) for c in growable)   # no block that fits was left


def test_multiple_1_keeps_the_planned_ranks():
    cands = _cands(4)
    ranks, left = round_layer(cands, 1)
    assert ranks == {c.name: c.k for c in cands} and left == 0


def test_the_block_goes_to_the_linear_rounding_down_hurts_most():
    """Both 64 x 64 at rank 20 go down to 16, which frees one block of 8. Cutting the fast-decaying
    spectrum to 16 multiplies its loss by ~11; the slow one's grows by ~40%: the fast one gets it,
    whatever the scale of either."""
    fast = torch.exp(-0.3 * torch.arange(64, dtype=torch.float64))
    slow = torch.exp(-0.04 * torch.arange(64, dtype=torch.float64))
    for scale in (1.0, 1e-6, 1e6):
        cands = [candidate("slow", 64, 64, 20, slow * 1e3), candidate("fast", 64, 64, 20, fast * scale)]
        ranks, left = round_layer(cands, 8)
        assert ranks == {"fast": 24, "slow": 16} and left == 0


def test_a_rank_below_the_multiple_goes_up_and_the_others_pay():
    flat = torch.ones(64, dtype=torch.float64)
    cands = [candidate("small", 64, 64, 5, flat), candidate("big", 64, 64, 26, flat)]
    ranks, left = round_layer(cands, 8)          # 8 + 24 > 5 + 26: big gives a block back
    assert ranks == {"small": 8, "big": 16} and left == 7 * 128


def test_a_linear_no_multiple_saves_anything_on_stays_dense():
    flat = torch.ones(16, dtype=torch.float64)
    cands = [candidate("tiny", 16, 16, 4, flat), candidate("big", 96, 96, 40, torch.ones(96, dtype=torch.float64))]
    ranks, left = round_layer(cands, 8)          # 16 x 16: the largest useful rank is 7
    assert ranks["tiny"] is None and ranks["big"] == 32 and left >= 0


def test_a_multiple_too_large_for_a_layer_is_refused_naming_the_field():
    check_layers([[(64, 64, 19), (32, 64, 12)]], 16)
    with pytest.raises(UserError, match="rank_multiple 32 is too large"):
        check_layers([[(64, 64, 19), (32, 64, 12)]], 32)


# --- on a tiny model ----------------------------------------------------------------------

def _cfg(model, **kw):
    base = dict(model=str(model), ratio=0.4, calibration=DataSpec(samples=8, seq_len=32),
                evaluation=EvalConfig(enabled=False), stats_cache=False)
    return CompressConfig(**(base | kw))


def _linear_params(report) -> int:
    return report["params"]["linears_compressed"]


def _check_rounded(report, baseline, multiple):
    ranks = {n: e["rank"] for n, e in report["ranks"].items()}
    assert report["rank_multiple"] == multiple
    assert all(k is not None and k % multiple == 0 for k in ranks.values()), ranks
    assert ranks != {n: e["rank"] for n, e in baseline["ranks"].items()}
    budget, used = _linear_params(baseline), _linear_params(report)
    widest = max(sum(e["shape"]) for e in report["ranks"].values())
    assert budget - multiple * widest < used <= budget
    rounding = report["rank_rounding"]
    assert (rounding["budget_params"], rounding["used_params"]) == (budget, used)
    assert all(e["rank_unrounded"] == baseline["ranks"][n]["rank"] for n, e in report["ranks"].items())


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("multiple", [8, 16])
def test_every_rank_is_a_multiple_within_the_budget(tiny_llama, allocation, multiple):
    baseline = compress(_cfg(tiny_llama, allocation=allocation))
    _check_rounded(compress(_cfg(tiny_llama, allocation=allocation, rank_multiple=multiple)), baseline, multiple)


@pytest.mark.parametrize("kw", [{"method": "svd"}, {"method": "asvd"},
                                {"method": "fwsvd", "method_options": {"samples": 2}},
                                {"recover": {"type": "update"}}, {"calibration_mode": "parallel"}])
def test_every_method_and_the_update_round(tiny_models, kw):
    baseline = compress(_cfg(tiny_models["mistral"], **kw))
    _check_rounded(compress(_cfg(tiny_models["mistral"], rank_multiple=8, **kw)), baseline, 8)


def test_rank_multiple_1_gives_todays_ranks(tiny_llama):
    today = compress(_cfg(tiny_llama))
    one = compress(_cfg(tiny_llama, rank_multiple=1))
    assert one["ranks"] == today["ranks"] and one["rank_multiple"] == 1 and "rank_rounding" not in one
    assert "rank_unrounded" not in str(one["ranks"])


def test_streaming_rounds_the_same_ranks(tiny_llama):
    memory = compress(_cfg(tiny_llama, rank_multiple=8, streaming="off"))
    streamed = compress(_cfg(tiny_llama, rank_multiple=8, streaming="on"))
    assert streamed["streaming"]["enabled"]
    assert {n: e["rank"] for n, e in streamed["ranks"].items()} == {n: e["rank"] for n, e in memory["ranks"].items()}
    _check_rounded(streamed, compress(_cfg(tiny_llama, streaming="on")), 8)


def test_a_sweep_rounds_every_ratio(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, calibration_mode="parallel", rank_multiple=8)
    report = sweep(cfg, [0.3, 0.5], tmp_path / "sweep", figures=False)
    for entry in report["sweep"]["ratios"]:
        single = compress(_cfg(tiny_llama, calibration_mode="parallel", ratio=entry["ratio"]))
        _check_rounded(entry, single, 8)
        alone = compress(_cfg(tiny_llama, calibration_mode="parallel", ratio=entry["ratio"], rank_multiple=8))
        assert {n: e["rank"] for n, e in entry["ranks"].items()} == {n: e["rank"] for n, e in alone["ranks"].items()}


def test_compress_layers_refuses_a_multiple_too_large_before_the_first_layer(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama))
    with pytest.raises(UserError, match="rank_multiple 32"):
        compress_layers(model, None, get_method("svd-llm"), uniform_ranks(0.4), rank_multiple=32)
