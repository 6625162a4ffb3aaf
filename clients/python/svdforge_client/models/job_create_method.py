from enum import StrEnum


class JobCreateMethod(StrEnum):
    ASVD = "asvd"
    FWSVD = "fwsvd"
    SVD = "svd"
    SVD_LLM = "svd-llm"

    def __str__(self) -> str:
        return str(self.value)
