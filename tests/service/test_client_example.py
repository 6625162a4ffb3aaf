"""examples/compress_with_client.py (only the generated client) against `svdforge serve`:
upload, submit, follow, download with sha256 check, metrics; on the tiny model to stay fast."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .test_e2e import server  # noqa: F401 - the module-scoped embedded service fixture

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "compress_with_client.py"


def test_example_runs_against_the_embedded_service(server, tmp_path):  # noqa: F811 - the fixture imported above
    text = tmp_path / "calib.txt"
    lines = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the king speaks of "
             f"honour, love and the sea, and the players answer in verse number {i}." for i in range(400)]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python"),
           "SVDFORGE_API_KEY": (server["data"] / "api_key").read_text().strip()}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", str(server["client"].base_url).rstrip("/"), "--text", str(text),
         "--model", server["model"], "--ratio", "0.4", "--calib-samples", "4", "--calib-seq-len", "32",
         "--eval-max-tokens", "256", "--eval-seq-len", "32", "--out", str(tmp_path / "out"), "--poll", "0.3",
         "--timeout", "240"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server["log"].read_text()[-3000:]
    out = proc.stdout
    assert "uploaded calib.txt" in out
    assert "sha256" in out and "verified" in out
    assert "compressed ppl" in out and "dense PPL" in out
    assert "%" in out  # progress lines
    assert "figure ranks.png: /v1/jobs/" in out and "figure metrics.png" in out  # the report links its figures
    weights = list((tmp_path / "out").rglob("model.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size > 0
