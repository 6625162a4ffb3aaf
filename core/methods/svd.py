"""Plain truncated SVD of W (data-free baseline): W ~ U_k Sigma_k V_k^T."""
from dataclasses import dataclass

from svdforge.core.methods.base import Method, MethodConfig


@dataclass
class SVDConfig(MethodConfig):
    """No options."""


class PlainSVD(Method):
    name = "svd"
    summary = "plain truncated SVD of W (data-free baseline)"
    needs = frozenset()
    config_cls = SVDConfig

    def prepare(self, W, stats, fisher):
        from svdforge.core.linalg import RightTruncation

        t = RightTruncation(W, None)
        t.info["path"] = "none"
        return t
