"""A job's statuses, its stages and the changes the state machine allows (`svdforge.persistence.state`).

A module of its own, importing nothing, so that what renders a job (`views`) and what the
state machine calls (`webhooks`) can use these names without importing the machine.
"""
from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job's stages, in the order they run (the worker maps core's stage names onto them). No
# docstring: it would become the OpenAPI description of the public `Stage` enum.
class Stage(StrEnum):
    LOAD = "load"          # reading the model and its tokenizer
    WHITEN = "whiten"      # calibration: forward passes and each linear's activation statistics
    SVD = "svd"            # the decompositions at each linear's rank
    RECOVER = "recover"    # the recovery adapter: update, LoRA or AdaLoRA (skipped for `none`)
    EVALUATE = "evaluate"  # perplexity and fidelity against the dense model, throughput
    UPLOAD = "upload"      # writing the artifact, then storing its files


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLING, JobStatus.QUEUED}),
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
