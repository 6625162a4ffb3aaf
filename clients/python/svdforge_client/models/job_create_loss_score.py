from enum import StrEnum


class JobCreateLossScore(StrEnum):
    FISHER = "fisher"
    TAYLOR = "taylor"

    def __str__(self) -> str:
        return str(self.value)
