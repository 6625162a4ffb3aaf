import math

import pytest

from svdforge.core.config import CompressConfig, DataSpec, EvalConfig
from svdforge.core.errors import UserError


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1, 1.0, 1.5, float("nan"), "abc", None])
def test_bad_ratios_are_rejected_with_a_clear_message(ratio):
    with pytest.raises(UserError, match="ratio"):
        CompressConfig(model="m", ratio=ratio)


def test_good_ratio_and_defaults():
    c = CompressConfig(model="smollm2-135m", ratio=0.4)
    assert c.method == "svd-llm" and c.calibration_mode == "sequential" and c.allocation == "auto"
    assert math.isclose(c.ratio, 0.4)


@pytest.mark.parametrize("kw, field", [
    ({"method": "magic"}, "method"), ({"targets": "heads"}, "targets"), ({"targets": "re:("}, "regular"),
    ({"calibration": {"samples": 0}}, "samples"), ({"calibration": {"source": "file"}}, "path"),
    ({"evaluation": {"seq_len": 64, "max_tokens": 10}}, "max_tokens"),
])
def test_bad_fields_name_the_field(kw, field):
    with pytest.raises(UserError, match=field):
        CompressConfig(model="m", ratio=0.2, **kw)


def test_round_trip_and_unknown_fields():
    c = CompressConfig(model="m", ratio=0.2, calibration=DataSpec(samples=3), evaluation=EvalConfig(max_tokens=None))
    assert CompressConfig.from_dict(c.to_dict()) == c
    with pytest.raises(UserError, match="unknown"):
        CompressConfig.from_dict({"model": "m", "ratio": 0.2, "colour": "red"})


@pytest.mark.parametrize("kw, needle", [
    ({"prompts": ["x"] * 9}, "prompts must hold at most 8"),
    ({"prompts": ["ok", ""]}, r"prompts\[1\] must be a non-empty string"),
    ({"prompts": ["x" * 1001]}, r"prompts\[0\] .* at most 1000 characters, got 1001"),
    ({"prompts": [3]}, r"prompts\[0\]"),
    ({"prompts": "one string"}, "prompts must be a list"),
    ({"sample_tokens": 0}, "sample_tokens must be >= 1 and <= 256"),
    ({"sample_tokens": 257}, "sample_tokens"),
    ({"sample_tokens": True}, "sample_tokens must be an integer"),
])
def test_sample_prompts_are_bounded(kw, needle):
    with pytest.raises(UserError, match=needle):
        EvalConfig(**kw)


def test_sample_prompts_defaults_and_limits():
    assert EvalConfig().prompts == [] and EvalConfig().sample_tokens == 32
    ev = EvalConfig(prompts=("a", "b" * 1000) + ("c",) * 6, sample_tokens=256)   # the most allowed
    assert len(ev.prompts) == 8 and isinstance(ev.prompts, list)


@pytest.mark.parametrize("value, needle", [
    (0, "rank_multiple must be >= 1 and <= 1024, got 0"), (1025, "rank_multiple must be >= 1 and <= 1024"),
    (-8, "rank_multiple"), (8.0, "rank_multiple must be an integer"), (True, "rank_multiple must be an integer"),
    ("8", "rank_multiple must be an integer"), (None, "rank_multiple must be an integer"),
])
def test_rank_multiple_is_an_integer_from_1_to_1024(value, needle):
    with pytest.raises(UserError, match=needle):
        CompressConfig(model="m", ratio=0.4, rank_multiple=value)


def test_rank_multiple_defaults_to_1_and_round_trips():
    assert CompressConfig(model="m", ratio=0.4).rank_multiple == 1
    c = CompressConfig(model="m", ratio=0.4, rank_multiple=1024)
    assert CompressConfig.from_dict(c.to_dict()) == c
