"""Layer-local refinement: a few passes of Adam on one compressed layer, inside the layer loop.

After `Decompose` has put the `LowRankLinear`s of decoder layer l in place, `Refine` trains
that layer alone so that its output on the compressed model's inputs (the `main` stream:
the outputs of the already compressed and refined layers before it) matches the dense
layer's output on the dense model's inputs (the `dense` stream's calibration outputs of
this layer, which the calibration forward has just computed):

    min  sum_b ||layer'_l(X'_b) - layer_l(X_b)||^2 / ||layer_l(X_b)||^2

over the layer's factors `u`, `v` (and the `u` bias), optionally its normalisation weights,
with Adam: one optimizer step per calibration batch (the loop's `batch_size` windows),
`passes` full passes over the windows, batches in a seeded order per pass. The loop then
runs the *refined* layer over the main stream to make the next layer's inputs, so layer
l + 1 is refined against what the refined layer l really outputs. Only this layer and the
loop's activation buffers are in memory (it streams like the rest of the loop), and the
shapes are unchanged (the artifact is the same format, loadable without svdforge).

Cost: per pass, a forward and a backward of one layer over every calibration window (about
three calibration forwards), plus two forwards to measure the error before and after.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from svdforge.core.errors import NumericalError, UserError
from svdforge.core.layer_loop import Handler, LayerInputs, LayerLoop, LayerStep, cast_kwargs, layer_output
from svdforge.core.lowrank import LowRankLinear
from svdforge.core.progress import Reporter
from svdforge.core.statistics import DENSE, MAIN

TRAIN_DTYPE = torch.float32   # refinement always trains in fp32 (a copy when the model is not)


def trainable(layer: nn.Module, norms: bool) -> list[tuple[str, nn.Parameter]]:
    """What refinement trains in `layer`: every `LowRankLinear`'s parameters, and with `norms`
    those of its normalisation modules (any module whose class name contains `Norm`)."""
    out = []
    for name, mod in layer.named_modules():
        if isinstance(mod, LowRankLinear) or (norms and "norm" in type(mod).__name__.lower()):
            out += [(f"{name}.{n}", p) for n, p in mod.named_parameters()]
    return out


class Refine(Handler):
    """The layer loop's refinement step, after `Decompose` (see the module doc).

    Needs the loop's `dense` stream (calibrating, reused) and its `main` stream re-run
    through the decomposed layer (`reuse=False`). `report()` is the run's `refine` entry."""

    needs_forward = True

    def __init__(self, passes: int, lr: float, *, norms: bool = False, seed: int = 0,
                 reporter: Reporter | None = None):
        if not (isinstance(passes, int) and passes >= 1):
            raise UserError(f"refine passes must be an integer >= 1, got {passes!r}")
        if not 0 < lr < 1:
            raise UserError(f"refine lr must be in (0, 1), got {lr!r}")
        self.passes, self.lr, self.norms, self.seed = passes, lr, norms, seed
        self.rep = reporter or Reporter()
        self.layers: list[dict] = []
        self.loop: LayerLoop | None = None

    def on_start(self, loop: LayerLoop) -> None:
        names = {s.name: s for s in loop.streams}
        if DENSE not in names or MAIN not in names or names[MAIN].reuse:
            raise UserError("refine needs the dense stream next to the compressed one (sequential calibration)")
        self.loop = loop

    def on_decompose(self, step: LayerStep) -> None:
        t0 = time.perf_counter()
        streams = {s.name: s for s in self.loop.streams}
        target, inputs = streams[DENSE].pending, streams[MAIN].hidden
        if target is None:
            raise NumericalError(f"{step.name}: refine found no dense outputs (no calibration forward ran)")
        work = step.layer if next(step.layer.parameters()).dtype == TRAIN_DTYPE else \
            copy.deepcopy(step.layer).to(TRAIN_DTYPE)
        params = trainable(work, self.norms)
        entry = {"layer": step.index, "trainable_params": sum(p.numel() for _, p in params)}
        if params:
            batches = list(LayerInputs(inputs, self.loop.kwargs, self.loop.batch_size).batches())
            entry.update(self._train(step, work, params, batches, inputs, target))
            if work is not step.layer:
                with torch.no_grad():
                    for name, p in params:
                        step.layer.get_parameter(name).copy_(p)
        entry["seconds"] = time.perf_counter() - t0
        self.layers.append(entry)

    def _train(self, step: LayerStep, work: nn.Module, params, batches, inputs, target) -> dict:
        """Adam over `passes` seeded passes of the batches; the layer's parameters' flags restored after."""
        flags = [(p, p.requires_grad) for p in work.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        for _, p in params:
            p.requires_grad_(True)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step.index)
        opt = torch.optim.Adam([p for _, p in params], lr=self.lr)
        before, pass_losses = _error(work, batches, inputs, target), []
        try:
            for k in range(self.passes):
                total = 0.0
                for b in torch.randperm(len(batches), generator=gen).tolist():
                    self.rep.check_cancel()
                    with torch.enable_grad():
                        loss = _batch_loss(work, batches[b], inputs, target)
                        if not torch.isfinite(loss):
                            raise NumericalError(f"{step.name}: non-finite refine loss in pass {k + 1}")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    opt.step()
                    total += float(loss.detach())
                pass_losses.append(total / len(batches))
                self._progress(step, k, pass_losses[-1])
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
        return {"error_before": before, "error_after": _error(work, batches, inputs, target),
                "pass_losses": pass_losses}

    def _progress(self, step: LayerStep, k: int, loss: float) -> None:
        n = step.n_layers
        self.rep.progress("svd", (step.index + (k + 1) / self.passes) / n,
                          f"layer {step.index + 1}/{n} refine pass {k + 1}/{self.passes} loss {loss:.4g}",
                          layer=step.index, refine_pass=k + 1, loss=loss)

    def report(self) -> dict:
        """The report's `refine` entry: the options, per-layer errors and seconds, and totals."""
        done = [e for e in self.layers if "error_after" in e]
        mean = (lambda key: sum(e[key] for e in done) / len(done)) if done else (lambda key: None)
        return {"passes": self.passes, "lr": self.lr, "norms": self.norms, "seed": self.seed,
                "objective": "||layer'(X') - layer(X)||^2 / ||layer(X)||^2 per batch (compressed layer on "
                             "compressed-path inputs vs dense layer on dense inputs)",
                "seconds": sum(e["seconds"] for e in self.layers),
                "trainable_params": sum(e["trainable_params"] for e in self.layers),
                "mean_error_before": mean("error_before"), "mean_error_after": mean("error_after"),
                "layers": self.layers}


def _batch(batch, inputs, target) -> tuple[torch.Tensor, dict, torch.Tensor]:
    lo, hi, kw = batch
    return (inputs[lo:hi].to(TRAIN_DTYPE), cast_kwargs(kw, TRAIN_DTYPE), target[lo:hi].to(TRAIN_DTYPE))


def _batch_loss(layer: nn.Module, batch, inputs, target) -> torch.Tensor:
    x, kw, t = _batch(batch, inputs, target)
    y = layer_output(layer(x, **kw))
    return (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)


@torch.no_grad()
def _error(layer: nn.Module, batches, inputs, target) -> float:
    """sum ||layer(X') - T||^2 / sum ||T||^2 over every window (one no-grad forward)."""
    err, energy = 0.0, 0.0
    for batch in batches:
        x, kw, t = _batch(batch, inputs, target)
        y = layer_output(layer(x, **kw))
        err += float((y - t).double().pow(2).sum())
        energy += float(t.double().pow(2).sum())
    return err / energy if energy > 0 else 0.0
