"""The `svdforge` CLI as a user runs it: a subprocess, exit codes, one-line errors."""
import json
import os
import subprocess
import sys

import pytest

SVDFORGE = [sys.executable, "-m", "svdforge.cli.main"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(*args, timeout=300):
    return subprocess.run([*SVDFORGE, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--ratio", "1.5"], "ratio"), (["--ratio", "0"], "ratio"), (["--ratio", "nan"], "ratio"),
    (["--ratio", "0.4", "--method", "magic"], "method"),
    (["--ratio", "0.4", "--calib-file", "/no/such.txt"], "not found"),
    (["--ratio", "0.4", "--sample-tokens", "0"], "--sample-tokens"),
    (["--ratio", "0.4", "--sample-tokens", "257"], "--sample-tokens"),
    (["--ratio", "0.4", "--prompt", ""], "--prompt[0]"),
    (["--ratio", "0.4", *["--prompt", "hi"] * 9], "at most 8"),
    (["--ratio", "0.4", "--refine-passes", "-1"], "refine_passes"),
    (["--ratio", "0.4", "--refine-passes", "2", "--mode", "parallel"], "sequential"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_llama, tmp_path, args, needle):
    p = run("compress", tiny_llama, "--out", tmp_path / "o", *args)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr


def test_unknown_model_exits_2(tmp_path):
    p = run("compress", "nobody/nothing", "--ratio", "0.4", "--out", tmp_path / "o")
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_missing_option_exits_2():
    p = run("compress", "x")
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_compress_then_evaluate(tiny_llama, tmp_path):
    out = tmp_path / "art"
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i} of some calibration text, with words and more words." for i in range(400)))
    p = run("compress", tiny_llama, "--ratio", "0.3", "--out", out, "--calib-file", text, "--calib-samples", 4,
            "--seq-len", 32, "--eval-max-tokens", 256, "--eval-seq-len", 32, "--throughput-runs", 1, "-q")
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "file" and report["calibration"]["samples"] == 4
    assert report["target_ratio"] == 0.3 and report["metrics"]["compressed"]["ppl"] > 1
    for key in ("calibrate", "decompose", "evaluate", "total"):
        assert key in report["timings_s"]
    p = run("evaluate", out, "--eval-max-tokens", 256, "--eval-seq-len", 32, "--throughput-runs", 1, "-q")
    assert p.returncode == 0, p.stderr
    again = json.loads((out / "evaluation.json").read_text())
    assert again["metrics"]["compressed"]["ppl"] == pytest.approx(report["metrics"]["compressed"]["ppl"], rel=1e-5)


def test_compress_completes_the_prompts_it_is_given(tiny_llama, tmp_path):
    out = tmp_path / "art"
    p = run("compress", tiny_llama, "--ratio", "0.4", "--out", out, "--calib-samples", 4, "--seq-len", 32,
            "--eval-max-tokens", 64, "--eval-seq-len", 32, "--throughput-runs", 0, "-q",
            "--prompt", "To be, or not", "--prompt", "Friends, Romans", "--sample-tokens", 5)
    assert p.returncode == 0, p.stderr
    samples = json.loads((out / "report.json").read_text())["samples"]
    assert samples["max_new_tokens"] == 5
    assert [(i["source"], i["prompt"]) for i in samples["items"][-3:]] == \
        [("fixed", "def fibonacci(n):"), ("request", "To be, or not"), ("request", "Friends, Romans")]
    assert "Friends, Romans" in (out / "samples.md").read_text() and f"samples: {out / 'samples.md'}" in p.stdout


def test_out_must_be_empty(tiny_llama, tmp_path):
    (tmp_path / "f").write_text("x")
    p = run("compress", tiny_llama, "--ratio", "0.3", "--out", tmp_path)
    assert p.returncode == 2 and "not an empty folder" in p.stderr


def test_evaluate_rejects_non_artifact(tmp_path):
    p = run("evaluate", tmp_path)
    assert p.returncode == 2 and "not an svdforge artifact" in p.stderr


@pytest.mark.parametrize("args, needle", [
    (["--ratios", "0.2,0.4", "--mode", "sequential"], "parallel"),
    (["--ratio", "0.4", "--ratios", "0.2,0.6"], "--ratios"),
    ([], "--ratio"),
    (["--ratios", "0.4"], "2 to 8"),
    (["--ratios", "0.2,abc"], "--ratios"),
])
def test_sweep_arguments_exit_2_with_one_line(tiny_llama, tmp_path, args, needle):
    p = run("compress", tiny_llama, "--out", tmp_path / "o", *args)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr


def test_compress_a_sweep(tiny_llama, tmp_path):
    out = tmp_path / "sweep"
    p = run("compress", tiny_llama, "--ratios", "0.6,0.3", "--out", out, "--calib-samples", 4, "--seq-len", 32,
            "--eval-max-tokens", 256, "--eval-seq-len", 32, "--throughput-runs", 0, "-q")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.rsplit("\nartifacts:", 1)[0])
    assert summary["calibration_mode"] == "parallel"   # the default for --ratios
    assert [r["target_ratio"] for r in summary["ratios"]] == [0.3, 0.6]
    assert summary["time_s"]["ratio_calibrate_decompose"] < 1
    for folder in ("ratio-0.30", "ratio-0.60"):
        assert (out / folder / "model.safetensors").is_file() and (out / folder / "svdforge.json").is_file()
    assert (out / "ppl_vs_ratio.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((out / "report.json").read_text())
    assert [e["metrics"]["compressed"]["ppl"] > 1 for e in report["sweep"]["ratios"]] == [True, True]


def test_a_refused_architecture_exits_2_with_one_line(tmp_path):
    from svdforge.core.testing import make_tiny_model

    src = make_tiny_model(tmp_path / "gpt2", "gpt2")
    r = subprocess.run([sys.executable, "-m", "svdforge.cli.main", "compress", str(src), "--out", str(tmp_path / "o"),
                        "--ratio", "0.4", "--no-eval"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Conv1D" in lines[0] and "llama" in lines[0]
    assert not (tmp_path / "o").exists()


def test_help_lists_the_supported_architectures():
    r = subprocess.run([sys.executable, "-m", "svdforge.cli.main", "compress", "--help"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert "gemma2" in r.stdout and "gpt_neox" in r.stdout


def test_compress_rounds_ranks_to_a_multiple(tiny_llama, tmp_path):
    out = tmp_path / "art"
    p = run("compress", tiny_llama, "--ratio", "0.4", "--out", out, "--calib-samples", 4, "--seq-len", 32,
            "--rank-multiple", 8, "--no-eval", "-q")
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rank_multiple"] == 8 and report["config"]["rank_multiple"] == 8
    assert all(e["rank"] is None or e["rank"] % 8 == 0 for e in report["ranks"].values())   # None: kept dense
    assert report["rank_rounding"]["used_params"] <= report["rank_rounding"]["budget_params"]


@pytest.mark.parametrize("value", ["0", "1025", "eight"])
def test_a_bad_rank_multiple_exits_2_with_one_line(tiny_llama, tmp_path, value):
    p = run("compress", tiny_llama, "--ratio", "0.4", "--out", tmp_path / "o", "--rank-multiple", value)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "rank_multiple" in lines[0] or "--rank-multiple" in lines[0]


def test_a_rank_multiple_too_large_for_the_ranks_exits_2(tiny_llama, tmp_path):
    p = run("compress", tiny_llama, "--ratio", "0.4", "--out", tmp_path / "o", "--calib-samples", 4,
            "--seq-len", 32, "--rank-multiple", 64, "--no-eval", "-q")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "rank_multiple 64 is too large" in lines[0], p.stderr


def test_an_evaluation_window_longer_than_the_model_exits_2(tiny_llama, tmp_path):
    """The tiny llama has 1024 positions: the pipeline refuses a longer window once it has
    read the config, before loading any weight."""
    p = run("compress", tiny_llama, "--ratio", "0.4", "--out", tmp_path / "o", "--eval-seq-len", "2048",
            "--eval-max-tokens", "4096")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "evaluation.seq_len: 2048 is longer than the model's 1024 positions" in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
