"""The architecture matrix: each row a tiny random config, compressed, then loaded by plain
transformers in a subprocess where svdforge cannot be imported (README's table)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdforge.core import architectures, compress
from svdforge.core.artifact import check_saved, load_artifact, remote_code_sha256
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig, RecoverConfig
from svdforge.core.errors import UserError
from svdforge.core.hf import modeling_svdforge
from svdforge.core.testing import MATRIX, make_tiny_model

HF_GENERATE = Path(__file__).parents[1] / "serving" / "hf_generate.py"
SUPPORTED = [a for a in MATRIX if a in architectures.SUPPORTED]
REFUSED = [a for a in MATRIX if a in architectures.REFUSED]


def test_the_matrix_is_the_registry():
    assert set(MATRIX) == set(architectures.SUPPORTED) | set(architectures.REFUSED)
    for arch in architectures.SUPPORTED.values():  # the remote code has the classes config.json names
        for suffix in ("Model", "ForCausalLM"):
            assert hasattr(modeling_svdforge, arch.remote_class(suffix))


def _greedy(model, ids, n):
    sys.path.insert(0, str(HF_GENERATE.parent))
    try:
        from hf_generate import greedy
    finally:
        sys.path.pop(0)
    return greedy(model, ids, n)


def _plain_transformers(out: Path, ids: list[int], n: int) -> dict:
    cmd = [sys.executable, str(HF_GENERATE), str(out), str(n), json.dumps(ids), "--block-svdforge"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def matrix_root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("arch", SUPPORTED)
def test_artifact_loads_in_plain_transformers(matrix_root, arch):
    src = make_tiny_model(matrix_root / arch, arch)
    out = matrix_root / f"{arch}-out"
    report = compress(CompressConfig(model=str(src), ratio=0.4, evaluation=EvalConfig(enabled=False)), out)
    assert report["post_save_check"]["passed"]
    # the default job (allocation auto -> loss) may keep some linears dense: the artifact mixes both kinds
    assert report["allocation"] == "loss" and report["params"]["linears_reduction"] > 0.35
    assert len(report["params"]["linears_kept_dense"]) < len(report["ranks"]) // 2
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"svdforge_{arch}" and config["svdforge"]["base_model_type"] == arch
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert remote_code_sha256() == {n: json.loads((out / "svdforge.json").read_text())["remote_code"][n]
                                    for n in ("configuration_svdforge.py", "modeling_svdforge.py")}

    ids = list(range(3, 19))
    plain = _plain_transformers(out, ids, 32)
    assert not plain["svdforge_importable"]
    assert plain["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                     "error_msgs": []}
    assert plain["class"] == f"Svdforge{architectures.SUPPORTED[arch].classes}ForCausalLM"
    assert "contains custom code" in plain["without_remote_code"]  # raises: never a random model

    model, _ = load_artifact(out, verify=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = model(input_ids=x).logits[0]
    assert torch.allclose(ours, torch.tensor(plain["logits"]), atol=1e-5, rtol=0)
    assert _greedy(model, x, 32) == plain["greedy"]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_streamed_artifact_is_the_same_format(matrix_root, arch):
    src = make_tiny_model(matrix_root / f"{arch}-s", arch)
    mem, streamed = matrix_root / f"{arch}-mem", matrix_root / f"{arch}-streamed"
    ev = EvalConfig(max_tokens=512, throughput=False)
    # uniform ranks for both: a streamed job cannot take the default's loss-aware ranks
    a = compress(CompressConfig(model=str(src), ratio=0.4, allocation="uniform", evaluation=ev), mem)
    b = compress(CompressConfig(model=str(src), ratio=0.4, allocation="uniform", evaluation=ev, streaming="on"),
                 streamed)
    assert b["post_save_check"]["passed"] and b["post_save_check"]["tensors"] > 0
    assert json.loads((mem / "config.json").read_text()) == json.loads((streamed / "config.json").read_text())
    assert b["metrics"]["compressed"]["ppl"] == pytest.approx(a["metrics"]["compressed"]["ppl"], rel=1e-4)


@pytest.mark.parametrize("arch,words", [("gpt2", "Conv1D"), ("mixtral", "experts"), ("qwen2_moe", "experts")])
def test_refused_architectures_say_why_before_any_work(matrix_root, arch, words):
    src = make_tiny_model(matrix_root / arch, arch)
    with pytest.raises(UserError, match=words) as e:
        compress(CompressConfig(model=str(src), ratio=0.4, evaluation=EvalConfig(enabled=False)),
                 matrix_root / f"{arch}-out")
    assert "llama, mistral" in str(e.value)
    assert not (matrix_root / f"{arch}-out").exists()


def test_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(UserError, match=r"'bert' is not supported\. Supported model_type values: llama"):
        architectures.require("bert")
    with pytest.raises(UserError, match="already an svdforge artifact"):
        architectures.require("svdforge_llama")


def test_post_save_check_catches_an_artifact_that_does_not_reproduce_the_model(tiny_llama, tmp_path):
    from svdforge.core.artifact import ArtifactCheckError

    out = tmp_path / "out"
    compress(CompressConfig(model=str(tiny_llama), ratio=0.4, evaluation=EvalConfig(enabled=False)), out)
    model, _ = load_artifact(out)
    with torch.no_grad():
        next(m for m in model.modules() if hasattr(m, "rank")).u.weight.mul_(1.5)
    with pytest.raises(ArtifactCheckError, match="logits differ"):
        check_saved(out, model, torch.arange(3, 19)[None], "cpu")


def test_readme_gives_the_remote_code_sha256():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name, digest in remote_code_sha256().items():
        assert f"| `{name}` | `{digest}` |" in readme, f"README's sha256 of {name} is stale"


def test_readme_matrix_is_the_registry():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for model_type in MATRIX:
        status = "supported" if model_type in architectures.SUPPORTED else "refused"
        assert any(line.startswith(f"| `{model_type}` |") and f"| {status} |" in line for line in readme.splitlines())


def test_the_tensor_parallel_plan_is_written_at_factor_level():
    from svdforge.core.artifact import factored_tp_plan

    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
            "layers.*.mlp.down_proj": "rowwise", "embed_in": "embedding_rowwise"}
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.o_proj": 8}
    assert factored_tp_plan(plan, ranks, "model") == {
        "layers.*.self_attn.q_proj.u": "colwise",      # output split: u's rows
        "layers.*.self_attn.o_proj.v": "rowwise",      # input split: v's columns, then all-reduce
        "layers.*.mlp.down_proj": "rowwise",           # kept dense everywhere: the linear's own entry
        "embed_in": "embedding_rowwise"}


def test_max_positions_reads_the_config():
    from svdforge.core.architectures import max_positions, require_positions

    assert max_positions({"max_position_embeddings": 2048}) == 2048
    assert max_positions({"n_positions": 1024}) == 1024  # GPT-2
    assert max_positions({"text_config": {"max_position_embeddings": 512}}) == 512
    assert max_positions({}) is None and max_positions({"max_position_embeddings": None}) is None
    require_positions({"calibration.seq_len": 2048}, {"max_position_embeddings": 2048})  # fits exactly
    require_positions({"calibration.seq_len": 10**6}, {})  # nothing known: the loader is the judge
    with pytest.raises(UserError, match=r"^evaluation.seq_len: 2049 is longer than the model's 2048 positions"):
        require_positions({"calibration.seq_len": 8, "evaluation.seq_len": 2049}, {"max_position_embeddings": 2048})


@pytest.mark.parametrize(("kw", "field"), [
    ({"calibration": DataSpec(samples=2, seq_len=1025)}, "calibration.seq_len"),
    ({"evaluation": EvalConfig(seq_len=1100, max_tokens=2200)}, "evaluation.seq_len"),
    ({"recover": RecoverConfig(type="lora", data=DataSpec(seq_len=4096))}, "recover.data.seq_len"),
])
def test_the_pipeline_refuses_windows_longer_than_the_model(tiny_llama, tmp_path, kw, field):
    cfg = CompressConfig(**{"model": str(tiny_llama), "ratio": 0.4, "calibration": DataSpec(samples=2, seq_len=16),
                            **kw})
    events = []
    with pytest.raises(UserError, match=rf"^{field}: .* than the model's 1024 positions"):
        compress(cfg, tmp_path / "out", progress=events.append)
    assert not any(e["type"] == "stage_finished" for e in events)  # refused before the model was loaded
