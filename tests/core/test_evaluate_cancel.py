"""Cancelling during evaluation: every loop of stage 4 checks between batches, timed runs and
generated tokens, so a cancelled job stops within a forward or two, whatever `max_tokens` says."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.errors import Cancelled
from svdforge.core.evaluate import compare, greedy_samples, perplexity, throughput
from svdforge.core.layers import decoder_layers
from svdforge.core.models import load_model
from svdforge.core.pipeline import compress


class Countdown:
    """`check_cancel` that lets `n` calls through, then raises `Cancelled` (and counts its calls)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls > self.n:
            raise Cancelled("cancelled by the test")


def _forwards(model: nn.Module) -> list[int]:
    """A counter of `model`'s top-level forwards (a list so the hook can bump it)."""
    count = [0]
    model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.fixture
def model_tok(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama))
    return model, tok


def test_perplexity_and_compare_stop_between_batches(model_tok):
    model, tok = model_tok
    windows = torch.randint(0, len(tok), (50, 16))
    n = _forwards(model)
    with pytest.raises(Cancelled):
        perplexity(model, windows, check_cancel=Countdown(3))
    assert n[0] == 3  # 3 of 50 windows
    n[0] = 0
    with pytest.raises(Cancelled):
        compare(model, model, windows, check_cancel=Countdown(2))
    assert n[0] == 2 * 2  # teacher and student, 2 windows each
    assert perplexity(model, windows[:2], check_cancel=Countdown(2))["tokens"] == 2 * 15  # not cancelled: all


def test_throughput_stops_between_timed_runs(model_tok):
    model, tok = model_tok
    n = _forwards(model)
    with pytest.raises(Cancelled):
        throughput({"dense": model, "compressed": model}, len(tok), seq_len=16, runs=100, check_cancel=Countdown(5))
    assert n[0] == 5  # 2 warm-ups and 3 of the 200 timed runs


def test_sample_generation_stops_at_the_next_token(model_tok):
    model, tok = model_tok
    layer_calls = [0]
    layers, _ = decoder_layers(model)
    layers[0].register_forward_pre_hook(lambda *_: layer_calls.__setitem__(0, layer_calls[0] + 1))
    model.generation_config.eos_token_id = None  # never stops by itself: 500 tokens per prompt
    check = Countdown(4)
    with pytest.raises(Cancelled):
        greedy_samples({"compressed": model}, tok, [], 500, check_cancel=check)
    assert layer_calls[0] <= 4  # one check before the prompt, then one per generated token
    assert model.config.use_cache is False  # restored on the way out


def _long_eval_cfg(model, streaming: str) -> CompressConfig:
    # 160 windows of 32 tokens: 2 x 160 forwards of each decoder layer when it runs to the end
    return CompressConfig(model=str(model), ratio=0.4, calibration=DataSpec(samples=4, seq_len=32),
                          evaluation=EvalConfig(seq_len=32, max_tokens=160 * 32, throughput=False),
                          streaming=streaming, stats_cache=False)


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_a_job_cancelled_during_evaluation_stops_within_a_few_windows(tiny_llama, tmp_path, streaming):
    """The whole pipeline: cancel once the evaluation has run 3 attention forwards (the
    layer-0 capture of a streamed evaluation runs none); it ends with `Cancelled` a forward
    later instead of running the 2 x 2 x 160 it was asked for."""
    state = {"evaluating": False, "attention_forwards": 0}

    def progress(event: dict) -> None:
        if event["type"] == "stage_started" and event["stage"] == "evaluate":
            state["evaluating"] = True

    def count(module, _args):
        if state["evaluating"] and type(module).__name__ == "LlamaAttention":
            state["attention_forwards"] += 1

    handle = nn.modules.module.register_module_forward_pre_hook(count)
    try:
        with pytest.raises(Cancelled):
            compress(_long_eval_cfg(tiny_llama, streaming), tmp_path / "out", progress,
                     should_cancel=lambda: state["attention_forwards"] >= 3)
    finally:
        handle.remove()
    assert state["evaluating"]
    assert 3 <= state["attention_forwards"] <= 4, state  # a forward at most after the request, of 2 * 2 * 160
    assert not (tmp_path / "out" / "report.json").exists()
