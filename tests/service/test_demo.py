"""`make run`'s demo (cli/demo.py): what it prints from a job's report."""
from __future__ import annotations

from svdforge.cli.demo import print_samples


def test_demo_prints_dense_and_compressed_samples(capsys):
    print_samples({"samples": {"max_new_tokens": 4, "items": [
        {"prompt": "Once upon a time,", "source": "fixed", "dense": " there was", "compressed": " the the\nthe"}]}})
    out = capsys.readouterr().out
    assert "up to 4 new tokens" in out and "[fixed] 'Once upon a time,'" in out
    assert "dense      ' there was'" in out and "compressed ' the the\\nthe'" in out


def test_demo_says_why_there_are_no_samples(capsys):
    print_samples({"samples": {"skipped": True, "reason": "streaming: the whole model is never in memory at once"}})
    assert "samples: skipped (streaming" in capsys.readouterr().out
