import shutil
import time

import pytest

from svdforge.core.errors import UserError
from svdforge.core.models import load_model, resolve_source


def test_local_folder_loads(tiny_llama):
    model, tok, src = load_model(str(tiny_llama))
    assert src == str(tiny_llama) and model.config.num_hidden_layers == 2 and len(tok) > 100


def test_pickle_weights_refused_unless_allowed(tiny_llama, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_llama, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        resolve_source(str(d))
    assert resolve_source(str(d), allow_pickle=True) == (str(d), None)
    with pytest.raises(UserError, match="pickle"):
        resolve_source(str(d / "pytorch_model.bin"))


def test_hub_id_offline_fails_fast_with_one_line():
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_model("some-org/some-model")
    assert time.perf_counter() - t < 5
    assert "\n" not in str(e.value) and "some-org/some-model" in str(e.value)


@pytest.mark.parametrize("name", ["/no/such/dir", "not a model id!", "missing.gguf"])
def test_unknown_names_are_user_errors(name):
    with pytest.raises(UserError):
        resolve_source(name)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        resolve_source(str(tmp_path))


def test_remote_code_refused_by_default(tiny_llama, tmp_path):
    import json

    d = tmp_path / "remote"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg["model_type"] = "evil-arch"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError):
        load_model(str(d))
