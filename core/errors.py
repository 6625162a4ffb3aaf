"""Errors the library raises on purpose.

`UserError` is a bad input (a model that cannot be loaded, a ratio out of range, too
little text): the CLI prints its message on one line and exits 2, the service answers
422/4xx. Anything else escaping the pipeline is a bug or an infrastructure fault.
"""


class UserError(ValueError):
    """A bad input, reported to the user as one line."""


class NumericalError(RuntimeError):
    """Non-finite values where the math must be finite (never silently skipped)."""


class Cancelled(RuntimeError):
    """The caller asked the pipeline to stop (checked at stage and layer boundaries)."""


class TargetUnmet(UserError):
    """A quality target (`svdforge.core.config.QualityTarget`) that no ratio of its range meets."""
