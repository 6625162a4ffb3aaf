"""ASVD (Yuan et al. 2023): scale input channels by mean |x|^alpha before the SVD.

S = diag(s), s_j = mean_t |x_tj|^alpha (alpha 0.5 by default). Factors minimise
||(W - W_u W_v) S||_F via `truncate_right`, equal in exact arithmetic to ASVD's
W_v = Sigma^(1/2) V^T S^-1. Unlike ASVD's code, a failing SVD raises instead of
silently replacing the layer by a random one.
"""
from svdforge.core.linalg import RightTruncation
from svdforge.core.methods import Method, register


@register
class ASVD(Method):
    name = "asvd"
    needs = frozenset({"abs_mean"})
    alpha = 0.5

    def prepare(self, W, stats, fisher):
        s = stats.abs_mean.to(W.device).double()
        s = s.clamp_min(float(s.max()) * 1e-6 + 1e-12).pow(stats.cache.get("alpha", self.alpha))
        t = RightTruncation(W, s.diag())
        t.info["path"] = "diag"
        return t
