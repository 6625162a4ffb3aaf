"""Ranks rounded to multiples of N within the same parameters (core.rounding, `rank_multiple`).

The bound these tests hold the code to: each kind of linear (q_proj, ..., down_proj) never uses
more parameters than at its unrounded ranks (its budget) and leaves less than one block,
N (m + n), of a linear of that kind that could still have grown; so the compressed linears
use at most the unrounded total and at least that total minus one block per kind.
"""
from __future__ import annotations

import pytest
import torch

from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.errors import UserError
from svdforge.core.linalg import saves_params
from svdforge.core.pipeline import compress
from svdforge.core.rounding import Candidate, candidate, cost, rank_cap, round_group, round_ranks
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
def test_a_group_gets_multiples_within_its_budget(seed, multiple):
    cands = _cands(seed)
    budget = sum(cost(c.m, c.n, c.k) for c in cands)
    ranks, left = round_group(cands, multiple)
    for c in cands:
        r = ranks[c.name]
        assert r is None or (r % multiple == 0 and saves_params(c.m, c.n, r)), (c, r)
    assert left == budget - _used(cands, ranks) >= 0
    growable = [c for c in cands
                if ranks[c.name] is not None and ranks[c.name] + multiple <= rank_cap(c.m, c.n, multiple)]
    assert all(left < multiple * (c.m + c.n) for c in growable)   # no block that fits was left


def test_multiple_1_keeps_the_planned_ranks():
    cands = _cands(4)
    ranks, left = round_group(cands, 1)
    assert ranks == {c.name: c.k for c in cands} and left == 0


def test_the_block_goes_to_the_linear_rounding_down_hurts_most():
    """Both 64 x 64 at rank 20 go down to 16, which frees one block of 8. Cutting the fast-decaying
    spectrum to 16 multiplies its loss by ~11; the slow one's grows by ~40%: the fast one gets it,
    whatever the scale of either."""
    fast = torch.exp(-0.3 * torch.arange(64, dtype=torch.float64))
    slow = torch.exp(-0.04 * torch.arange(64, dtype=torch.float64))
    for scale in (1.0, 1e-6, 1e6):
        cands = [candidate("slow", 64, 64, 20, slow * 1e3), candidate("fast", 64, 64, 20, fast * scale)]
        ranks, left = round_group(cands, 8)
        assert ranks == {"fast": 24, "slow": 16} and left == 0


def test_a_rank_below_the_multiple_goes_up_and_the_others_pay():
    flat = torch.ones(64, dtype=torch.float64)
    cands = [candidate("small", 64, 64, 5, flat), candidate("big", 64, 64, 26, flat)]
    ranks, left = round_group(cands, 8)          # 8 + 24 > 5 + 26: big gives a block back
    assert ranks == {"small": 8, "big": 16} and left == 7 * 128


def test_a_linear_no_multiple_saves_anything_on_stays_dense():
    flat = torch.ones(16, dtype=torch.float64)
    cands = [candidate("tiny", 16, 16, 4, flat), candidate("big", 96, 96, 40, torch.ones(96, dtype=torch.float64))]
    ranks, left = round_group(cands, 8)          # 16 x 16: the largest useful rank is 7
    assert ranks["tiny"] is None and ranks["big"] == 32 and left >= 0


def test_a_linear_rounded_to_dense_counts_at_full_rank_in_the_mean():
    """`by_kind.mean_rank` counts a dense linear at min(m, n), as the loss plan's blocks do (not as 0)."""
    spectra = {"a.t": (16, 16, torch.ones(16, dtype=torch.float64)),
               "b.t": (96, 96, torch.ones(96, dtype=torch.float64))}
    ranks, info = round_ranks(spectra, {"a.t": 4, "b.t": 40}, 8)
    assert ranks == {"a.t": None, "b.t": 32} and info["made_dense"] == ["a.t"]
    assert info["by_kind"]["t"]["mean_rank"] == (16 + 32) / 2 and info["by_kind"]["t"]["mean_rank_unrounded"] == 22


def test_each_kind_keeps_its_own_budget():
    """The q_proj linears free a block that the k_proj ones would value more: it stays with q_proj."""
    flat, steep = torch.ones(64, dtype=torch.float64), torch.exp(-0.3 * torch.arange(64, dtype=torch.float64))
    spectra = {"l0.q_proj": (64, 64, flat), "l1.q_proj": (64, 64, flat),
               "l0.k_proj": (64, 64, steep), "l1.k_proj": (64, 64, steep)}
    ranks, info = round_ranks(spectra, {"l0.q_proj": 20, "l1.q_proj": 20, "l0.k_proj": 16, "l1.k_proj": 16}, 8)
    assert sorted([ranks["l0.q_proj"], ranks["l1.q_proj"]]) == [16, 24]
    assert ranks["l0.k_proj"] == ranks["l1.k_proj"] == 16
    assert info["by_kind"]["q_proj"]["used_params"] == info["by_kind"]["q_proj"]["budget_params"] == 40 * 128
    assert info["unrounded"]["l0.q_proj"] == 20 and info["unspent_params"] == 0


def test_planned_dense_linears_stay_dense():
    flat = torch.ones(64, dtype=torch.float64)
    spectra = {"a.q": (64, 64, flat), "b.q": (64, 64, flat)}
    ranks, info = round_ranks(spectra, {"a.q": None, "b.q": 40}, 8)    # 40 saves nothing on 64 x 64
    assert ranks == {"a.q": None, "b.q": None} and info["budget_params"] == 0 and info["made_dense"] == []


def test_a_multiple_too_large_for_a_kind_is_refused_naming_the_field():
    spectra = {f"l{i}.k_proj": (32, 64, torch.ones(32, dtype=torch.float64)) for i in range(2)}
    round_ranks(spectra, {n: 12 for n in spectra}, 8)
    with pytest.raises(UserError, match="rank_multiple 16 is too large for the k_proj linears"):
        round_ranks(spectra, {n: 12 for n in spectra}, 16)   # 16 > 12 everywhere: nobody can pay


# --- on a tiny model ----------------------------------------------------------------------

def _cfg(model, **kw):
    # uniform unless a test names another: rounding of uniform ranks (and streamed = in-memory)
    base = dict(model=str(model), ratio=0.4, allocation="uniform", calibration=DataSpec(samples=8, seq_len=32),
                evaluation=EvalConfig(enabled=False), stats_cache=False)
    return CompressConfig(**(base | kw))


def _linear_params(report) -> int:
    return report["params"]["linears_compressed"]


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _check_rounded(report, baseline, multiple):
    """Multiples of N; per kind within the budget and less than one block of it below."""
    ranks = {n: e["rank"] for n, e in report["ranks"].items()}
    assert report["rank_multiple"] == multiple
    assert all(k is not None and k % multiple == 0 for k in ranks.values()), ranks
    assert ranks != {n: e["rank"] for n, e in baseline["ranks"].items()}
    for kind in {_kind(n) for n in ranks}:
        entries = [(report["ranks"][n], baseline["ranks"][n]) for n in ranks if _kind(n) == kind]
        budget, used = sum(b["params"] for _, b in entries), sum(e["params"] for e, _ in entries)
        assert used <= budget, kind
        if any(e["rank"] + multiple <= rank_cap(*e["shape"], multiple) for e, _ in entries):   # one could grow
            assert budget - multiple * sum(entries[0][0]["shape"]) < used, kind
    budget, used = _linear_params(baseline), _linear_params(report)
    assert used <= budget
    rounding = report["rank_rounding"]
    assert (rounding["budget_params"], rounding["used_params"]) == (budget, used)
    assert rounding["unrounded"] == {n: e["rank"] for n, e in baseline["ranks"].items()}


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize(("multiple", "ratio"), [(8, 0.4), (16, 0.2)])   # at 0.4 k/v_proj (32 x 64) get 12 < 16
def test_every_rank_is_a_multiple_within_the_budget(tiny_llama, allocation, multiple, ratio):
    baseline = compress(_cfg(tiny_llama, allocation=allocation, ratio=ratio))
    rounded = compress(_cfg(tiny_llama, allocation=allocation, ratio=ratio, rank_multiple=multiple))
    _check_rounded(rounded, baseline, multiple)


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


def test_a_multiple_too_large_for_the_model_is_refused_before_the_decomposition(tiny_llama):
    with pytest.raises(UserError, match="rank_multiple 16 is too large for the k_proj linears"):
        compress(_cfg(tiny_llama, rank_multiple=16))
    with pytest.raises(UserError, match="rank_multiple 32 is too large for the"):
        compress(_cfg(tiny_llama, rank_multiple=32))
