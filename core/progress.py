"""Progress events and cancellation, shared by the CLI (tqdm bars) and the service (job events).

An event is a plain dict: {"type": "stage_started"|"stage_finished"|"progress"|"metrics"|"log",
"stage": "whiten"|"svd"|"recover"|"evaluate"|"save", "fraction": 0..1, "message": str, ...}.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from svdforge.core.errors import Cancelled

Callback = Callable[[dict], None]


class Reporter:
    def __init__(self, callback: Callback | None = None, should_cancel: Callable[[], bool] | None = None):
        self.callback = callback
        self.should_cancel = should_cancel
        self.timings: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def emit(self, **event) -> None:
        if self.callback is not None:
            self.callback(event)

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("cancelled by the caller")

    def stage_started(self, stage: str, message: str = "", total: int | None = None) -> None:
        self.check_cancel()
        self._started[stage] = time.perf_counter()
        self.emit(type="stage_started", stage=stage, fraction=0.0, message=message, total=total)

    def stage_finished(self, stage: str, seconds: float | None = None, **extra) -> None:
        if seconds is None:
            seconds = time.perf_counter() - self._started.get(stage, time.perf_counter())
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.emit(type="stage_finished", stage=stage, fraction=1.0, seconds=seconds, **extra)

    def progress(self, stage: str, fraction: float, message: str = "", **extra) -> None:
        self.emit(type="progress", stage=stage, fraction=min(max(fraction, 0.0), 1.0), message=message, **extra)

    def log(self, message: str, stage: str | None = None) -> None:
        self.emit(type="log", stage=stage, message=message)

    def metrics(self, stage: str, metrics: dict) -> None:
        self.emit(type="metrics", stage=stage, metrics=metrics)


class TqdmBars:
    """A callback that draws one tqdm bar per stage (the CLI's view of the events)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars: dict = {}

    def close(self) -> None:
        """Drop unfinished bars without leaving them on screen (an error follows)."""
        for bar in self.bars.values():
            bar.leave = False
            bar.close()
        self.bars.clear()

    def _bar(self, stage: str):
        from tqdm import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(total=1000, desc=f"{stage:>8}", leave=True,
                                    bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        return self.bars[stage]

    def __call__(self, ev: dict) -> None:
        """Bars appear on a stage's first progress (so a failed model load draws none)."""
        if not self.enabled:
            return
        stage = ev.get("stage")
        if ev["type"] == "progress":
            bar = self._bar(stage)
            bar.n = int(ev["fraction"] * 1000)
            bar.set_postfix_str(ev.get("message", ""), refresh=True)
        elif ev["type"] == "stage_finished":
            bar = self._bar(stage)
            bar.n = 1000
            bar.set_postfix_str(f"{ev.get('seconds', 0):.1f}s", refresh=True)
            bar.close()
            del self.bars[stage]
