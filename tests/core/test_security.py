"""Code from a checkpoint's author runs only when the user asks for it: pickle weights and a
model's own Python modules are refused by default by the loader and by the `svdforge` CLI.

The remote-code model writes a marker file when its module is imported, so the tests see
whether the code ran, not only which error came back.
"""
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svdforge.core.errors import UserError
from svdforge.core.models import load_model, resolve_source

SVDFORGE = [sys.executable, "-m", "svdforge.cli.main"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def cli(*args):
    return subprocess.run([*SVDFORGE, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def pickled_copy(tiny: Path, dest: Path) -> Path:
    """The tiny model with its weights as a torch pickle (pytorch_model.bin) and no safetensors."""
    shutil.copytree(tiny, dest)
    torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()
    return dest


def remote_code_copy(tiny: Path, dest_parent: Path, marker: Path, model_type: str | None = None) -> Path:
    """The tiny llama with its own code, under an architecture name transformers does not know
    (or under `model_type`: a supported one, as hub models with custom code have)."""
    d = dest_parent / f"custom_{uuid.uuid4().hex[:8]}"  # a fresh module name for every copy
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    model_type = model_type or f"svdforge-test-{d.name}"
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n")
    (d / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return d


def test_pickle_folder_refused_then_loaded_when_allowed(tiny_llama, tmp_path):
    d = pickled_copy(tiny_llama, tmp_path / "pickled")
    with pytest.raises(UserError, match="pickle"):
        load_model(str(d))
    for name in ("weights.pt", "weights.pth", "model.ckpt", "pytorch_model.bin"):
        with pytest.raises(UserError, match="pickle"):
            resolve_source(str(tmp_path / name))
    model, _, _ = load_model(str(d), allow_pickle=True)
    assert model.config.num_hidden_layers == 2


def test_remote_code_does_not_run_unless_trusted(tiny_llama, tmp_path):
    marker = tmp_path / "marker"
    d = remote_code_copy(tiny_llama, tmp_path, marker)
    with pytest.raises(UserError, match="custom code"):
        load_model(str(d))
    assert not marker.exists()
    model, _, _ = load_model(str(d), trust_remote_code=True)
    assert marker.exists() and type(model).__name__ == "CustomLM"


def test_cli_refuses_both_by_default(tiny_llama, tmp_path):
    marker = tmp_path / "marker"
    for model, _needle in ((pickled_copy(tiny_llama, tmp_path / "pickled"), "--allow-pickle"),
                          (remote_code_copy(tiny_llama, tmp_path, marker), "trust_remote_code")):
        p = cli("compress", model, "--ratio", "0.4", "--out", tmp_path / "out")
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        # the unknown architecture is refused before its code could run
        assert ("pickle" in p.stderr or "is not supported. Supported model_type values" in p.stderr), p.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert "--allow-pickle" in cli("compress", "--help").stdout
    assert "--trust-remote-code" in cli("compress", "--help").stdout


def test_cli_flags_let_the_user_opt_in(tiny_llama, tmp_path):
    marker = tmp_path / "marker"
    model = remote_code_copy(tiny_llama, tmp_path, marker, model_type="llama")
    p = cli("compress", model, "--ratio", "0.4", "--out", tmp_path / "out", "--trust-remote-code", "--no-eval",
            "--calib-samples", "4", "--seq-len", "32", "--no-stats-cache", "-q")
    assert marker.exists(), p.stderr
    assert p.returncode == 0, p.stderr
