"""Shared test setup: offline hub, a per-session cache, tiny models built once."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SVDFORGE_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "svdforge"))

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP spin-waits badly when the 2 cores are
# shared (measured: a tiny compress 0.15 s on 1 thread vs 2.8 s on 2 under load).
# Tests that run real SmolLM2 weights raise it back with the `threads` fixture.
torch.set_num_threads(1)


@pytest.fixture
def all_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: path} for tiny random Llama, Mistral and Qwen2 folders (GQA: 4 heads, 2 kv heads)."""
    from svdforge.core.testing import ARCHS, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]
