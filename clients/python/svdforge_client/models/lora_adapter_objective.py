from enum import StrEnum


class LoraAdapterObjective(StrEnum):
    BOTH = "both"
    KL = "kl"
    NTP = "ntp"

    def __str__(self) -> str:
        return str(self.value)
