"""The linear algebra of truncation-aware SVD, as plain functions (fp64 throughout).

Notation (SPEC): a linear `y = W x` with `W` of shape m x n; calibration inputs `X` (n x T);
the Gram matrix `G = X X^T`; a square root `S` with `S S^T = G` (Cholesky when possible).

Truncation. Let `W S = U Sigma V^T`. SVD-LLM keeps the top k and stores
`W_u = U_k Sigma_k^(1/2)` and `W_v = Sigma_k^(1/2) V_k^T S^-1`, forming `S^-1` explicitly.
Since `U_k^T W S = Sigma_k V_k^T`, the same `W_v` equals `Sigma_k^(-1/2) U_k^T W`: no inverse
(and no triangular solve) of the badly conditioned `S` is needed at all. The product is the
projection `W_u W_v = U_k U_k^T W`, and the calibration error is exactly the discarded
spectrum, `||(W - W_u W_v) S||_F^2 = sum_{i>k} sigma_i^2`. This holds for any square root
`S` of `G`, singular ones included, so a rank-deficient Gram is no obstacle: the eigh path
with eigenvalues clamped at zero is an exact square root.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from svdforge.core.errors import NumericalError


@dataclass
class Sqrt:
    """A square root S of a Gram matrix and how it was obtained."""

    S: torch.Tensor
    path: str                 # cholesky | jitter | eigh
    jitter: float = 0.0
    info: dict = field(default_factory=dict)


def gram_sqrt(G: torch.Tensor, max_jitter_tries: int = 3) -> Sqrt:
    """S with S S^T = G for a symmetric PSD G: Cholesky, then jittered Cholesky, then eigh.

    Never fails on a finite PSD matrix. Jitter starts at 1e-10 x mean(diag G) and grows
    x100 per try; the eigh fallback clamps negative eigenvalues (round-off) at zero, which
    is an exact square root of the PSD part.
    """
    G = G.to(torch.float64)
    if not torch.isfinite(G).all():
        raise NumericalError("the Gram matrix has non-finite entries (inputs overflowed)")
    # Memory: the caller's G, its symmetric copy, one shifted copy and L; no identity matrix
    # (at n = intermediate size the old G + lam * eye path held 5 n x n fp64 copies, not 3).
    G = (G + G.T).mul_(0.5)
    L, bad = torch.linalg.cholesky_ex(G)
    if bad.item() == 0:
        return Sqrt(L, "cholesky")
    del L
    scale = float(G.diagonal().mean().clamp_min(1e-30))
    shifted = torch.empty_like(G)
    for i in range(max_jitter_tries):
        lam = scale * 1e-10 * (100.0 ** i)
        shifted.copy_(G).diagonal().add_(lam)     # G + lam I, the same values as with an identity
        L, bad = torch.linalg.cholesky_ex(shifted)
        if bad.item() == 0:
            return Sqrt(L, "jitter", lam)
        del L
    del shifted
    evals, evecs = torch.linalg.eigh(G)
    neg = int((evals < 0).sum())
    S = evecs * evals.clamp_min(0).sqrt()
    return Sqrt(S, "eigh", 0.0, {"clamped_eigenvalues": neg})


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """SPEC: k = floor(m n (1 - r) / (m + n)), so that k (m + n) <= (1 - r) m n."""
    return int(math.floor(m * n * (1.0 - ratio) / (m + n)))


def saves_params(m: int, n: int, k: int) -> bool:
    return k >= 1 and k * (m + n) < m * n


@dataclass
class Factors:
    """W ~ u @ v with u: m x k, v: k x n (fp64), and what the truncation cost."""

    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor            # full spectrum of the scaled weight, descending
    info: dict = field(default_factory=dict)


def _energy(sigma: torch.Tensor, k: int) -> dict:
    e = sigma.double().pow(2)
    total = float(e.sum())
    kept = float(e[:k].sum())
    return {"retained_energy": kept / total if total > 0 else 1.0, "truncation_loss": total - kept}


def _split(P: torch.Tensor, sigma_k: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the projection P P^T W: u = P d, v = d^-1 P^T W, d = sqrt(sigma).

    d is floored at 1e-12 x sigma_1 so that directions without signal (sigma ~ 0) never
    divide by zero; the product u v = P P^T W is exact whatever d is.
    """
    d = sigma_k.clamp_min(float(sigma_k[0]) * 1e-12 + 1e-300).sqrt()
    return P * d, (P.T @ W) / d[:, None]


class Truncation:
    """One decomposition of a scaled weight, truncated at any rank by `factors(k)`.

    The expensive part (the scaled weight's eigendecomposition or SVD) happens once, on
    construction; each `factors(k)` only slices it. A sweep over several ratios builds one
    per linear and truncates it at every ratio's rank; a single compression calls
    `factors` once. Both paths run the same operations, so their factors are identical.
    """

    sigma: torch.Tensor       # full spectrum of the scaled weight, descending
    info: dict                # what every truncation reports (the method's scaling path, ...)

    def factors(self, k: int) -> Factors:
        raise NotImplementedError

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q), m x r and n x r: W = sum_i P[:, i] Q[:, i]^T in the spectrum's order, so that
        truncating at rank k removes the components k.. (`svdforge.core.sensitivity` scores them)."""
        raise NotImplementedError


class RightTruncation(Truncation):
    """Rank-k factors minimising ||(W - u v) S||_F (S=None: plain SVD, Eckart-Young)."""

    def __init__(self, W: torch.Tensor, S: torch.Tensor | None):
        self.W = W.to(torch.float64)
        A = self.W if S is None else self.W @ S.to(torch.float64)
        if not torch.isfinite(A).all():
            raise NumericalError("non-finite values in the scaled weight")
        self.left = LeftSingular(A)
        self.sigma = self.left.sigma
        self.info = {}

    def factors(self, k: int) -> Factors:
        P, sigma = self.left.top(k)
        u, v = _split(P, sigma[:k], self.W)
        return Factors(u, v, sigma, _energy(sigma, k))

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        P, _ = self.left.top(min(self.W.shape))
        return P, self.W.T @ P          # component i: u_i u_i^T W


def truncate_right(W: torch.Tensor, S: torch.Tensor | None, k: int) -> Factors:
    """Rank-k factors minimising ||(W - u v) S||_F (S=None: plain SVD, Eckart-Young)."""
    return RightTruncation(W, S).factors(k)


class LeftSingular:
    """Left singular vectors of A (m x n) and its full spectrum, descending, for any top k.

    Uses eigh of the smaller Gram side (3x faster than an SVD here); squaring costs no
    accuracy for the kept directions, whose sigma is far above sqrt(eps) sigma_1. When the
    kept spectrum reaches the noise floor (rank-deficient data), falls back to the SVD
    (computed once, on first need).
    """

    def __init__(self, A: torch.Tensor):
        self.A = A
        m, n = A.shape
        self.wide = m <= n
        evals, vecs = torch.linalg.eigh(A @ A.T if self.wide else A.T @ A)
        self.sigma = evals.flip(0).clamp_min(0).sqrt()
        self.vecs = vecs.flip(1)
        self._svd: tuple[torch.Tensor, torch.Tensor] | None = None

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.wide:
            return self.vecs[:, :k], self.sigma
        if self.sigma[k - 1] > 1e-6 * self.sigma[0]:
            return (self.A @ self.vecs[:, :k]) / self.sigma[:k], self.sigma
        if self._svd is None:
            U, sigma, _ = torch.linalg.svd(self.A, full_matrices=False)
            self._svd = (U, sigma)
        return self._svd[0][:, :k], self._svd[1]


def top_left_singular(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors of A (m x n) and its full spectrum, descending."""
    return LeftSingular(A).top(k)


class LeftTruncation(Truncation):
    """Rank-k factors minimising ||diag(d) (W - u v)||_F (row weighting, FWSVD)."""

    def __init__(self, W: torch.Tensor, d: torch.Tensor):
        W = W.to(torch.float64)
        self.d = d.to(torch.float64)
        self.U, self.sigma, self.Vh = torch.linalg.svd(self.d[:, None] * W, full_matrices=False)
        self.info = {}

    def factors(self, k: int) -> Factors:
        root = self.sigma[:k].sqrt()
        u = (self.U[:, :k] * root) / self.d[:, None]
        v = root[:, None] * self.Vh[:k]
        return Factors(u, v, self.sigma, _energy(self.sigma, k))

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.U * self.sigma) / self.d[:, None], self.Vh.T


def truncate_left(W: torch.Tensor, d: torch.Tensor, k: int) -> Factors:
    """Rank-k factors minimising ||diag(d) (W - u v)||_F (row weighting, FWSVD)."""
    return LeftTruncation(W, d).factors(k)
