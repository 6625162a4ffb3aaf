import math

import pytest
import torch

from svdforge.core.errors import NumericalError
from svdforge.core.linalg import gram_sqrt, saves_params, truncate_left, truncate_right, uniform_rank


def _data(m=48, n=32, t=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, t, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, n, dtype=torch.float64)[:, None]
    return W, X


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_whitened_truncation_loss_is_discarded_spectrum(shape):
    W, X = _data(*shape)
    sq = gram_sqrt(X @ X.T)
    assert sq.path == "cholesky"
    for k in (1, 5, 20):
        f = truncate_right(W, sq.S, k)
        err = float(((W - f.u @ f.v) @ X).pow(2).sum())
        assert err == pytest.approx(float(f.sigma[k:].pow(2).sum()), rel=1e-9)
        assert f.u.shape == (shape[0], k) and f.v.shape == (k, shape[1])


def test_whitening_beats_plain_svd_on_calibration_error():
    W, X = _data()
    k = 8
    whitened = truncate_right(W, gram_sqrt(X @ X.T).S, k)
    plain = truncate_right(W, None, k)
    e = lambda f: float(((W - f.u @ f.v) @ X).norm())  # noqa: E731 - a one-line measure
    assert e(whitened) < 0.9 * e(plain)


def test_rank_deficient_gram_never_fails():
    W, _ = _data()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 300, generator=g, dtype=torch.float64)
    G = X @ X.T  # rank 4 of 32
    sq = gram_sqrt(G)
    assert sq.path in ("jitter", "eigh")
    f = truncate_right(W, sq.S, 10)
    assert torch.isfinite(f.u).all() and torch.isfinite(f.v).all()
    assert float(((W - f.u @ f.v) @ X).norm() / (W @ X).norm()) < 1e-6


def test_jitter_is_the_cholesky_of_the_shifted_gram_bit_for_bit():
    # gram_sqrt shifts the diagonal of a copy in place instead of adding lam * eye (two fewer
    # n x n fp64 matrices at the down projection's width): the factor must be the same bits
    g = torch.Generator().manual_seed(2)
    X = torch.randn(64, 16, generator=g, dtype=torch.float64)
    G = X @ X.T  # rank 16 of 64
    sq = gram_sqrt(G)
    assert sq.path == "jitter" and sq.jitter > 0
    sym = 0.5 * (G + G.T)
    expected = torch.linalg.cholesky(sym + sq.jitter * torch.eye(64, dtype=torch.float64))
    assert torch.equal(sq.S, expected)
    assert torch.equal(G, X @ X.T)   # the caller's Gram is left as it was


def test_exactly_singular_gram_takes_eigh_path():
    G = torch.zeros(6, 6, dtype=torch.float64)
    G[0, 0] = 1.0
    G[1, 1] = -1e-3  # not PSD by round-off: no jitter this small rescues it
    sq = gram_sqrt(G, max_jitter_tries=1)
    assert sq.path == "eigh"
    assert torch.allclose(sq.S @ sq.S.T, G.clamp_min(0), atol=1e-12)


def test_non_finite_gram_is_an_error():
    G = torch.eye(3, dtype=torch.float64)
    G[0, 1] = float("nan")
    with pytest.raises(NumericalError):
        gram_sqrt(G)


def test_uniform_rank_matches_spec():
    m, n, r = 576, 1536, 0.4
    k = uniform_rank(m, n, r)
    assert k == math.floor(m * n * (1 - r) / (m + n))
    assert k * (m + n) <= (1 - r) * m * n < (k + 1) * (m + n)
    assert saves_params(m, n, k)
    assert not saves_params(4, 4, 2)  # 2 * 8 = 16 = 4 * 4: saves nothing
    assert not saves_params(4, 4, 0)


def test_fisher_weighting_prefers_important_rows():
    W, _ = _data(32, 32)
    d = torch.ones(32, dtype=torch.float64)
    d[:4] = 100.0
    weighted = truncate_left(W, d, 6)
    plain = truncate_right(W, None, 6)
    err = lambda f: float((W - f.u @ f.v)[:4].norm())  # noqa: E731 - a one-line measure
    assert err(weighted) < 0.5 * err(plain)


def test_gram_of_bf16_activations_is_close_and_fp32_is_exact():
    """Grams of a bf16 calibration forward are multiplied in bf16 (svdforge.core.statistics.gram_of):
    the result stays within bf16 rounding of the exact product, and whitening from it still
    reaches the exact truncation loss closely; fp32 activations are multiplied in fp32."""
    from svdforge.core.statistics import gram_of

    torch.manual_seed(0)
    x = torch.randn(2048, 96) * torch.linspace(0.1, 10, 96)   # uneven channel scales
    xb = x.bfloat16()
    exact = xb.double().T @ xb.double()
    g16 = gram_of(xb)
    assert g16.dtype == torch.bfloat16
    assert float((g16.double() - exact).norm() / exact.norm()) < 4e-3
    g32 = gram_of(x)
    assert g32.dtype == torch.float32
    ref32 = x.double().T @ x.double()
    assert float((g32.double() - ref32).norm() / ref32.norm()) < 1e-6
    W = torch.randn(64, 96, dtype=torch.float64)
    k = 24
    loss = [float(torch.linalg.norm((W - f.u @ f.v) @ xb.double().T) ** 2)
            for f in (truncate_right(W, gram_sqrt(g).S, k) for g in (exact, g16.double()))]
    assert loss[1] <= loss[0] * 1.01
    xd = torch.randn(2048, 96).bfloat16()
    assert float((gram_of(xd, xb).double() - xd.double().T @ xb.double()).norm()) < 4e-3 * float(
        (xd.double().T @ xb.double()).norm()) + 1.0


@pytest.mark.parametrize(("shape", "rank_deficient"), [((48, 32), False), ((32, 48), False), ((48, 32), True)])
def test_one_decomposition_truncated_at_many_ranks_is_each_single_truncation(shape, rank_deficient):
    """A sweep prepares each linear once (`RightTruncation` / `LeftTruncation`) and truncates it
    per ratio: the factors are exactly those of a separate truncation at each rank, the SVD
    fallback of a tall rank-deficient scaled weight included."""
    from svdforge.core.linalg import LeftTruncation, RightTruncation

    W, X = _data(*shape)
    if rank_deficient:   # inputs of rank 6: sigma_k for k > 6 is at the noise floor -> SVD fallback
        g = torch.Generator().manual_seed(3)
        X = torch.randn(shape[1], 6, generator=g, dtype=torch.float64) @ torch.randn(6, 300, generator=g,
                                                                                   dtype=torch.float64)
    S = X[:, :shape[1]] if rank_deficient else gram_sqrt(X @ X.T).S   # rank-6 scaling: sigma_7.. ~ 0
    prepared = RightTruncation(W, S)
    d = torch.linspace(0.5, 2.0, shape[0], dtype=torch.float64)
    left = LeftTruncation(W, d)
    for k in (2, 5, 12):
        a, b = prepared.factors(k), truncate_right(W, S, k)
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v) and torch.equal(a.sigma, b.sigma)
        assert a.info == b.info
        a, b = left.factors(k), truncate_left(W, d, k)
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    if rank_deficient:
        assert prepared.left._svd is not None   # the fallback ran, once, and was reused
