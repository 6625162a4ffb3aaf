from enum import StrEnum


class AdaLoraAdapterObjective(StrEnum):
    BOTH = "both"
    KL = "kl"
    NTP = "ntp"

    def __str__(self) -> str:
        return str(self.value)
