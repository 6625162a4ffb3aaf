from enum import StrEnum


class FileOutPurpose(StrEnum):
    CALIBRATION = "calibration"
    EVALUATION = "evaluation"
    TRAINING = "training"

    def __str__(self) -> str:
        return str(self.value)
