from enum import StrEnum


class JobCreateTargets(StrEnum):
    ALL = "all"
    ATTENTION = "attention"
    MLP = "mlp"

    def __str__(self) -> str:
        return str(self.value)
