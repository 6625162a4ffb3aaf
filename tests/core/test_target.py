"""Quality-targeted jobs (`svdforge.core.targets.compress_to_target`): the largest ratio meeting a bound.

What is pinned: one calibration and one decomposition per linear serve every probed ratio
(counted), the chosen ratio meets the bound and the next probe above it does not, the one
artifact equals a plain parallel-mode `compress` at the chosen ratio (logits to 1e-5), the
report's `target` section holds every probe, an unmeetable bound fails without writing an
artifact, and bad targets are refused (library and CLI: exit 2, one line).
"""
import dataclasses
import json

import pytest
import torch

from svdforge.core import pipeline
from svdforge.core import targets as targets_mod
from svdforge.core.artifact import load_artifact
from svdforge.core.config import CompressConfig, DataSpec, EvalConfig, QualityTarget, RecoverConfig
from svdforge.core.errors import TargetUnmet, UserError
from svdforge.core.methods import svd_llm
from tests.core.test_cli import run as run_cli

CALIB = DataSpec(split="calibration", samples=4, seq_len=32)
EVAL = EvalConfig(seq_len=32, max_tokens=128, throughput=False)


def config(model, **kw) -> CompressConfig:
    # uniform unless a test names another: the counts of decompositions below are uniform's (loss-aware
    # ranks add the spectra pass's own; tests/core/test_sensitivity.py covers them)
    base = dict(model=str(model), ratio=0.5, allocation="uniform", calibration=CALIB, calibration_mode="parallel",
                calibration_batch_size=2, evaluation=EVAL, stats_cache=False)
    return CompressConfig(**(base | kw))


def test_the_chosen_ratio_meets_the_kl_bound_and_equals_a_plain_compress(tiny_llama, tmp_path, monkeypatch):
    prepared = []
    prepare = svd_llm.SVDLLM.prepare

    def counting_prepare(self, W, stats, fisher):
        prepared.append(W.shape)
        return prepare(self, W, stats, fisher)

    monkeypatch.setattr(svd_llm.SVDLLM, "prepare", counting_prepare)
    cfg = config(tiny_llama)
    out = tmp_path / "target"
    report = targets_mod.compress_to_target(cfg, {"max_teacher_kl": 0.2, "tolerance": 0.1}, out)
    t = report["target"]
    assert len(prepared) == len(report["ranks"])       # one decomposition per linear for every probe
    assert t["metric"] == "teacher_kl" and t["max"] == 0.2 and t["probe_count"] == len(t["probes"]) >= 3
    chosen, (good, bad) = t["chosen"], t["bracket"]
    assert chosen == good == report["target_ratio"] and bad - good <= 0.1
    by_ratio = {p["ratio"]: p for p in t["probes"]}
    assert by_ratio[chosen]["meets"] and by_ratio[chosen]["teacher_kl"] <= 0.2
    assert not by_ratio[bad]["meets"] and by_ratio[bad]["teacher_kl"] > 0.2
    assert all(p["ratio"] <= chosen for p in t["probes"] if p["meets"])
    assert [c["ratio"] for c in t["curve"]] == sorted(by_ratio)
    # the final evaluation is the full one, on the same windows as the probe: the same figure
    assert report["metrics"]["compressed"]["teacher_kl"] == pytest.approx(by_ratio[chosen]["teacher_kl"], rel=1e-6)
    assert t["final"]["meets"] and "samples" in report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["target"]["probes"] == t["probes"] and on_disk["config"]["ratio"] == chosen
    assert not any(p.is_dir() for p in out.iterdir())          # one artifact, in out itself
    single = pipeline.compress(dataclasses.replace(cfg, ratio=chosen), tmp_path / "single")
    assert {n: e["rank"] for n, e in report["ranks"].items()} == {n: e["rank"] for n, e in single["ranks"].items()}
    assert report["params"] == single["params"]
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_artifact(out, verify=True)[0](ids).logits
        b = load_artifact(tmp_path / "single", verify=True)[0](ids).logits
    assert float((a - b).abs().max()) < 1e-5


def test_a_bound_the_largest_ratio_meets_chooses_it(tiny_llama, tmp_path):
    report = targets_mod.compress_to_target(config(tiny_llama), QualityTarget(max_ppl_ratio=50.0, ratio_max=0.9),
                                            tmp_path / "o")
    t = report["target"]
    assert t["chosen"] == 0.9 and [p["ratio"] for p in t["probes"]] == [0.05, 0.9] and t["bracket"] is None
    assert t["probes"][1]["ppl_ratio"] == pytest.approx(report["metrics"]["compressed"]["ppl"]
                                                        / report["metrics"]["dense"]["ppl"])


def test_a_bound_not_even_the_smallest_ratio_meets_fails_without_an_artifact(tiny_llama, tmp_path):
    with pytest.raises(TargetUnmet, match="not met even at the smallest ratio 0.05"):
        targets_mod.compress_to_target(config(tiny_llama), {"max_teacher_kl": 1e-6}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("target", "needle"), [
    ({}, "exactly one"), ({"max_ppl_ratio": 1.5, "max_teacher_kl": 0.5}, "exactly one"),
    ({"max_ppl_ratio": 0}, "positive finite"), ({"max_teacher_kl": -1}, "positive finite"),
    ({"max_ppl_ratio": float("inf")}, "positive finite"), ({"max_ppl_ratio": float("nan")}, "positive finite"),
    ({"max_ppl_ratio": True}, "positive finite"), ({"max_ppl_ratio": "2"}, "positive finite"),
    ({"max_ppl_ratio": 2, "ratio_min": 0.6, "ratio_max": 0.5}, "below"),
    ({"max_ppl_ratio": 2, "ratio_max": 1.0}, "ratio_max"), ({"max_ppl_ratio": 2, "tolerance": 0}, "tolerance"),
    ({"max_ppl_ratio": 2, "max_probes": 1}, "max_probes"), ({"max_ppl_ratio": 2, "budget": 3}, "unknown"),
    ("1.5", "object"),
])
def test_bad_targets_are_refused(target, needle):
    with pytest.raises(UserError, match=needle):
        targets_mod.as_target(target)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"calibration_mode": "sequential"}, "parallel"),
    ({"recover": RecoverConfig(type="update")}, "closed-form update"),
    ({"recover": RecoverConfig(type="lora")}, "without training"),
    ({"evaluation": EvalConfig(enabled=False)}, "evaluation"),
])
def test_what_a_targeted_job_cannot_do_is_refused(tiny_llama, tmp_path, kw, needle):
    with pytest.raises(UserError, match=needle):
        targets_mod.compress_to_target(config(tiny_llama, **kw), {"max_ppl_ratio": 2.0}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


SMALL = ["--calib-samples", 4, "--seq-len", 32, "--eval-max-tokens", 128, "--eval-seq-len", 32,
         "--throughput-runs", 0, "--no-stats-cache", "-q"]


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`svdforge ...` in this process (the subprocess path is pinned by test_cli.py): (exit code, stdout, stderr)."""
    from svdforge.cli.main import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("sys.argv", ["svdforge", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_a_target_with_a_ratio_exits_2_with_one_line(tiny_llama, tmp_path):
    p = run_cli("compress", tiny_llama, "--out", tmp_path / "o", "--ratio", "0.4", "--target-kl", "0.5")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "exactly one" in lines[0] and "Traceback" not in p.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["--ratios", "0.2,0.4", "--target-ppl-ratio", "2"], "exactly one"),
    (["--target-kl", "0.5", "--target-ppl-ratio", "2"], "exactly one"),
    (["--target-kl", "0"], "positive finite"),
    (["--target-kl", "0.5", "--mode", "sequential"], "parallel"),
    (["--target-kl", "0.5", "--target-range", "0.5"], "LO,HI"),
    (["--target-kl", "0.5", "--target-max-probes", "1"], "max_probes"),
    (["--target-kl", "1e-6", *SMALL], "not met even at the smallest ratio"),
])
def test_cli_target_errors_exit_2_with_one_line(tiny_llama, tmp_path, monkeypatch, capsys, args, needle):
    code, _, err = cli(monkeypatch, capsys, "compress", tiny_llama, "--out", tmp_path / "o", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_compresses_to_a_target(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    code, stdout, err = cli(monkeypatch, capsys, "compress", tiny_llama, "--out", out, "--target-ppl-ratio", "50",
                            "--target-range", "0.1,0.8", *SMALL)
    assert code == 0, err
    summary = json.loads(stdout[:stdout.rindex("}") + 1])
    assert summary["target"]["chosen"] == 0.8 and summary["target"]["probe_count"] == 2
    assert json.loads((out / "report.json").read_text())["target_ratio"] == 0.8
