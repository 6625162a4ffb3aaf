import pytest

from svdforge.core.config import DataSpec
from svdforge.core.data import builtin_lines, calibration_windows, evaluation_windows, load_text
from svdforge.core.errors import UserError
from svdforge.core.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_builtin_corpus_is_real_english_and_splits_are_disjoint():
    cal, ev = builtin_lines("calibration"), builtin_lines("evaluation")
    assert sum(map(len, cal)) > 1_000_000 and sum(map(len, ev)) > 1_000_000
    assert not set(cal) & set(ev)
    text = "\n".join(ev)
    assert "To be, or not to be" in text and "**" not in text and "#" not in text


def test_windows_are_seeded_and_never_fewer_than_asked(tok, tmp_path):
    spec = DataSpec(samples=6, seq_len=32, seed=3)
    a, b = calibration_windows(tok, spec), calibration_windows(tok, spec)
    assert a.ids.shape == (6, 32) and (a.ids == b.ids).all()
    assert not (calibration_windows(tok, DataSpec(samples=6, seq_len=32, seed=4)).ids == a.ids).all()
    assert a.spec["seed"] == 3 and a.spec["corpus"].startswith("shakespeare")
    small = tmp_path / "small.txt"
    small.write_text("only a few words here\n")
    with pytest.raises(UserError, match="fewer than the 4 asked for"):
        calibration_windows(tok, DataSpec(source="file", path=str(small), samples=4, seq_len=32))


def test_file_source_joins_lines_like_wikitext(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first line\nsecond line\n")
    assert load_text(DataSpec(source="file", path=str(p))) == "first line\n\nsecond line"
    with pytest.raises(UserError, match="not found"):
        load_text(DataSpec(source="file", path=str(tmp_path / "missing.txt")))


def test_evaluation_windows_are_consecutive(tok):
    w = evaluation_windows(tok, DataSpec(split="evaluation"), seq_len=16, max_tokens=100)
    assert w.ids.shape == (6, 16) and w.spec["windows"] == 6


def test_hf_source_offline_is_one_clear_error(tok):
    with pytest.raises(UserError):
        calibration_windows(tok, DataSpec(source="hf", dataset="wikitext", config="wikitext-2-raw-v1"))
