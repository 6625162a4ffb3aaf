"""Plain truncated SVD of W (data-free baseline): W ~ U_k Sigma_k V_k^T."""
from svdforge.core.linalg import RightTruncation
from svdforge.core.methods import Method, register


@register
class PlainSVD(Method):
    name = "svd"
    needs = frozenset()

    def prepare(self, W, stats, fisher):
        t = RightTruncation(W, None)
        t.info["path"] = "none"
        return t
