from enum import StrEnum


class JobCreateAllocation(StrEnum):
    AUTO = "auto"
    GLOBAL = "global"
    LOSS = "loss"
    UNIFORM = "uniform"

    def __str__(self) -> str:
        return str(self.value)
