"""ASVD (Yuan et al. 2023): scale input channels by mean |x|^alpha before the SVD.

S = diag(s), s_j = mean_t |x_tj|^alpha (alpha 0.5 by default). Factors minimise
||(W - W_u W_v) S||_F via `truncate_right`, equal in exact arithmetic to ASVD's
W_v = Sigma^(1/2) V^T S^-1. Unlike ASVD's code, a failing SVD raises instead of
silently replacing the layer by a random one.
"""
from dataclasses import dataclass

from svdforge.core.errors import UserError
from svdforge.core.methods.base import Method, MethodConfig


@dataclass
class ASVDConfig(MethodConfig):
    """alpha: the exponent of the mean absolute activation that scales each input channel."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 < self.alpha <= 2):
            raise UserError(f"method_options.alpha must be in (0, 2], got {self.alpha!r}")


class ASVD(Method):
    name = "asvd"
    summary = "activation-aware SVD: input channels scaled by their mean absolute activation to the power alpha"
    needs = frozenset({"abs_mean"})
    config_cls = ASVDConfig

    def prepare(self, W, stats, fisher):
        from svdforge.core.linalg import RightTruncation

        s = stats.abs_mean.to(W.device).double()
        s = s.clamp_min(float(s.max()) * 1e-6 + 1e-12).pow(self.config.alpha)
        t = RightTruncation(W, s.diag())
        t.info["path"] = "diag"
        return t
