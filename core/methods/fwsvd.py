"""FWSVD (Hsu et al. 2022): Fisher-weighted SVD.

The Fisher information of each weight is estimated by squared gradients of the LM loss
on calibration windows. Following the paper, importance is pooled per row of W (per
output unit): I_i = sum_j F_ij, and the factors minimise ||diag(sqrt(I)) (W - W_u W_v)||_F
(`truncate_left`). Rows with zero importance get a small floor so they stay finite.
"""
from dataclasses import dataclass

from svdforge.core.errors import NumericalError, UserError
from svdforge.core.methods.base import Method, MethodConfig


@dataclass
class FWSVDConfig(MethodConfig):
    """samples: calibration windows whose squared gradients estimate the Fisher information."""

    samples: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.samples, int) and not isinstance(self.samples, bool)
                and 1 <= self.samples <= 1_000_000):
            raise UserError(f"method_options.samples must be an integer in [1, 1000000], got {self.samples!r}")


class FWSVD(Method):
    name = "fwsvd"
    summary = "Fisher-weighted SVD: rows weighted by squared gradients of the loss (needs the whole model)"
    needs = frozenset({"fisher"})
    config_cls = FWSVDConfig

    def prepare(self, W, stats, fisher):
        from svdforge.core.linalg import LeftTruncation

        if fisher is None:
            raise NumericalError("fwsvd needs Fisher information for every compressed linear")
        row = fisher.to(W.device).double().sum(dim=1)
        d = row.clamp_min(float(row.max()) * 1e-8 + 1e-30).sqrt()
        t = LeftTruncation(W, d)
        t.info["path"] = "fisher"
        return t
