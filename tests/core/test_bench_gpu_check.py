"""bench/gpu_check.py: the GPU check's CPU smoke run (tiny shapes, in a plain checkout where
svdforge is not installed) and its plan for the device run."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _numbers(obj, path=""):
    """Every number in a JSON tree, with its path."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def test_small_cpu_run_without_svdforge_installed(tmp_path):
    # python -S: no .pth files, so the editable install's finder is gone; site-packages on
    # PYTHONPATH still gives torch and transformers. The script must import svdforge by itself.
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"], HF_HUB_OFFLINE="1")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), "--device", "cpu", "--small", "--threads", "1",
                           "--json", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "| correctness (device vs CPU) | passed |" in proc.stdout
    for key in ("plan", "probe", "correctness", "generate_llama7b", "llama7b", "throughput", "gqa"):
        assert r[key].get("status", "done") == "done", (key, r[key].get("status"), r[key].get("log_tail"))
    assert r["probe"]["svdforge_from"] == str(ROOT / "core")
    c = r["correctness"]
    assert c["passed"] and c["float32"]["ranks_equal"] and c["bfloat16"]["ranks_equal"]
    assert c["bfloat16"]["compression_max_abs_diff"] > 0     # the model was really compressed
    m = r["llama7b"]
    assert m["layers_done"] == m["shape"]["layers"] == len(m["layer_s"]) == 4
    assert m["peak_rss_bytes"] > 0 and m["samples"] == r["plan"]["llama7b"]["samples"]
    t = r["throughput"]
    assert set(t["speedup"]) == {"prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b4_tokens_per_s"}
    assert 0.5 < t["param_ratio"] < 0.8
    assert {g["linear"] for g in t["factor_gemms"]} == {"q/o", "k/v", "gate/up", "down"}
    assert r["gqa"]["shape"]["kv_heads"] == 2 and r["gqa"]["layers_done"] == 4
    numbers = list(_numbers(r))
    assert len(numbers) > 50
    assert all(math.isfinite(v) for _, v in numbers), [p for p, v in numbers if not math.isfinite(v)]
    assert all(v > 0 for p, v in numbers if p.endswith("tokens_per_s"))


def test_dry_run_plans_the_device_run(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = json.loads(out.read_text())["plan"]
    g = _module()
    assert p["small"] is False and p["budget_s"] == 450 and p["rates"] == g.ASSUMED_H200
    shape7 = {k: p["llama7b"][k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "seq_len")}
    assert shape7 == {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32,
                      "vocab": 32000, "seq_len": 2048}
    assert p["llama7b"]["planned_samples"] == 256
    # the calibration is the largest power-of-two share of 256 windows that fits its budget share
    n = p["llama7b"]["samples"]
    assert n is not None and 16 <= n <= 256 and 256 % n == 0
    assert g.SAFETY * p["llama7b"]["predicted_s"] <= p["llama7b"]["budget_s"]
    if n < 256:
        bigger = g.RESERVE_S["fixed"] + 32 * g.predict_layer_s(p["llama7b"], 2 * n, g.ASSUMED_H200)
        assert g.SAFETY * bigger > p["llama7b"]["budget_s"]
    assert (p["gqa"]["intermediate"], p["gqa"]["kv_heads"], p["gqa"]["samples"]) == (14336, 8, 256)
    assert p["throughput"] == {"prefill": [1, 2048], "decode_batches": [1, 16], "prompt": 128, "new_tokens": 128}


def test_plan_shrinks_calibration_on_a_slower_device():
    g = _module()
    g.bootstrap()
    shape = g.FULL["llama7b"]
    fast, _ = g.pick_samples(shape, 10_000, g.ASSUMED_H200, 16)
    assert fast == 256
    slow = {k: v / 4 for k, v in g.ASSUMED_H200.items()}
    n_fast, _ = g.pick_samples(shape, 400, g.ASSUMED_H200, 16)
    n_slow, pred = g.pick_samples(shape, 400, slow, 16)
    assert n_slow is None or n_slow < n_fast
    none, pred = g.pick_samples(shape, 10, g.ASSUMED_H200, 16)
    assert none is None and pred > 10
