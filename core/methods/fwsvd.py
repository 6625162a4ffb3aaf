"""FWSVD (Hsu et al. 2022): Fisher-weighted SVD.

The Fisher information of each weight is estimated by squared gradients of the LM loss
on calibration windows. Following the paper, importance is pooled per row of W (per
output unit): I_i = sum_j F_ij, and the factors minimise ||diag(sqrt(I)) (W - W_u W_v)||_F
(`truncate_left`). Rows with zero importance get a small floor so they stay finite.
"""
from svdforge.core.errors import NumericalError
from svdforge.core.linalg import LeftTruncation
from svdforge.core.methods import Method, register


@register
class FWSVD(Method):
    name = "fwsvd"
    needs = frozenset({"fisher"})

    def prepare(self, W, stats, fisher):
        if fisher is None:
            raise NumericalError("fwsvd needs Fisher information for every compressed linear")
        row = fisher.to(W.device).double().sum(dim=1)
        d = row.clamp_min(float(row.max()) * 1e-8 + 1e-30).sqrt()
        t = LeftTruncation(W, d)
        t.info["path"] = "fisher"
        return t
