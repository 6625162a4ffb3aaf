"""Plain truncated SVD of W (data-free baseline): W ~ U_k Sigma_k V_k^T."""
from core.linalg import truncate_right
from core.methods import Method, register


@register
class PlainSVD(Method):
    name = "svd"
    needs = frozenset()

    def factorize(self, W, k, stats, fisher):
        f = truncate_right(W, None, k)
        f.info["path"] = "none"
        return f
