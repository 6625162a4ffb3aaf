"""SVD-LLM (truncation-aware data whitening), SPEC stages 1-2.

S is a square root of the input Gram G (Cholesky, jittered Cholesky or clamped eigh:
`svdforge.core.linalg.gram_sqrt`), computed once per distinct input and shared by the linears that
read it. The factors come from the top-k left singular vectors of W S without ever
inverting S (`svdforge.core.linalg.truncate_right`), so the calibration loss of a linear is exactly
sum_{i>k} sigma_i^2 of its whitened spectrum.
"""
from dataclasses import dataclass

from svdforge.core.methods.base import Method, MethodConfig


@dataclass
class SVDLLMConfig(MethodConfig):
    """No options: the whitening is determined by the calibration data."""


class SVDLLM(Method):
    name = "svd-llm"
    summary = "truncation-aware whitening: SVD of W S with S S^T the input Gram (the default)"
    needs = frozenset({"gram"})
    config_cls = SVDLLMConfig

    def whitening(self, stats):
        from svdforge.core.linalg import gram_sqrt

        if "sqrt" not in stats.cache:
            stats.cache["sqrt"] = gram_sqrt(stats.gram)
        return stats.cache["sqrt"]

    def prepare(self, W, stats, fisher):
        from svdforge.core.linalg import RightTruncation

        sq = self.whitening(stats)
        t = RightTruncation(W, sq.S.to(W.device))
        t.info["path"] = sq.path
        if sq.jitter:
            t.info["jitter"] = sq.jitter
        t.info.update(sq.info)
        return t
