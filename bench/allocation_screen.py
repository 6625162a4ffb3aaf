"""Screen rank allocations on SmolLM2 from ONE spectra + gradient pass (parallel-mode truncations).

Every allocation is a choice of ranks; with the dense model's components (`Truncation.components`:
truncating a linear at rank k is `P[:, :k] Q[:, :k]^T`, tested equal to its factors) every choice can be
applied to the dense model in seconds and evaluated, without a compression per allocation. This is the
parallel-mode truncation (every linear decomposed on the dense model's inputs), not the sequential
compression `bench/quality.py` runs; it ranks allocations against each other cheaply, and the winners
are then measured with `bench/quality.py`.

    python bench/allocation_screen.py --ratios 0.2 0.4 --eval-max-tokens 16384

Prints one row per allocation (PPL, Teacher-KL, parameters against uniform's, linears kept dense) and
writes them as JSON (`--json`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"


def variants(spectra, grads, ratio):
    """name -> ranks for every allocation screened."""
    from svdforge.core.allocation import allocate_loss, allocate_ratio, params_of
    from svdforge.core.linalg import saves_params, uniform_rank
    from svdforge.core.sensitivity import score

    out = {"uniform": {n: (uniform_rank(m, k, ratio) if saves_params(m, k, uniform_rank(m, k, ratio)) else None)
                       for n, (m, k, _) in spectra.items()},
           "global": allocate_ratio(spectra, ratio)[1]["ranks"]}
    for kind in ("fisher", "taylor"):
        scores = {"scores": {n: score(g, kind) for n, g in grads.items()}, "kind": kind, "windows": 0,
                  "gradient_seconds": 0.0}
        out[f"loss@{kind}"] = allocate_loss(spectra, scores, ratio)[1]["ranks"]
    from svdforge.core.allocation import uniform_cost

    shapes = {n: (m, k) for n, (m, k, _) in spectra.items()}
    out["zero-sum"] = zero_sum(spectra, grads, sum(uniform_cost(m, k, ratio) for m, k in shapes.values()))
    return out, {name: params_of(r, shapes) for name, r in out.items()}


def zero_sum(spectra, grads, budget):
    """ZS-SVD's selection rule, as its paper states it: remove tail components one at a time, choosing
    among every linear's current tail the smallest |first-order loss change|, from the sign that pulls
    the running sum of changes back towards zero, until the parameters fit the budget (a linear costs
    min(k (m + n), m n))."""
    import heapq

    state = {n: [min(m, k), m, k] for n, (m, k, _) in spectra.items()}     # rank, m, n
    first = {n: g["first"].tolist() for n, g in grads.items()}
    cost = lambda r, m, n: min(r * (m + n), m * n)                        # noqa: E731
    spent = sum(cost(*st) for st in state.values())
    heaps = {True: [], False: []}

    def push(name):
        r = state[name][0]
        if r > 1:
            d = -first[name][r - 1]               # removing component r-1 changes the loss by -first
            heapq.heappush(heaps[d >= 0], (abs(d), name, r))

    for name in state:
        push(name)
    running = 0.0
    while spent > budget and (heaps[True] or heaps[False]):
        side = running <= 0.0
        heap = heaps[side] if heaps[side] else heaps[not side]
        _, name, r = heapq.heappop(heap)
        st = state[name]
        if st[0] != r:
            continue
        spent -= cost(*st) - cost(r - 1, st[1], st[2])
        running += -first[name][r - 1]
        st[0] = r - 1
        push(name)
    return {n: (None if st[0] * (st[1] + st[2]) >= st[1] * st[2] else st[0]) for n, st in state.items()}


def apply(model, components, ranks, dense_weights):
    import torch

    with torch.no_grad():
        for name, k in ranks.items():
            w = model.get_submodule(name).weight
            if k is None:
                w.copy_(dense_weights[name])
            else:
                P, Q = components[name]
                w.copy_((P[:, :k] @ Q[:, :k].T).to(w.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=16384)
    ap.add_argument("--kl", action="store_true", help="also Teacher-KL (a dense forward per allocation)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import copy

    from svdforge.core.allocation import whitened_spectra
    from svdforge.core.config import DataSpec
    from svdforge.core.data import calibration_windows, evaluation_windows
    from svdforge.core.methods import get_method
    from svdforge.core.models import load_model
    from svdforge.core.pipeline import default_threads
    from svdforge.core.sensitivity import component_gradients

    default_threads()
    model, tok, _ = load_model(args.model)
    calib = calibration_windows(tok, DataSpec(source="file", path=str(SHARED / "valid.txt"),
                                              samples=args.calib_samples, seq_len=args.seq_len, seed=0)).ids
    ev = evaluation_windows(tok, DataSpec(source="file", path=str(SHARED / "test.txt")), args.seq_len,
                            args.eval_max_tokens).ids
    t0 = time.perf_counter()
    spectra, components = whitened_spectra(model, calib, get_method("svd-llm"), keep_components=True)
    t1 = time.perf_counter()
    grads = component_gradients(model, calib, components)
    t2 = time.perf_counter()
    print(f"spectra + components {t1 - t0:.0f} s, gradients {t2 - t1:.0f} s", flush=True)
    dense_weights = {n: model.get_submodule(n).weight.detach().clone() for n in spectra}
    teacher = copy.deepcopy(model) if args.kl else None
    rows = []
    for ratio in args.ratios:
        rows += screen(model, teacher, ev, spectra, grads, components, dense_weights, ratio)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def screen(model, teacher, ev, spectra, grads, components, dense_weights, ratio):
    from svdforge.core.evaluate import compare

    plans, params = variants(spectra, grads, ratio)
    rows = []
    for name, ranks in plans.items():
        apply(model, components, ranks, dense_weights)
        m = compare(teacher, model, ev)["compressed"]
        rows.append({"allocation": name, "ratio": ratio, "ppl": m["ppl"], "teacher_kl": m.get("teacher_kl"),
                     "params_vs_uniform": params[name] / params["uniform"],
                     "kept_dense": sum(k is None for k in ranks.values()), "eval_tokens": m["tokens"]})
        r = rows[-1]
        kl = "-" if r["teacher_kl"] is None else f"{r['teacher_kl']:.3f}"
        print(f"{ratio:.2f} {name:14s} ppl {r['ppl']:9.2f} kl {kl} params x{r['params_vs_uniform']:.4f} "
              f"dense {r['kept_dense']}", flush=True)
    return rows


if __name__ == "__main__":
    main()
