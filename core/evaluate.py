"""SPEC stage 4: how much the compressed model lost, measured against the dense teacher.

All metrics are over the same scored positions: in each window of L tokens the L-1
positions that predict a next token. Non-finite logits raise `NumericalError`; nothing is
skipped. Every loop here takes `check_cancel` (a callable that raises `Cancelled`, e.g.
`Reporter.check_cancel`) and calls it before each batch, timed run or generated token, so a
cancelled job stops within one forward whatever the size of its evaluation.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from svdforge.core.checkpoint import CheckpointReader, materialize, release
from svdforge.core.errors import NumericalError, UserError
from svdforge.core.layer_loop import Handler, LayerLoop, LayerStep, Stream
from svdforge.core.layers import decoder_layers
from svdforge.core.lowrank import LowRankLinear

CheckCancel = Callable[[], None] | None


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    if not torch.isfinite(out).all():
        raise NumericalError("the model produced non-finite logits")
    return out


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, device="cpu",
               on_batch: Callable[[float], None] | None = None, check_cancel: CheckCancel = None) -> dict:
    nll, count = 0.0, 0
    for lo in range(0, windows.shape[0], batch_size):
        _check(check_cancel)
        batch = windows[lo:lo + batch_size].to(device)
        logits = _logits(model, batch)
        nll += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
        if on_batch:
            on_batch(min(lo + batch_size, windows.shape[0]) / windows.shape[0])
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


@torch.no_grad()
def compare(teacher: nn.Module | None, student: nn.Module, windows: torch.Tensor, batch_size: int = 1,
            device="cpu", on_batch: Callable[[float], None] | None = None, topk: int = 10,
            check_cancel: CheckCancel = None) -> dict:
    """Perplexity of both models and the student's fidelity to the teacher, in one pass.

    teacher_kl: mean over tokens of KL(p_teacher || p_student) in nats; top10_recall: mean
    |top10(t) & top10(s)| / 10; agreement (ARR): % of tokens whose top-1 matches.
    """
    if teacher is None:
        return {"compressed": perplexity(student, windows, batch_size, device, on_batch, check_cancel)}
    acc = Fidelity(topk)
    for lo in range(0, windows.shape[0], batch_size):
        _check(check_cancel)
        batch = windows[lo:lo + batch_size].to(device)
        acc.add(_logits(teacher, batch), _logits(student, batch), batch)
        if on_batch:
            on_batch(min(lo + batch_size, windows.shape[0]) / windows.shape[0])
    return acc.result()


class Fidelity:
    """Running sums of `compare`'s metrics over batches of (teacher, student) logits, so that
    logits computed any way (whole models, or streamed layer by layer) give the same figures."""

    def __init__(self, topk: int = 10, chunk: int = 128):
        self.topk, self.chunk = topk, chunk
        self.sums = {"t_nll": 0.0, "s_nll": 0.0, "kl": 0.0, "top": 0.0, "agree": 0.0}
        self.count = 0

    def add(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, batch: torch.Tensor) -> None:
        """Logits [B, L-1, V] of the positions that predict batch[:, 1:].

        Works through `chunk` positions at a time: the log-softmaxes and the KL terms of a
        whole 512-token window over a 49k vocabulary are ~100 MB each, and holding five of
        them at once was the peak of a job's memory.
        """
        for lg in (teacher_logits, student_logits):
            if not torch.isfinite(lg).all():
                raise NumericalError("the model produced non-finite logits")
        sums, topk = self.sums, self.topk
        labels = batch[:, 1:]
        for b in range(labels.shape[0]):
            for lo in range(0, labels.shape[1], self.chunk):
                y = labels[b, lo:lo + self.chunk]
                lt = torch.log_softmax(teacher_logits[b, lo:lo + self.chunk].float(), -1)
                ls = torch.log_softmax(student_logits[b, lo:lo + self.chunk].float(), -1)
                sums["t_nll"] += float(F.nll_loss(lt, y, reduction="sum"))
                sums["s_nll"] += float(F.nll_loss(ls, y, reduction="sum"))
                sums["kl"] += float(F.kl_div(ls, lt, reduction="sum", log_target=True))
                tt, ts = lt.topk(topk, -1).indices, ls.topk(topk, -1).indices
                sums["top"] += float((tt[:, :, None] == ts[:, None, :]).any(-1).sum()) / topk
                sums["agree"] += float((tt[:, 0] == ts[:, 0]).sum())
        self.count += labels.numel()

    def result(self) -> dict:
        sums, count = self.sums, self.count
        return {
            "dense": {"ppl": math.exp(sums["t_nll"] / count), "nll": sums["t_nll"] / count, "tokens": count},
            "compressed": {"ppl": math.exp(sums["s_nll"] / count), "nll": sums["s_nll"] / count, "tokens": count,
                           "teacher_kl": sums["kl"] / count, "top10_recall": sums["top"] / count,
                           "agreement": 100.0 * sums["agree"] / count},
        }


def _check(check_cancel: CheckCancel) -> None:
    if check_cancel is not None:
        check_cancel()


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def matmul_params(model: nn.Module) -> int:
    """Weights that take part in a matmul for every token (all linears, lm_head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, context: int) -> int:
    """Forward FLOPs per token at a given context: 2 x matmul weights + attention scores.

    Attention adds 2 (QK^T) + 2 (AV) multiply-adds per head dim per attended token; with a
    causal mask a token attends to (context + 1) / 2 tokens on average. Norms, activations
    and softmax are ignored (well under 1%).
    """
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // max(heads, 1))
    attn = 4 * cfg.num_hidden_layers * heads * head_dim * (context + 1) / 2
    return int(2 * matmul_params(model) + attn)


@torch.no_grad()
def throughput(models: dict[str, nn.Module], vocab: int, seq_len: int = 512, runs: int = 5,
               device="cpu", seed: int = 0, check_cancel: CheckCancel = None) -> dict:
    """Forward tokens/s at batch 1 x seq_len, models interleaved run by run, median of `runs`."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (1, seq_len), generator=g).to(device)
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        _check(check_cancel)
        m(input_ids=batch, use_cache=False)
    for _ in range(runs):
        for name, m in models.items():
            _check(check_cancel)
            if device != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            m(input_ids=batch, use_cache=False)
            if device != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    out = {name: {"tokens_per_s": seq_len / statistics.median(ts), "median_s": statistics.median(ts),
                  "runs": runs} for name, ts in times.items()}
    out["seq_len"], out["threads"] = seq_len, torch.get_num_threads()
    return out


# Completed greedily in every report, before the request's own prompts: neutral and short, so
# that a glance at `samples.md` shows whether the compressed model still speaks.
FIXED_PROMPTS = ("The capital of France is", "Once upon a time,", "def fibonacci(n):")


@torch.no_grad()
def greedy_samples(models: dict[str, nn.Module], tokenizer, prompts: list[str], max_new_tokens: int,
                   device="cpu", check_cancel: CheckCancel = None) -> dict:
    """The report's `samples`: each model's greedy completion (new text only) of the fixed
    prompts, then of `prompts`. Every model stops on the first model's end-of-text tokens; the
    KV cache is on for the call (the pipeline's models have `use_cache=False`) and restored.
    `check_cancel` runs before every generated token (a stopping criterion that raises)."""
    gen = next(iter(models.values())).generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    items = [{"prompt": p, "source": "fixed"} for p in FIXED_PROMPTS]
    items += [{"prompt": p, "source": "request"} for p in prompts]
    stopping = _cancel_criteria(check_cancel)
    for name, model in models.items():
        cached, model.config.use_cache = model.config.use_cache, True
        try:
            for item in items:
                enc = tokenizer(item["prompt"], return_tensors="pt")  # ids and mask only (no token_type_ids)
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                _check(check_cancel)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, use_cache=True, eos_token_id=eos, pad_token_id=pad,
                                     stopping_criteria=stopping)
                item[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        finally:
            model.config.use_cache = cached
    return {"max_new_tokens": max_new_tokens, "items": items}


def _cancel_criteria(check_cancel: CheckCancel):
    """A `StoppingCriteriaList` whose one criterion calls `check_cancel` at every generated token
    (its `Cancelled` leaves `generate`); None without a check."""
    if check_cancel is None:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CancelCriterion(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            check_cancel()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CancelCriterion()])


def compressed_linear_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters())


def zero_shot(model, tokenizer, tasks: list[str], offline: bool) -> dict:
    """lm-evaluation-harness accuracy on the in-memory model, or why it was skipped."""
    if not tasks:
        return {"skipped": True, "reason": "no zero-shot tasks requested"}
    if importlib.util.find_spec("lm_eval") is None:
        return {"skipped": True, "tasks": tasks,
                "reason": "lm-evaluation-harness is not installed (pip install lm-eval)"}
    if offline:
        return {"skipped": True, "tasks": tasks, "reason": "offline: the task datasets cannot be downloaded"}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=tasks, num_fewshot=0)
    return {"skipped": False, "results": {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                                          for t, r in res["results"].items()}}


class _LayerProgress(Handler):
    def __init__(self, on_fraction: Callable[[float], None] | None, share: float):
        self.on_fraction, self.share = on_fraction, share

    def on_layer_done(self, step: LayerStep) -> None:
        if self.on_fraction:
            self.on_fraction(self.share * (step.index + 1) / step.n_layers)


def _from_checkpoint(job, layers: nn.ModuleList, reader: CheckpointReader):
    """A stream's module: layer i read from `reader` for its forward, then sent back to meta."""
    @contextmanager
    def module(step: LayerStep):
        layer = layers[step.index]
        materialize(layer, step.name, reader, job.dtype, job.device, job.model.config)
        try:
            yield layer
        finally:
            release(layer)
    return module


@torch.no_grad()
def compare_streamed(job, windows: torch.Tensor, batch_size: int, on_batch=None, reporter=None) -> dict:
    """`compare` for a streamed model (a `svdforge.core.streaming.StreamingJob`): the teacher's
    and the student's hidden states of the evaluation windows go through the layer loop one
    decoder layer at a time (dense layer from the checkpoint, compressed layer from the
    artifact just written), then the final norm and `lm_head`. Holds two [N, L, hidden]
    streams and one spare (offloaded past the budget) and one layer. Assumes logits =
    lm_head(norm(h)), soft-capped where the config says so (Gemma-2). `reporter`'s
    `check_cancel` runs before every batch of every layer and of the logits."""
    model = job.model
    layers, _ = decoder_layers(model)
    streams = [Stream("teacher", calibrate=False, reuse=False,
                      module=_from_checkpoint(job, job.dense_layers, job.reader)),
               Stream("student", calibrate=False, reuse=False,
                      module=_from_checkpoint(job, layers, CheckpointReader(job.out)))]
    LayerLoop(model, [_LayerProgress(on_batch, 0.9)], ids=windows, batch_size=batch_size, device=job.device,
              streams=streams, activations=job.store, reporter=reporter).run()
    base = getattr(model, model.base_model_prefix)
    norm = next((getattr(base, a) for a in ("norm", "final_layernorm", "ln_f") if hasattr(base, a)), None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise UserError("streaming evaluation cannot find the final norm / lm_head of this architecture")
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(h):
        z = head(norm(h))[:, :-1]
        return torch.tanh(z / cap) * cap if cap else z

    acc = Fidelity()
    teacher, student = streams[0].hidden, streams[1].hidden
    for lo in range(0, windows.shape[0], batch_size):
        if reporter is not None:
            reporter.check_cancel()
        hi = min(lo + batch_size, windows.shape[0])
        acc.add(logits(teacher[lo:hi]), logits(student[lo:hi]), windows[lo:hi].to(job.device))
    return acc.result()
