from enum import StrEnum


class Stage(StrEnum):
    EVALUATE = "evaluate"
    LOAD = "load"
    RECOVER = "recover"
    SVD = "svd"
    UPLOAD = "upload"
    WHITEN = "whiten"

    def __str__(self) -> str:
        return str(self.value)
