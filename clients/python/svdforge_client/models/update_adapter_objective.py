from enum import StrEnum


class UpdateAdapterObjective(StrEnum):
    BOTH = "both"
    KL = "kl"
    NTP = "ntp"

    def __str__(self) -> str:
        return str(self.value)
