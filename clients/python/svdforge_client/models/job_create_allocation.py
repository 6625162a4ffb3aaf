from enum import StrEnum


class JobCreateAllocation(StrEnum):
    GLOBAL = "global"
    LOSS = "loss"
    UNIFORM = "uniform"

    def __str__(self) -> str:
        return str(self.value)
