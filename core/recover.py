"""SPEC stage 3: win back what truncation lost, without changing the compressed shapes.

Two families, one module:

- `update`: SVD-LLM's closed-form least-squares update of `W_u` given `W_v`. It runs inside
  the layer loop (`svdforge.core.decompose.Decompose`: it needs the calibration activations
  of that very layer); the math is `least_squares_update` below and `recover()` only
  summarises what was done.
- `lora` / `adalora`: peft adapters on the two factor linears `u` and `v` of every
  `LowRankLinear` (seed 000: `Delta W_u = B_u A_u`, `Delta W_v = B_v A_v`), trained on
  calibration-style text, then merged into the factors (`merge_and_unload`) so that the
  delivered model has exactly the shapes, parameter count and latency it had before
  (seed 003). peft is imported only here, only while training.

Objective (`RecoverConfig.objective`): `ntp` (next-token cross entropy on the text), `kl`
(KL(p_teacher || p_student) to the dense model's logits, the same quantity as the
Teacher-KL metric), or `both` (their sum).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from svdforge.core.config import UPDATE_MIX, UPDATE_RIDGE
from svdforge.core.errors import NumericalError, UserError
from svdforge.core.lowrank import LowRankLinear
from svdforge.core.progress import Reporter

# AdaLoRA schedule (peft's tinit / tfinal) as fractions of the optimizer steps: 10% warm-up
# at init_r, a cubic budget decrease, and the last 20% at the final budget (the shape of
# the AdaLoRA paper's schedules, which spend roughly these shares on warm-up and fine-tuning).
ADALORA_TINIT = 0.1
ADALORA_TFINAL = 0.2
ADALORA_ORTH_REG = 0.5   # peft's default orth_reg_weight
LOSS_CURVE_POINTS = 200


# ---------------------------------------------------------------------------------------
# closed-form update




# Why the anchored update overshoots at mix 1 here, and AA-SVD's does not.
# Why AA-SVD's anchored closed form (its objective 4, `W X` on `X'` with mix 1) works and
# this one at mix 1 does not. The likely main reason is where X' of a linear *inside* a
# layer comes from. AA-SVD's code compresses a layer's linears in a fixed order and swaps
# each one in before collecting the next one's Grams (running the layer as compressed so
# far), so o_proj's X' already carries q/k/v's correction. Here all of a layer's
# statistics come from one forward of the *dense* layer on the compressed stream: q/k/v
# are each fitted to remove the upstream error at their outputs, and o_proj, fitted on
# inputs that still hold that error, removes it once more (gate/up -> down_proj likewise):
# at mix 1 the chained corrections overshoot. A small experiment (tiny random Llama, 4
# layers, 32 x 64 calibration windows, ratio 0.4, relative error of the final hidden states
# against the dense model) agrees: with every linear updated, the error on the very
# windows it was fitted on falls from 0.910 (mix 0) to 0.730 at mix 0.8 and rises again at
# 1.0 (0.731; held-out 1.037 -> 0.983 -> 0.993), which overfitting alone would not do; with
# only the first linear of each chain compressed (q/k/v and gate/up, so no correction feeds
# another) it falls monotonically up to mix 1 (0.884 -> 0.758; held-out 0.998 -> 0.941).
# Other differences: AA-SVD's solution is a reduced-rank regression (both factors from the
# SVD of the anchored target, so truncation drops weak target directions instead of the
# 1 / sigma_i amplification below), its defaults calibrate on 256 windows, and its default
# run also fine-tunes each layer afterwards (25 Adam steps at lr 1e-4 on the layer-output
# MSE). Calibration size alone does not explain the overshoot: on a synthetic linear
# (n = 256, k = 76, 1% outlier tokens, an upstream error linear in X) mix 1 beat no update
# on held-out tokens from 1,024 calibration tokens on. Intra-layer sequential statistics
# for the update (one forward per chain stage) is the fix this points to; it is not done
# here (not measured on SmolLM2), so `mix` stays the remedy. Layer-local refinement
# (`svdforge.core.refine`) fits the whole layer's output and has no such conflict.

@torch.no_grad()
def least_squares_update(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, G: torch.Tensor,
                         C: torch.Tensor, mix: float = UPDATE_MIX,
                         ridge: float = UPDATE_RIDGE) -> tuple[torch.Tensor, dict]:
    """W_u = argmin  mix ||W X - W_u W_v X'||^2 + (1 - mix) ||W X' - W_u W_v X'||^2  (fp64),
    with the correction ridge-regularised (below).

    X are the linear's inputs in the dense model, X' its inputs on the compressed path (the
    outputs of the already compressed layers before it); G = X' X'^T, C = X X'^T. Both
    terms share the left side, so the normal equations are one k x k SPD solve:
    W_u A = W (mix C + (1 - mix) G) W_v^T with A = W_v G W_v^T, i.e.
    W_u = W G W_v^T A^-1  +  mix W (C - G) W_v^T A^-1   (no-op solution + correction).

    The two targets. SVD-LLM's `whitening_local_update` fits W X' (the dense *weight* on the
    compressed-path inputs), because its W_v comes from the dense model's Grams. Here the
    whitening itself already uses G = X' X'^T (sequential calibration), and then that fit
    is exactly a no-op: with W_v from the top-k whitened directions, W_v G W_v^T = Sigma_k
    and W G W_v^T = U_k Sigma_k^(3/2), so the solution is the W_u we already have (mix = 0).
    Fitting what the dense model actually computes, W X (mix = 1), also corrects the error
    that the earlier compressed layers put into X' - and measured on SmolLM2 it overshoots
    badly (PPL 511 vs 99 without update): its least squares are dominated by the few tokens
    whose dense and compressed activations differ most (the gains reach 7.5x a linear's
    output energy in layer 11's down_proj, where SmolLM2 builds its massive activations),
    and each layer's correction is fitted on them. A small pull towards the dense output
    is what generalises: `mix` shrinks the correction towards the no-op solution, and its
    default UPDATE_MIX was picked by a sweep (core/config.py). Where X = X' (layer 0's
    q/k/v/gate/up) every mix gives the official (no-op) solution.

    Why AA-SVD's anchored closed form works at mix 1 and this one does not: the comment above.

    Ridge. The correction's component along direction i of W_v is divided by sigma_i (A =
    Sigma_k), so the weakest kept directions - the least well estimated ones - get the
    largest corrections. At ratio 0.2 (k large, down to small sigma_i) that overfits the
    calibration set catastrophically: SmolLM2 at 0.2 with 64 x 512 windows, PPL 4235 with
    the plain solve against 55.8 without update (48.1 with the ridge). The correction is
    therefore solved with A + ridge * mean(diag A) * I, which damps the directions whose
    sigma_i is small against the mean and leaves the strong ones nearly untouched; ridge 0
    is the exact least squares.

    Returns the new W_u and {"gain": fraction of the linear's output energy ||W X'||^2 by
    which the mixed objective dropped}.
    """
    if not 0.0 <= mix <= 1.0:
        raise UserError(f"update mix must be in [0, 1], got {mix!r}")
    if not ridge >= 0.0:
        raise UserError(f"update ridge must be >= 0, got {ridge!r}")
    W, u, v, G, C = (t.to(torch.float64) for t in (W, u, v, G, C))
    A = v @ G @ v.T                       # k x k
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    mean_diag = float(A.diagonal().mean().clamp_min(1e-300))
    base = _spd_solve(A + 1e-10 * mean_diag * eye, (W @ G @ v.T).T).T            # the no-op solution
    corr = _spd_solve(A + (ridge + 1e-10) * mean_diag * eye, (mix * (W @ (C - G) @ v.T)).T).T
    new = base + corr
    gain = _gain(W, u, new, A, W @ (mix * C + (1.0 - mix) * G) @ v.T, G)
    if not torch.isfinite(new).all():
        raise NumericalError("the closed-form update produced non-finite factors")
    return new, {"gain": gain}


def _gain(W, u, new, A, B, G) -> float:
    """How much the mixed objective (up to a constant: tr(uu A uu^T) - 2 <uu, B>) dropped from u to
    new, as a fraction of the linear's output energy ||W X'||^2."""
    def objective(uu):
        return float((uu @ A * uu).sum() - 2 * (uu * B).sum())

    energy = float(((W @ G) * W).sum())
    return (objective(u) - objective(new)) / energy if energy > 0 else 0.0


def _spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    L, bad = torch.linalg.cholesky_ex(A)
    if bad.item() != 0:
        return torch.linalg.lstsq(A, B).solution
    return torch.cholesky_solve(B, L)


def update_report(ranks: dict, mix: float) -> dict:
    """What the in-loop update did, from the per-linear entries of `compress_layers`."""
    gains = {n: e["update"]["gain"] for n, e in ranks.items() if "update" in e}
    return {"type": "update", "trainable_params": 0, "updated_linears": len(gains), "mix": mix,
            "ridge": UPDATE_RIDGE,
            "mean_gain": sum(gains.values()) / max(len(gains), 1),
            "target": "mix * W X + (1 - mix) * W X' (dense output / dense weight) on compressed-path inputs X'",
            "gains": gains}


# ---------------------------------------------------------------------------------------
# adapters


def lowrank_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def optimizer_steps(n_windows: int, rc) -> int:
    """Optimizer steps of a run: epochs x ceil(batches / accumulation), capped by max_steps."""
    batches = math.ceil(n_windows / rc.batch_size)
    steps = rc.epochs * math.ceil(batches / rc.grad_accum)
    return min(steps, rc.max_steps) if rc.max_steps is not None else steps


def attach_adapters(model: nn.Module, rc, total_steps: int):
    """Wrap `model` in a peft model with adapters on the `u`/`v` of every LowRankLinear."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    names = lowrank_names(model)
    if not names:
        raise UserError("recovery needs compressed linears, but the model has none")
    targets = [f"{n}.{part}" for n in names for part in ("u", "v")]
    torch.manual_seed(rc.seed)
    if rc.type == "lora":
        cfg = LoraConfig(r=rc.rank, lora_alpha=rc.alpha, lora_dropout=rc.dropout, target_modules=targets,
                         bias="none")
    elif rc.type == "adalora":
        tfinal = max(1, round(ADALORA_TFINAL * total_steps))
        tinit = round(ADALORA_TINIT * total_steps)
        if tinit >= total_steps - tfinal:
            raise UserError(f"AdaLoRA needs room for its budget schedule: {total_steps} optimizer step(s) "
                            "is too few (use at least 3)")
        cfg = AdaLoraConfig(init_r=rc.init_r, target_r=rc.target_r, lora_alpha=rc.alpha,
                            lora_dropout=rc.dropout, target_modules=targets, total_step=total_steps,
                            tinit=tinit, tfinal=tfinal, orth_reg_weight=ADALORA_ORTH_REG, bias="none")
    else:
        raise UserError(f"no adapter for recover type {rc.type!r}")
    return get_peft_model(model, cfg)


def orthogonality_penalty(peft_model) -> torch.Tensor:
    """AdaLoRA's regulariser ||P^T P - I||_F + ||Q Q^T - I||_F, averaged over matrices.

    peft adds it only to a loss the model computes itself (from `labels`); our losses are
    computed here, so this is the same sum as peft's `AdaLoraModel.forward`.
    """
    total, count = None, 0
    for n, p in peft_model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and p.requires_grad and p.numel() > 0:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    return total / count if count else torch.zeros(())


def adapter_loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None,
                 objective: str) -> tuple[torch.Tensor, dict]:
    """Mean next-token loss and/or KL(p_teacher || p_student) per token (nats)."""
    s = logits[:, :-1].float().flatten(0, 1)
    parts: dict[str, torch.Tensor] = {}
    if objective in ("ntp", "both"):
        parts["ntp"] = F.cross_entropy(s, ids[:, 1:].flatten())
    if objective in ("kl", "both"):
        t = torch.log_softmax(teacher_logits[:, :-1].float().flatten(0, 1), -1)
        parts["kl"] = F.kl_div(torch.log_softmax(s, -1), t, log_target=True, reduction="batchmean")
    loss = sum(parts.values())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def train_adapters(peft_model, ids: torch.Tensor, rc, device, rep: Reporter | None = None,
                   teacher: nn.Module | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """AdamW on the adapter parameters; seeded order; AdaLoRA's allocation every step."""
    rep = rep or Reporter()
    if rc.objective in ("kl", "both") and teacher is None:
        raise UserError(f"objective {rc.objective!r} needs the dense teacher")
    total = optimizer_steps(ids.shape[0], rc)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rc.lr, weight_decay=0.0)
    adalora = rc.type == "adalora"
    gen = torch.Generator().manual_seed(rc.seed)
    curve, parts_curve = [], []
    step, micro, acc_loss, acc_parts = 0, 0, 0.0, {}
    peft_model.train()
    t0 = time.perf_counter()
    ctx = (lambda: torch.autocast(device_type=str(device).split(":")[0], dtype=autocast_dtype)) \
        if autocast_dtype is not None else None
    while step < total:
        order = torch.randperm(ids.shape[0], generator=gen)
        batches = [order[i:i + rc.batch_size] for i in range(0, len(order), rc.batch_size)]
        for bi, idx in enumerate(batches):
            loss, parts = _batch_loss(peft_model, ids[idx].to(device), teacher, rc, ctx, step)
            # the last accumulation group of an epoch may be short: weight by its real size
            first = (bi // rc.grad_accum) * rc.grad_accum
            group = min(rc.grad_accum, len(batches) - first)
            (loss / group).backward()
            micro += 1
            acc_loss += float(loss.detach()) / group
            for k, v in parts.items():
                acc_parts[k] = acc_parts.get(k, 0.0) + v / group
            if micro < group:
                continue
            opt.step()
            if adalora:
                peft_model.base_model.update_and_allocate(step)
            opt.zero_grad(set_to_none=True)
            curve.append(acc_loss)
            parts_curve.append(acc_parts)
            rep.progress("recover", (step + 1) / total, f"step {step + 1}/{total} loss {acc_loss:.4f}",
                         step=step + 1, loss=acc_loss)
            rep.check_cancel()
            step, micro, acc_loss, acc_parts = step + 1, 0, 0.0, {}
            if step >= total:
                break
    peft_model.eval()
    return {"steps": step, "training_s": time.perf_counter() - t0, **_curve_report(curve, parts_curve)}


def _batch_loss(peft_model, batch: torch.Tensor, teacher, rc, ctx, step: int) -> tuple[torch.Tensor, dict]:
    """One micro-batch's training loss (and its parts), with AdaLoRA's orthogonality penalty."""
    teacher_logits = None
    if teacher is not None and rc.objective in ("kl", "both"):
        with torch.no_grad():
            teacher_logits = _forward(teacher, batch, ctx)
    logits = _forward(peft_model, batch, ctx)
    loss, parts = adapter_loss(logits, batch, teacher_logits, rc.objective)
    if rc.type == "adalora":
        parts["orth"] = float((orth := orthogonality_penalty(peft_model)).detach())
        loss = loss + ADALORA_ORTH_REG * orth
    if not torch.isfinite(loss):
        raise NumericalError(f"non-finite training loss at step {step}")
    return loss, parts


def _curve_report(curve: list[float], parts_curve: list[dict]) -> dict:
    """The loss curve thinned to at most LOSS_CURVE_POINTS points (the last one always kept)."""
    every = max(1, math.ceil(len(curve) / LOSS_CURVE_POINTS))
    return {"loss_first": curve[0], "loss_last": curve[-1],
            "loss_curve": [[i + 1, curve[i]] for i in range(0, len(curve), every)] + (
                [[len(curve), curve[-1]]] if (len(curve) - 1) % every else []),
            "loss_parts_last": parts_curve[-1]}


def _forward(model, batch, ctx):
    if ctx is None:
        return model(input_ids=batch, use_cache=False).logits
    with ctx():
        return model(input_ids=batch, use_cache=False).logits


def adalora_ranks(peft_model) -> dict[str, int]:
    """Final rank of every adapted module: the non-zero singular values (lora_E) left."""
    out = {}
    for n, m in peft_model.named_modules():
        E = getattr(m, "lora_E", None)
        if isinstance(E, nn.ParameterDict) and "default" in E:
            out[n.removeprefix("base_model.model.")] = int((E["default"] != 0).sum())
    return out


@torch.no_grad()
def merge_adapters(peft_model, shapes: dict[str, tuple[int, int, int]]) -> nn.Module:
    """Merge into the factors and check the module tree is the pre-recovery one.

    shapes: name -> (in, rank, out) of every LowRankLinear before adapters were attached.
    """
    model = peft_model.merge_and_unload()
    for name, (n, k, m) in shapes.items():
        mod = model.get_submodule(name)
        ok = (isinstance(mod, LowRankLinear) and type(mod.u) is nn.Linear and type(mod.v) is nn.Linear
              and tuple(mod.v.weight.shape) == (k, n) and tuple(mod.u.weight.shape) == (m, k))
        if not ok:
            raise NumericalError(f"{name}: merging the adapters changed the module (rank {k} expected)")
    leftover = [n for n, _ in model.named_parameters() if "lora_" in n]
    if leftover:
        raise NumericalError(f"adapter parameters left after merging: {leftover[:3]}")
    if "peft_config" in vars(model):          # instance attribute peft may leave behind
        del model.peft_config
    return model


def recover_with_adapters(model: nn.Module, ids: torch.Tensor, rc, device, rep: Reporter | None = None,
                          teacher: nn.Module | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """Attach, train, merge. `model` is changed in place and keeps its shapes."""
    shapes = {n: (m.in_features, m.rank, m.out_features) for n, m in model.named_modules()
              if isinstance(m, LowRankLinear)}
    params_before = sum(p.numel() for p in model.parameters())
    total = optimizer_steps(ids.shape[0], rc)
    peft_model = attach_adapters(model, rc, total)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    out = {"type": rc.type, "objective": rc.objective, "trainable_params": trainable,
           "optimizer_steps": total, "batch_size": rc.batch_size, "grad_accum": rc.grad_accum,
           "epochs": rc.epochs, "lr": rc.lr, "seed": rc.seed, "adapted_modules": 2 * len(shapes)}
    if rc.type == "lora":
        out.update(rank=rc.rank, alpha=rc.alpha)
    else:
        cfg = peft_model.peft_config["default"]
        out.update(init_r=rc.init_r, target_r=rc.target_r, alpha=rc.alpha, tinit=cfg.tinit, tfinal=cfg.tfinal,
                   orth_reg_weight=ADALORA_ORTH_REG)
    out.update(train_adapters(peft_model, ids, rc, device, rep, teacher, autocast_dtype))
    if rc.type == "adalora":
        out["final_ranks"] = adalora_ranks(peft_model)
        out["final_rank_total"] = sum(out["final_ranks"].values())
    merged = merge_adapters(peft_model, shapes)
    if merged is not model:
        raise NumericalError("merge_and_unload returned a different model object")
    if sum(p.numel() for p in model.parameters()) != params_before:
        raise NumericalError("merging the adapters changed the parameter count")
    for p in model.parameters():
        p.requires_grad_(False)
    return out


def recover(model, tok, config, calib, device, rep: Reporter | None = None, calibration=None,
            teacher: nn.Module | None = None) -> dict:
    """The pipeline's recover stage; returns the report's `recover` entry.

    `update` already ran inside the layer loop (`calibration` is its `CalibrationResult`);
    `lora` / `adalora` train on `config.recover.data` (same sources as calibration) and,
    for a KL objective, load the dense teacher once and free it afterwards (unless the
    caller holds it already and passes it as `teacher`: a sweep does).
    """
    from svdforge.core import data as data_mod
    from svdforge.core.models import load_model

    rc = config.recover
    rep = rep or Reporter()
    out: dict = {}
    if rc.type == "update" or rc.update:
        if calibration is None:
            raise UserError("the closed-form update runs during calibration; no calibration result was given")
        out = update_report(calibration.ranks, rc.update_mix)
    if rc.type in ("none", "update"):
        return out or {"type": rc.type}
    win = data_mod.calibration_windows(tok, rc.data)
    if rc.objective not in ("kl", "both"):
        teacher = None
    elif teacher is None:
        rep.log("loading the dense teacher for distillation", "recover")
        teacher, _, _ = load_model(config.model, config.dtype, device, config.allow_pickle, config.trust_remote_code)
        for p in teacher.parameters():
            p.requires_grad_(False)
    try:
        report = recover_with_adapters(model, win.ids, rc, device, rep, teacher, _autocast(rc, device))
    finally:
        del teacher
    if out:
        report["closed_form_update"] = out
    report["data"] = win.spec
    return report


def _autocast(rc, device) -> torch.dtype | None:
    return None if rc.autocast == "none" else getattr(torch, rc.autocast)
