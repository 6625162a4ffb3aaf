"""Quality / speed table: methods x ratios on SmolLM2 (issue 2 protocol).

Calibration: 64 x 512 tokens from WikiText-2 valid; evaluation: WikiText-2 test at L = 512
(the whole split is ~300k tokens, ~15 min per model on 2 CPU cores: `--eval-max-tokens`
caps it, and the table says which cap was used). Each row runs in its own process, so
`peak_rss_bytes` is that row's peak.

    python bench/quality.py                              # default rows, 32k eval tokens
    python bench/quality.py --rows svd-llm:0.4 svd-llm:0.4:global svd-llm:0.4:uniform:lora
    python bench/quality.py --eval-max-tokens 0          # the whole test split
    python bench/quality.py --rows svd-llm:0.4 --rank-multiple 64   # every rank a multiple of 64

Writes docs/benchmarks.md (markdown table) and docs/benchmarks.json (one object per row;
dense is the row whose method is "dense"). Rows are merged into existing files by key
(method, ratio, allocation, recover, mode, rank_multiple, eval_tokens), so runs can be split up;
a table shows the `rank_multiple` column only where one of its rows rounds its ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
DEFAULT_ROWS = [f"{m}:{r}" for r in (0.2, 0.4) for m in ("svd", "svd-llm", "asvd", "fwsvd")]
COLUMNS = ["method", "ratio", "allocation", "recover", "training", "mode", "ppl", "teacher_kl", "top10_recall", "agreement",
           "compress_s", "peak_rss_bytes", "tokens_per_s", "speedup", "linears_reduction", "eval_tokens"]


def parse_row(spec: str) -> dict:
    parts = spec.split(":")
    method, ratio = parts[0], float(parts[1])
    allocation = parts[2] if len(parts) > 2 else "uniform"
    recover = parts[3] if len(parts) > 3 else "none"   # none | update | lora | adalora | lora+update ...
    row = {"method": method, "ratio": ratio, "allocation": allocation, "recover": recover}
    if len(parts) > 4:
        row["mode"] = parts[4]
    return row


def training_of(recover: str | None, refine: str | None = None) -> str | None:
    """What a row optimises by gradient descent: `none` (closed forms only: truncation, the update),
    `layer` (layer-local refinement against the dense layer's outputs) or `global` (LoRA / AdaLoRA
    trained through the whole model); None for the dense row."""
    if recover is None:
        return None
    if "lora" in recover:          # lora, adalora, lora+update, lora@ntp
        return "global"
    return "layer" if refine else "none"


def config_for(row: dict, args) -> dict:
    calib = {"source": "file", "path": str(args.calib_file), "samples": args.calib_samples,
             "seq_len": args.seq_len, "seed": 0}
    ev = {"data": {"source": "file", "path": str(args.eval_file)}, "seq_len": args.seq_len,
          "max_tokens": args.eval_max_tokens or None, "throughput_runs": args.throughput_runs,
          "throughput_seq_len": 512}
    spec, _, objective = row["recover"].partition("@")   # lora@ntp: this row's training objective
    rtype, _, plus = spec.partition("+")
    rec = {"type": rtype, "update": plus == "update",
           "data": dict(calib, samples=args.train_samples, seq_len=args.train_seq_len, seed=1),
           "batch_size": args.train_batch, "lr": args.train_lr, "autocast": args.train_autocast,
           "objective": objective or args.train_objective, "update_mix": args.update_mix}
    if args.train_steps:
        rec["max_steps"] = args.train_steps
    if row.get("refine_passes"):
        rec.update(refine_passes=row["refine_passes"], refine_lr=args.refine_lr, refine_norms=args.refine_norms)
    allocation, _, score = row["allocation"].partition("@")     # loss@taylor: the loss score's variant
    return {"model": args.model, "ratio": row["ratio"], "method": row["method"], "allocation": allocation,
            "loss_score": score or "fisher",
            "rank_multiple": row.get("rank_multiple", 1), "calibration": calib, "evaluation": ev, "recover": rec,
            "calibration_mode": row.get("mode", args.mode),
            "stats_cache": False}   # every row calibrates: its compress_s is a real calibration


def run_one(config_json: str) -> None:
    """Child process: run one configuration, print its report as JSON on the last line."""
    from svdforge.core.config import CompressConfig
    from svdforge.core.pipeline import compress, default_threads

    default_threads()
    report = compress(CompressConfig.from_dict(json.loads(config_json)))
    print(json.dumps(report))


def row_from_report(row: dict, r: dict) -> tuple[dict, dict]:
    c, d = r["metrics"]["compressed"], r["metrics"]["dense"]
    t = r["timings_s"]
    out = dict(row, training=training_of(row["recover"], row.get("refine")), ppl=c["ppl"], teacher_kl=c["teacher_kl"], top10_recall=c["top10_recall"],
               agreement=c["agreement"], eval_tokens=c["tokens"],
               compress_s=t["calibrate"] + t["decompose"] + t.get("refine", 0.0) + t["recover"], load_s=t["load"],
               peak_rss_bytes=r["peak_rss_bytes"], tokens_per_s=r["throughput"]["compressed"]["tokens_per_s"],
               speedup=r["throughput"].get("speedup"), linears_reduction=r["params"]["linears_reduction"],
               params_reduction=r["params"]["reduction"], mode=r["calibration_mode"],
               params_compressed=r["params"]["compressed"], linears_compressed=r["params"]["linears_compressed"],
               threads=r["threads"])
    if "allocation_info" in r:      # its passes are inside compress_s (the job's calibrate time)
        info = r["allocation_info"]
        out["allocation_s"] = info["seconds"]
        if "gradient_seconds" in info:
            out["allocation_gradient_s"] = info["gradient_seconds"]
        out["kept_dense"] = len(info["kept_dense"])
    if "refine" in r:
        out["refine_info"] = {k: v for k, v in r["refine"].items() if k != "layers"}
        out["refine_s"] = r["timings_s"]["refine"]
    if r.get("recover", {}).get("type", "none") != "none":
        out["recover_info"] = {k: v for k, v in r["recover"].items() if k not in ("loss_curve", "ranks")}
    dense = dict(method="dense", ratio=None, allocation=None, recover=None, training=None, mode=None, ppl=d["ppl"], teacher_kl=0.0,
                 top10_recall=1.0, agreement=100.0, eval_tokens=d["tokens"], compress_s=None,
                 peak_rss_bytes=None, tokens_per_s=r["throughput"]["dense"]["tokens_per_s"], speedup=1.0,
                 linears_reduction=0.0)
    return out, dense


def fmt(v, col):
    if v is None:
        return "-"
    if col == "peak_rss_bytes":
        return f"{v / 2**30:.2f} GiB"
    if col in ("ppl", "compress_s", "tokens_per_s"):
        return f"{v:.2f}" if col == "ppl" else f"{v:.0f}"
    if col in ("teacher_kl", "top10_recall", "speedup", "linears_reduction"):
        return f"{v:.3f}"
    if col == "agreement":
        return f"{v:.2f}"
    return str(v)


def render(rows: list[dict], args) -> None:
    """docs/benchmarks.md: one table per evaluation size, then docs/benchmarks_notes.md."""
    md = ["# Benchmarks", "", "Generated by `bench/quality.py` (SmolLM2-135M-Instruct, calibration "
          f"{args.calib_samples} x {args.seq_len} tokens of WikiText-2 valid, evaluation on WikiText-2 test "
          f"at L = {args.seq_len}; `eval_tokens` = scored tokens, 2 CPU threads, fp32 weights).", ""]
    for n in sorted({r["eval_tokens"] for r in rows}):
        md += [f"## {n} scored evaluation tokens", "", table([r for r in rows if r["eval_tokens"] == n])]
    notes = args.out / "benchmarks_notes.md"
    if notes.is_file():
        md += [notes.read_text()]
    (args.out / "benchmarks.md").write_text("\n".join(md))


def table(rows: list[dict]) -> str:
    cols = COLUMNS
    if any(r.get("rank_multiple", 1) != 1 for r in rows):
        cols = cols[:3] + ["rank_multiple"] + cols[3:]
    if any(r.get("refine") for r in rows):
        cols = cols[:cols.index("recover") + 1] + ["refine"] + cols[cols.index("recover") + 1:]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(_value(r, c), c) for c in cols) + " |" for r in rows) + "\n"


def _value(r: dict, col: str):
    if col == "rank_multiple" and r["method"] != "dense":
        return r.get(col, 1)
    return r.get(col)


def key(r: dict) -> tuple:
    return (r["method"], r["ratio"], r["allocation"], r["recover"], r.get("mode"), r.get("rank_multiple", 1),
            r["eval_tokens"], r.get("refine", "-"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS,
                    help="method:ratio[:allocation[:recover[:mode]]], e.g. svd-llm:0.4:global:lora:sequential; "
                         "recover lora+update runs the closed-form update first, lora@ntp sets the objective")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-file", type=Path, default=SHARED / "valid.txt")
    ap.add_argument("--eval-file", type=Path, default=SHARED / "test.txt")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=32768, help="0: the whole split")
    ap.add_argument("--throughput-runs", type=int, default=7)
    ap.add_argument("--mode", default="sequential")
    ap.add_argument("--rank-multiple", type=int, default=1,
                    help="round every rank to a multiple of N within the same parameters (1: no rounding)")
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=40, help="optimizer steps of lora/adalora rows")
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-seq-len", type=int, default=256)
    ap.add_argument("--train-lr", type=float, default=5e-4)
    ap.add_argument("--train-autocast", default="bfloat16")
    ap.add_argument("--train-objective", default="kl", help="ntp | kl | both")
    ap.add_argument("--update-mix", type=float, default=0.2, help="closed-form update's target mix")
    ap.add_argument("--refine-passes", type=int, default=0, help="layer-local refinement passes (0: off)")
    ap.add_argument("--refine-lr", type=float, default=3e-4, help="refinement's Adam step size")
    ap.add_argument("--refine-norms", action="store_true", help="refinement also trains the norm weights")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--render", action="store_true", help="only rewrite benchmarks.md from benchmarks.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return run_one(args.one)

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "benchmarks.json"
    existing = json.loads(json_path.read_text()) if json_path.is_file() else []
    for r in existing:                       # rows written before the column: derived from `recover`
        r.setdefault("training", training_of(r["recover"], r.get("refine")))
    results = {key(r): r for r in existing}
    if args.render:
        return render(existing, args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for spec in args.rows:
        row = parse_row(spec)
        if args.rank_multiple != 1:
            row["rank_multiple"] = args.rank_multiple
        if args.refine_passes:
            row["refine_passes"] = args.refine_passes
            row["refine"] = f"{args.refine_passes}x lr {args.refine_lr:g}" + (" +norms" if args.refine_norms else "")
        cfg = json.dumps(config_for(row, args))
        t = time.perf_counter()
        with tempfile.TemporaryFile("w+") as err:
            p = subprocess.run([sys.executable, __file__, "--one", cfg], stdout=subprocess.PIPE, stderr=err,
                               text=True, env=env)
            if p.returncode != 0:
                err.seek(0)
                print(f"{spec}: FAILED (exit {p.returncode})\n{err.read()[-3000:]}", file=sys.stderr)
                continue
        r, dense = row_from_report(row, json.loads(p.stdout.strip().splitlines()[-1]))
        results[key(r)] = r
        results[key(dense)] = dense          # its throughput from the latest run (PPL is deterministic)
        print(f"{spec}: ppl {r['ppl']:.2f} kl {r['teacher_kl']:.3f} compress {r['compress_s']:.0f}s "
              f"rss {r['peak_rss_bytes'] / 2**30:.2f} GiB speedup {r['speedup']:.2f} "
              f"(wall {time.perf_counter() - t:.0f}s)", flush=True)
        rows = sorted(results.values(), key=lambda r: (r["eval_tokens"], r["method"] != "dense", r["ratio"] or 0,
                                                       r["method"], r["allocation"] or "", r["recover"] or "",
                                                       r.get("rank_multiple", 1)))
        json_path.write_text(json.dumps(rows, indent=1))
        render(rows, args)
    print(table(sorted(results.values(), key=lambda r: (r["eval_tokens"], r["method"] != "dense",
                                                         r["ratio"] or 0, r["method"]))))


if __name__ == "__main__":
    main()
