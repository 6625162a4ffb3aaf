"""Loss-aware scores of singular components: what removing each one costs the model's loss.

Every decomposition svdforge truncates is a sum of rank-1 components, `W = sum_i p_i q_i^T`,
in the order of its scaled spectrum (svd-llm: `p_i = u_i`, `q_i = W^T u_i` with `u_i` the left
singular vectors of `W S`, so removing component i is the projection `u_i u_i^T W`; fwsvd:
`p_i = U_i sigma_i / d`, `q_i = Vh_i`). Truncating at rank k removes the tail. The whitened
spectrum says what each component costs the linear's own output (`sigma_i^2 = sum_t (u_i . y_t)^2`
over the calibration tokens), but not what it costs the model: a direction the loss ignores
and one it depends on look alike, and the currencies of two kinds of linear (a softmax input,
a residual write) cannot be compared (`svdforge.core.allocation`'s module doc measures that).

Here every component is scored in the model's loss, so that one budget can be spent across the
whole model. With `delta_t` the gradient of a window's mean next-token loss with respect to the
linear's output at token t, the directional derivative of that window's loss along component i
is

    g_{s,i} = <dL_s/dW, p_i q_i^T> = sum_{t in s} (p_i . delta_t) (q_i . x_t),

two projections of what the forward and backward passes already compute (no weight gradient,
no m x n matrix per linear). Over the calibration windows s this gives per component

    first_i  = mean_s g_{s,i}        (first order: removing i changes the loss by about -first_i)
    fisher_i = mean_s g_{s,i}^2      (empirical Fisher along the component: the curvature of the
                                      loss there, so removing i costs about T/2 fisher_i, T the
                                      window's scored tokens, as if its tokens' gradients were
                                      independent)

`score` combines them into the estimated loss increase of removing a component (never below 0).
ZS-SVD (mint-vu/Zero-Sum-SVD) uses the first-order term alone and balances its sign during
selection; the Fisher term is what makes a score positive and comparable across linears.

Cost (`svdforge.core.allocation.plan_spectra`): the spectra pass keeps every linear's p and q
(fp32, (m + n) min(m, n) floats per linear: about twice the linears' own size), and one forward
and backward pass of the whole dense model over the calibration windows, in micro-batches of
`GRAD_BATCH` windows; the model must fit in memory (it cannot stream), and the parameters get no
gradients (only activations do). The pass runs in the job's calibration dtype: bf16 under autocast
where the hardware has bf16 matmuls (`calibration_dtype="auto"`), which moves each linear's scores
by about 1% (tests/core/test_sensitivity.py). On SmolLM2-135M with 64 x 512 windows: about
0.6 GiB of components and one extra forward + backward (docs/benchmarks_notes.md has the times).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from svdforge.core.hooks import Hooks
from svdforge.core.progress import Reporter

GRAD_BATCH = 2      # windows per forward + backward (each linear keeps a [B, L, min(m, n)] projection)
SCORES = ("fisher", "taylor", "first-order")


@contextmanager
def _activation_grads(model: nn.Module):
    """Parameters frozen, the input embeddings' output made to require grad: the backward pass
    computes the gradients of the activations only. Restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _Projections:
    """Per linear: sum over windows of g_{s,i} and of g_{s,i}^2, from hooks on its forward. The
    projections run in `dtype` (the pass's compute dtype); their products are summed in fp32."""

    def __init__(self, model: nn.Module, components: dict[str, tuple[torch.Tensor, torch.Tensor]], device,
                 dtype: torch.dtype = torch.float32):
        self.model, self.device, self.dtype = model, device, dtype
        self.P = {n: p.to(device, dtype) for n, (p, _) in components.items()}
        self.Q = {n: q.to(device, dtype) for n, (_, q) in components.items()}
        self.first = {n: torch.zeros(p.shape[1], dtype=torch.float64) for n, p in self.P.items()}
        self.fisher = {n: torch.zeros(p.shape[1], dtype=torch.float64) for n, p in self.P.items()}

    def attach(self, hooks: Hooks) -> None:
        for name in self.P:
            hooks.post(self.model.get_submodule(name), self._hook(name))

    def _hook(self, name: str):
        def fn(_mod, args, out):
            if not out.requires_grad:
                return
            b = (args[0].detach().to(self.dtype) @ self.Q[name]).float()     # [B, L, r]

            def on_grad(grad):
                a = (grad.to(self.dtype) @ self.P[name]).float()             # [B, L, r]
                g = (a * b).sum(dim=1).double().cpu()                         # [B, r]: g_{s,i}
                self.first[name] += g.sum(0)
                self.fisher[name] += g.pow(2).sum(0)
            out.register_hook(on_grad)
        return fn


def component_gradients(model: nn.Module, ids: torch.Tensor, components: dict, device="cpu",
                        reporter: Reporter | None = None, check_cancel=None,
                        dtype: torch.dtype | None = None) -> dict[str, dict]:
    """name -> {"first": mean_s g_{s,i}, "fisher": mean_s g_{s,i}^2, "tokens": T} (module doc), from one
    forward and backward pass of `model` (dense, whole, on `device`) over the windows `ids`.

    `dtype` (None: the model's): the pass's compute dtype. bfloat16 runs the forward, the backward
    and the projections under autocast (the job's calibration dtype, where the hardware has bf16
    matmuls); the loss, the projections' products and their sums stay fp32."""
    rep = reporter or Reporter()
    dtype = dtype or next(model.parameters()).dtype
    low = dtype in (torch.bfloat16, torch.float16) and dtype != next(model.parameters()).dtype
    proj = _Projections(model, components, device, dtype)
    n = ids.shape[0]
    device_type = torch.device(device).type
    with _activation_grads(model), Hooks() as hooks:
        proj.attach(hooks)
        for i in range(0, n, GRAD_BATCH):
            if check_cancel:
                check_cancel()
            batch = ids[i:i + GRAD_BATCH].to(device)
            with torch.autocast(device_type, dtype=dtype, enabled=low):
                logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                   reduction="none").view(batch.shape[0], -1).mean(dim=1).sum()
            loss.backward()           # per-window losses summed: each window's gradient stays its own
            rep.log(f"loss-aware scores: gradients of windows {min(i + GRAD_BATCH, n)}/{n}", "whiten")
    tokens = ids.shape[1] - 1
    return {name: {"first": proj.first[name] / n, "fisher": proj.fisher[name] / n, "tokens": tokens}
            for name in proj.P}


def score(grads: dict, kind: str = "fisher") -> torch.Tensor:
    """Estimated loss increase of removing each component (>= 0), from `component_gradients`' entry."""
    first, fisher, tokens = grads["first"], grads["fisher"], grads["tokens"]
    if kind == "fisher":
        out = 0.5 * tokens * fisher
    elif kind == "taylor":
        out = -first + 0.5 * tokens * fisher
    elif kind == "first-order":
        out = first.abs()
    else:
        raise ValueError(f"unknown score {kind!r}")
    return out.clamp_min(0.0)


def concave(gains: torch.Tensor) -> torch.Tensor:
    """Gains of a prefix, made non-increasing by pooling adjacent violators (each pooled block gets
    its mean): the upper concave envelope of the cumulative gain, which a greedy choice of ranks
    needs (a large gain behind a small one is then reachable). Sums are unchanged."""
    blocks: list[list[float]] = []          # [sum, count]
    for g in gains.tolist():
        blocks.append([g, 1])
        while len(blocks) > 1 and blocks[-1][0] / blocks[-1][1] > blocks[-2][0] / blocks[-2][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out = [s / c for s, c in blocks for _ in range(c)]
    return torch.tensor(out, dtype=torch.float64)
