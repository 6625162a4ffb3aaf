"""Scaling curve: streaming compression of random Llama checkpoints of growing size (issue 7).

For each size: write a random-weight Llama-architecture checkpoint (fp32 safetensors shards,
tensor by tensor: the generator never holds more than one shard in memory), compress it at
ratio 0.4 with `streaming="on"` in a child process, and record size on disk, the child's
peak RSS (its VmHWM, the kernel's high-water mark of its resident memory), total time and time per layer (median
of the per-layer wall times, from the pipeline's progress events). The checkpoint and the
artifact are deleted before the next size.

    python bench/scale.py                 # 0.25, 1, 3, 12.1 GiB: ~1 h 30 on 2 shared cores
    python bench/scale.py --sizes 0.25 1 --hidden 512 --intermediate 1536 --samples 16
    SCALE_DIR=/big/disk python bench/scale.py --sizes 12.1     # sizes can run in separate calls
    python bench/scale.py --extrapolate   # only the LLaMA-7B/13B/70B table, from docs/scale.json

A checkpoint left behind by an interrupted run (complete shards, same shape) is reused.
One thread by default: two OpenMP threads on two cores shared with other jobs measured 3-4x
slower per layer (spin-waiting).

Writes docs/scale.json (one object per size) and the measured table in docs/scale.md
(between the `<!-- scale:begin -->` / `<!-- scale:end -->` markers, the rest of the page is
kept). Timings on a shared machine are noisy: per-layer times are medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GiB = 2**30


def layer_params(h: int, inter: int, heads: int, kv_heads: int) -> int:
    hd = h // heads
    return 2 * h * h + 2 * h * kv_heads * hd + 3 * h * inter + 2 * h


def write_checkpoint(path: Path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
                     seed: int = 0, shard_bytes: int = 2 * 10**9, *, tokenizer=None, vocab: int | None = None,
                     dtype: str = "float32", device: str = "cpu") -> int:
    """A random Llama checkpoint, written shard by shard. Returns bytes on disk.

    `tokenizer` defaults to the 512-token BPE of `svdforge.core.testing` (trained on the builtin
    corpus); `vocab` (>= the tokenizer's) sizes the embeddings and head; `dtype` float32 or
    float16; `device` where the random numbers are drawn (cuda: seconds for a 7B checkpoint)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from svdforge.core.testing import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    tok = tokenizer
    vocab = max(vocab or 0, len(tok))
    tdt = getattr(torch, dtype)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.dtype = dtype
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    g = torch.Generator(device=device).manual_seed(seed)
    hd = hidden // heads

    def tensors():
        yield "model.embed_tokens.weight", (vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (hidden,)
            yield f"{p}.post_attention_layernorm.weight", (hidden,)
            yield f"{p}.self_attn.q_proj.weight", (heads * hd, hidden)
            yield f"{p}.self_attn.k_proj.weight", (kv_heads * hd, hidden)
            yield f"{p}.self_attn.v_proj.weight", (kv_heads * hd, hidden)
            yield f"{p}.self_attn.o_proj.weight", (hidden, heads * hd)
            yield f"{p}.mlp.gate_proj.weight", (inter, hidden)
            yield f"{p}.mlp.up_proj.weight", (inter, hidden)
            yield f"{p}.mlp.down_proj.weight", (hidden, inter)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    shards, pending, pending_bytes = [], {}, 0

    def flush():
        nonlocal pending, pending_bytes
        name = f".tmp-{len(shards):05d}.safetensors"
        save_file(pending, str(path / name), metadata={"format": "pt"})
        shards.append((name, list(pending)))
        pending, pending_bytes = {}, 0

    for name, shape in tensors():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=tdt)
        else:   # std 1/sqrt(fan_in) x 0.5: activations stay O(1) through hundreds of layers
            t = torch.randn(shape, generator=g, device=device).mul_(0.5 / shape[1] ** 0.5).to("cpu", tdt)
        nb = t.numel() * t.element_size()
        if pending and pending_bytes + nb > shard_bytes:
            flush()
        pending[name] = t
        pending_bytes += nb
    flush()
    n = len(shards)
    weight_map = {}
    for i, (tmp, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(path / tmp, path / final)
        weight_map.update({k: final for k in keys})
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child(model: str, out: str, samples: int, seq_len: int, threads: int) -> None:
    """Runs in the measured process: one streaming compression, a JSON line on stdout."""
    import torch

    torch.set_num_threads(threads)
    from svdforge.core import CompressConfig, DataSpec, EvalConfig, compress

    stamps: list[tuple[int, float]] = []
    hwm: list[float] = []     # VmHWM (GiB) after each layer
    svd_start: list[float] = []   # when the layer loop starts: layer 0's time is its first stamp minus this
    cpu: list[float] = []         # process CPU seconds (all threads) at the loop's start and after each layer
    t0 = time.perf_counter()

    def hwm_gib() -> float:
        return int(next(ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("VmHWM"))) / 2**20

    def progress(ev):
        if ev.get("type") == "stage_started" and ev.get("stage") == "svd":
            svd_start.append(time.perf_counter())
            cpu.append(time.process_time())
        if ev.get("type") in ("stage_started", "stage_finished"):
            print(f"[{ev['type']} {ev.get('stage')}] {time.perf_counter() - t0:.0f} s, peak RSS so far "
                  f"{hwm_gib():.2f} GiB", flush=True)
        if ev.get("type") == "progress" and ev.get("stage") == "svd" and "layer" in ev:
            stamps.append((ev["layer"], time.perf_counter()))
            cpu.append(time.process_time())
            hwm.append(hwm_gib())
            print(f"[layer {ev['layer']} done] {time.perf_counter() - t0:.0f} s, peak RSS so far {hwm[-1]:.2f} GiB",
                  flush=True)

    t0 = time.perf_counter()
    cfg = CompressConfig(model=model, ratio=0.4, calibration=DataSpec(samples=samples, seq_len=seq_len),
                         evaluation=EvalConfig(enabled=False), streaming="on", stats_cache=False)
    r = compress(cfg, out, progress=progress)
    total = time.perf_counter() - t0
    print(f"[done] peak RSS {hwm_gib():.2f} GiB", flush=True)
    times = sorted(b - a for (_, a), (_, b) in zip(stamps, stamps[1:]))
    q = (lambda f: times[int(f * (len(times) - 1))]) if times else (lambda f: None)
    print("RESULT " + json.dumps({
        "total_s": total, "layer_median_s": q(0.5), "layer_p10_s": q(0.1), "layer_p90_s": q(0.9),
        "first_layer_s": stamps[0][1] - t0 if stamps else None, "timings_s": r["timings_s"],
        "peak_rss_bytes": int(hwm_gib() * 2**30), "peak_rss_self": r["peak_rss_bytes"],
        "layer_s": [b - a for a, b in zip(svd_start[:1] + [t for _, t in stamps], [t for _, t in stamps])],
        "hwm_after_layer_gib": hwm, "layer_cpu_s": [b - a for a, b in zip(cpu, cpu[1:])],
        "streaming": r.get("streaming"), "params": r["params"], "out_bytes": r["bytes"]["compressed"],
        "device": r["device"], "threads": torch.get_num_threads()}), flush=True)


def run_one(model_dir: Path, out_dir: Path, samples: int, seq_len: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), str(out_dir), str(samples), str(seq_len),
           str(threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = out_dir.parent / f"{out_dir.name}.log"
    with open(log, "w+") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        _, status, ru = os.wait4(proc.pid, 0)   # this child's own rusage (peak RSS), from the kernel
        proc.returncode = os.waitstatus_to_exitcode(status)
        fh.seek(0)
        out = fh.read()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None or proc.returncode != 0:
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{out[-3000:]}")
    res = json.loads(line[7:])
    # The child's own VmHWM (reset at exec) is its peak. wait4's ru_maxrss is not: Linux
    # carries the parent's RSS at fork over exec into it (measured: a 1 GiB row read 1.35 GiB
    # right after the parent had generated the checkpoint, 0.91 GiB from VmHWM).
    res["wait4_maxrss_bytes"] = ru.ru_maxrss * 1024
    log.unlink()
    return res


def _same_checkpoint(d: Path, hidden: int, inter: int, layers: int) -> bool:
    try:
        cfg = json.loads((d / "config.json").read_text())
        shards = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
        return (all((d / f).is_file() for f in shards) and (d / "tokenizer.json").is_file()
                and cfg["hidden_size"] == hidden
                and cfg["intermediate_size"] == inter and cfg["num_hidden_layers"] == layers)
    except (OSError, ValueError, KeyError):
        return False


def fmt_gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| size on disk (GiB) | hidden | intermediate | layers | peak RSS (GiB) | RSS / size | "
            "total (s) | per layer, median (s) | artifact (GiB) | threads |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {fmt_gib(r['disk_bytes'])} | {r['hidden']} | {r['intermediate']} | {r['layers']} | "
                     f"{fmt_gib(r['peak_rss_bytes'])} | {r['peak_rss_bytes'] / r['disk_bytes']:.3f} | "
                     f"{r['total_s']:.0f} | {r['layer_median_s']:.2f} | {fmt_gib(r['out_bytes'])} | {r['threads']} |")
    return "\n".join(lines)


def _replace_block(text: str, name: str, block: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text:
        return text + "\n" + block + "\n"
    pre, rest = text.split(begin, 1)
    return pre + block + rest.split(end, 1)[1]


def write_docs(new_rows: list[dict], meta: dict, series: str = "depth") -> list[dict]:
    """Merge rows into docs/scale.json by (hidden, intermediate, layers); rewrite both tables.
    `meta` describes the runs of `series` (depth: the narrow curve; real-width: 7B-wide layers)."""
    DOCS.mkdir(exist_ok=True)
    path = DOCS / "scale.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    key = lambda r: (r["hidden"], r["intermediate"], r["layers"])  # noqa: E731 - a one-line sort key
    merged = {key(r): r for r in data.get("rows", [])}
    merged.update({key(r): r for r in new_rows})
    rows = sorted(merged.values(), key=lambda r: r["disk_bytes"])
    data["rows"] = rows
    if series != "depth" and "rates" not in meta and "rates" in data.get("meta_real_width", {}):
        meta = {**meta, "rates": data["meta_real_width"]["rates"]}   # until this series measures its own
    data["meta" if series == "depth" else "meta_real_width"] = meta
    path.write_text(json.dumps(data, indent=2))
    md = DOCS / "scale.md"
    text = md.read_text() if md.is_file() else "# Scaling\n"
    depth = [r for r in rows if r.get("series", "depth") == "depth"]
    if depth and data.get("meta"):
        m = data["meta"]
        text = _replace_block(text, "scale", (
            f"<!-- scale:begin -->\n{table(depth)}\n\n"
            f"Measured {m['date']} on {m['cpu']} ({m['ram_gib']:.0f} GiB RAM, 2 cores "
            f"shared with other jobs: timings are noisy), calibration {m['samples']} x {m['seq_len']} "
            f"tokens, ratio 0.4, svd-llm, sequential, evaluation off.\n<!-- scale:end -->"))
    wide = [r for r in rows if r.get("series") == "real-width"]
    if wide and "rates" in data.get("meta_real_width", {}):
        text = _replace_block(text, "scale-width", (
            f"<!-- scale-width:begin -->\n{width_table(wide, data['meta_real_width'], depth)}\n"
            "<!-- scale-width:end -->"))
    md.write_text(text)
    return rows


def predicted(r: dict, rates: dict, r0: float) -> dict:
    """The formula's peak RSS and per-layer time for one measured row (CPU: activations in RAM)."""
    t = layer_terms(r["hidden"], r["intermediate"], r["heads"], r["kv_heads"], tokens=r["samples"] * r["seq_len"],
                    seq=r["seq_len"], batch=8, sqrt_copies=r.get("sqrt_copies"))
    f = t["flops"]
    times = {"forward bf16": f["forward bf16"] / rates["bf16"], "Grams bf16": f["Grams bf16"] / rates["bf16"],
             "fp64 GEMM": f["fp64 GEMM"] / rates["fp64"], "eigh fp64": f["eigh fp64"] / rates["eigh"]}
    return {"rss": r0 + t["peak"] + t["act"], "rss_sum": r0 + sum(t["mem"].values()) + t["act"], "mem": t["mem"],
            "moments": t["moments"], "layer_s": sum(times.values()), "times": times}


def width_table(rows: list[dict], meta: dict, depth: list[dict]) -> str:
    """Measured real-width rows beside the formula's predictions (docs/scale.md)."""
    r0 = min(r["peak_rss_bytes"] for r in depth) if depth else 0.9 * GiB
    rates = meta["rates"]
    head = ("| hidden / intermediate | layers | checkpoint (GiB) | peak RSS measured (GiB) | formula (GiB) | "
            "per layer, wall (s) | formula, wall (s) | per layer, CPU (s) | formula, CPU (s) | total (s) |")
    lines = [head, "|" + "---|" * 10]
    cpu_rates = rates.get("per_cpu_second")
    for r in rows:
        pr = predicted(r, rates, r0)
        cpu_s = statistics.median(r["layer_cpu_s"]) if r.get("layer_cpu_s") else None
        cpu_f = predicted(r, cpu_rates, r0)["layer_s"] if cpu_rates else None
        done = r.get("layers_done", r["layers"])
        layers = f"{r['layers']}" if done == r["layers"] else f"{r['layers']} ({done} compressed, then stopped)"
        total = f"{r['total_s']:.0f}" if done == r["layers"] else "-"
        lines.append(f"| {r['hidden']} / {r['intermediate']} | {layers} | {fmt_gib(r['disk_bytes'])} | "
                     f"{fmt_gib(r['peak_rss_bytes'])} | {fmt_gib(pr['rss'])} | {statistics.median(r['layer_s']):.0f} | "
                     f"{pr['layer_s']:.0f} | {'-' if cpu_s is None else f'{cpu_s:.0f}'} | "
                     f"{'-' if cpu_f is None else f'{cpu_f:.0f}'} | {total} |")
    pr = predicted(rows[0], rates, r0)
    terms = ", ".join(f"{k} {v:.0f} s" for k, v in pr["times"].items())
    mem = ", ".join(f"{k} {v / GiB:.2f}" for k, v in pr["mem"].items())
    rate_s = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items() if isinstance(v, float))
    return "\n".join(lines) + (
        f"\n\nMeasured {meta['date']} on {meta['cpu']}, {meta['threads']} threads under `nice -n 10` on 2 cores "
        f"shared with other jobs, calibration {rows[0]['samples']} x {rows[0]['seq_len']} tokens, ratio 0.4, "
        f"svd-llm, sequential, fp32 checkpoint, 512-token vocabulary, evaluation off. Rates (GFLOPS of wall "
        f"time, measured with the same threads and niceness; {meta.get('rates_note', '')}): {rate_s}. "
        f"The formula's time per layer: {terms}. Its memory terms (GiB): {mem}; R0 = {r0 / GiB:.2f} GiB "
        f"(the narrow curve's smallest peak).")


def measure_rates(threads: int, n: int = 4096) -> dict:
    """Effective CPU rates (FLOP/s) of the formula's four kinds of work, at the given threads:
    bf16 / fp32 / fp64 GEMM (2n x n times n x n) and fp64 eigh (counted as 9 n^3)."""
    import torch

    torch.set_num_threads(threads)

    wall, cpu = {}, {}

    def timed(name, flops, fn, reps):
        fn()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            fn()
        wall[name] = flops * reps / (time.perf_counter() - t)
        cpu[name] = flops * reps / (time.process_time() - c)

    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp64", torch.float64)):
        a, b = torch.randn(2 * n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        timed(name, 4 * n ** 3, lambda a=a, b=b: a @ b, 2)
    g = torch.randn(n, n, dtype=torch.float64)
    g = g @ g.T
    timed("eigh", 9 * n ** 3, lambda: torch.linalg.eigh(g), 1)
    return {**wall, "per_cpu_second": cpu}


# ----------------------------------------------------------------------------- extrapolation

LLAMA = {   # hidden, intermediate, layers, heads, kv heads, vocab (fp16 checkpoints)
    "LLaMA-7B": (4096, 11008, 32, 32, 32, 32000),
    "LLaMA-13B": (5120, 13824, 40, 40, 40, 32000),
    "LLaMA-2-70B": (8192, 28672, 80, 64, 8, 32000),
}
# Assumed rates of one 80 GB H100 (SXM). Peaks: bf16 989, fp32 67, fp64 (tensor) 67 TFLOPS.
GPU = {"bf16": 300e12, "fp32": 40e12, "fp64": 40e12, "eigh": 1.0e12, "disk": 2e9, "context": 0.6 * GiB,
       "host_runtime": 1.5 * GiB}
N_CAL, L_CAL, BATCH = 256, 2048, 8   # SVD-LLM's calibration: 256 x 2048 tokens


def layer_terms(h, inter, heads, kv, ratio=0.4, tokens=N_CAL * L_CAL, seq=L_CAL, batch=BATCH,
                sqrt_copies: int | None = None) -> dict:
    """Bytes and FLOPs of one decoder layer in the streaming loop (see docs/scale.md).

    `mem` are the terms; `moments` the three points where most of them are live at once
    (calibration, the whitening of the widest Gram, the decomposition of the widest linear);
    `peak` the largest. `sqrt_copies`: transient n x n fp64 copies of `gram_sqrt` beyond the
    Gram and its factor (1 when Cholesky succeeds, 2 on the jitter path, which a Gram of fewer
    tokens than its width takes; 4 before the in-place shift). Default: from tokens vs width."""
    hd = h // heads
    lin = [(h, h), (kv * hd, h), (kv * hd, h), (h, h), (inter, h), (inter, h), (h, inter)]   # (m, n)
    P = sum(m * n for m, n in lin) + 2 * h
    kept = sum(int(m * n * (1 - ratio) / (m + n)) * (m + n) for m, n in lin)
    groups = [h, h, h, inter]                       # q/k/v, o, gate/up, down: one Gram each
    mem = {
        "layer fp32": 4 * P,
        "forward copy bf16": 2 * P,
        "factors fp32 + bf16 copy": 6 * kept,
        "Grams fp64": 8 * sum(n * n for n in groups),
        "whitening factors fp64": 8 * sum(n * n for n in groups),
        "decomposition workspace": 8 * (2 * h * inter + 2 * h * h),
        "forward transient": batch * seq * (4 * h + 3 * inter) * 2 + batch * seq * inter * 4 + 12 * inter * inter,
        "rotary kwargs": 2 * tokens * hd * 2,
    }
    if sqrt_copies is None:
        sqrt_copies = 1 if tokens >= inter else 2
    big = max(groups)
    mem["whitening transient (widest Gram)"] = sqrt_copies * 8 * big * big
    live = mem["layer fp32"] + mem["forward copy bf16"] + mem["Grams fp64"]
    share = 1 - h * inter / P                  # factors made before the down projection's whitening
    moments = {
        "calibration": live + mem["forward transient"] + mem["rotary kwargs"],
        "whitening of the widest Gram": live + share * mem["factors fp32 + bf16 copy"]
        + mem["whitening factors fp64"] + mem["whitening transient (widest Gram)"],
        "decomposition of the widest linear": live + mem["factors fp32 + bf16 copy"]
        + mem["whitening factors fp64"] + mem["decomposition workspace"],
    }
    act = 2 * tokens * h * 2                         # in + out streams, bf16
    fl = {
        "forward bf16": 2 * 2 * P * tokens,          # sequential: statistics pass + next-layer pass
        "Grams bf16": 2 * tokens * sum(n * n for n in groups),   # bf16 products (gram_of) with a bf16 forward
        "fp64 GEMM": sum(2 * m * n * n + 2 * m * n * min(m, n) + 2 * (m * n * (1 - ratio) / (m + n)) * m * n
                         for m, n in lin) + sum(n ** 3 / 3 for n in groups),
        "eigh fp64": sum(9 * min(m, n) ** 3 for m, n in lin),
    }
    return {"P": P, "kept": kept, "mem": mem, "moments": moments, "peak": max(moments.values()), "act": act,
            "flops": fl}


def extrapolate(rows: list[dict]) -> str:
    """The extrapolation table for LLaMA-7B/13B/70B on one 80 GB GPU, from the formula and the
    measured runtime baseline (the intercept of the measured peak-RSS curve)."""
    base = min(r["peak_rss_bytes"] for r in rows) if rows else 0.9 * GiB
    lines = ["| model | layers | checkpoint (fp16) | activations N x L x h x 2 streams (bf16) | device peak | "
             "host peak (GPU run) | time per layer (GPU) | total (GPU) | host peak, CPU-only run |",
             "|" + "---|" * 9]
    for name, (h, inter, L, heads, kv, V) in LLAMA.items():
        t = layer_terms(h, inter, heads, kv)
        E = 2 * V * h * 4
        per_layer_mem = t["peak"]
        act_dev = t["act"] if t["act"] <= 0.25 * (80 * GiB - GPU["context"]) else 0
        device = GPU["context"] + E + per_layer_mem + act_dev
        ckpt = 2 * (L * t["P"] + V * h * 2)
        biggest_tensor = max(h * inter, h * h) * 4
        host = base + GPU["host_runtime"] + 2 * t["P"] + 2 * biggest_tensor
        f = t["flops"]
        io = (2 * t["P"] + 4 * t["kept"]) / GPU["disk"]
        t_layer = (f["forward bf16"] / GPU["bf16"] + f["Grams bf16"] / GPU["bf16"] + f["fp64 GEMM"] / GPU["fp64"]
                   + f["eigh fp64"] / GPU["eigh"] + io)
        host_cpu = base + E + per_layer_mem + min(t["act"], 0.25 * 20 * GiB)
        lines.append(f"| {name} | {L} | {ckpt / 1e9:.1f} GB | {t['act'] / GiB:.1f} GiB | {device / GiB:.1f} GiB | "
                     f"{host / GiB:.1f} GiB | {t_layer:.0f} s | {L * t_layer / 60:.0f} min | {host_cpu / GiB:.1f} GiB |")
    return "\n".join(lines)


def write_extrapolation() -> None:
    rows = json.loads((DOCS / "scale.json").read_text())["rows"] if (DOCS / "scale.json").is_file() else []
    md = DOCS / "scale.md"
    block = f"<!-- extrapolation:begin -->\n{extrapolate(rows)}\n<!-- extrapolation:end -->"
    text = md.read_text() if md.is_file() else "# Scaling\n"
    if "<!-- extrapolation:begin -->" in text:
        pre, rest = text.split("<!-- extrapolation:begin -->", 1)
        text = pre + block + rest.split("<!-- extrapolation:end -->", 1)[1]
    else:
        text += "\n" + block + "\n"
    md.write_text(text)
    print(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0, 3.0, 12.1], help="GiB on disk")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, nargs="+",
                    help="layer counts at the given width instead of --sizes (the real-width series)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and artifacts")
    ap.add_argument("--extrapolate", action="store_true", help="only rewrite the extrapolation table")
    ap.add_argument("--rates", action="store_true",
                    help="only measure the CPU rates (at --threads) and rewrite the real-width table")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.extrapolate:
        write_extrapolation()
        return
    if a.rates:
        data = json.loads((DOCS / "scale.json").read_text())
        meta = {**data["meta_real_width"], "rates": measure_rates(a.threads), "threads": a.threads,
                "rates_date": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps(meta["rates"]))
        write_docs([], meta, "real-width")
        return
    if a.child:
        m, o, s, L, t = a.child
        child(m, o, int(s), int(L), int(t))
        return
    import platform

    import psutil

    base = Path(os.environ.get("SCALE_DIR", "/tmp/svdforge-scale"))
    base.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "threads": a.threads,
            "ram_gib": psutil.virtual_memory().total / GiB, "samples": a.samples, "seq_len": a.seq_len}
    per_layer = layer_params(a.hidden, a.intermediate, a.heads, a.kv_heads) * 4
    rows = []
    plan = [(n * per_layer / GiB, n) for n in a.layers] if a.layers else \
        [(size, max(1, round(size * GiB / per_layer))) for size in a.sizes]
    for size, layers in plan:
        tag = f"h{a.hidden}-{layers}l" if a.layers else f"{size}g"
        d, o = base / f"llama-{tag}", base / f"llama-{tag}-out"
        shutil.rmtree(o, ignore_errors=True)
        t0 = time.perf_counter()
        if _same_checkpoint(d, a.hidden, a.intermediate, layers):   # left by an interrupted run
            disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        else:
            shutil.rmtree(d, ignore_errors=True)
            disk = write_checkpoint(d, a.hidden, a.intermediate, layers, a.heads, a.kv_heads)
        t_gen = time.perf_counter() - t0
        print(f"[scale] {size} GiB: {layers} layers, {disk / GiB:.2f} GiB written in {t_gen:.0f} s", flush=True)
        try:
            res = run_one(d, o, a.samples, a.seq_len, a.threads)
        finally:
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(o, ignore_errors=True)
        row = {"target_gib": size, "disk_bytes": disk, "hidden": a.hidden, "intermediate": a.intermediate,
               "layers": layers, "heads": a.heads, "kv_heads": a.kv_heads, "generate_s": t_gen,
               "samples": a.samples, "seq_len": a.seq_len, "series": "real-width" if a.layers else "depth", **res}
        rows.append(row)
        write_docs([row], meta, row["series"])
        print(f"[scale] peak RSS {fmt_gib(row['peak_rss_bytes'])} GiB, total {row['total_s']:.0f} s, "
              f"per layer {row['layer_median_s']:.2f} s", flush=True)
    if a.layers:   # the formula's rates, measured now under the same conditions as the runs
        meta["rates"] = measure_rates(a.threads)
        meta["rates_note"] = "one run each"
        write_docs([], meta, "real-width")
    print(table(write_docs([], meta, "real-width" if a.layers else "depth")))


if __name__ == "__main__":
    main()
