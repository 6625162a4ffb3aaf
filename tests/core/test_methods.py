"""The method registry: one config dataclass per method, validated there, the one source of names."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from svdforge.core.config import CompressConfig
from svdforge.core.errors import UserError
from svdforge.core.methods import REGISTRY, get_method, method_config, method_names
from svdforge.core.methods.asvd import ASVDConfig
from svdforge.core.methods.fwsvd import FWSVDConfig

ROOT = Path(__file__).resolve().parents[2]


def test_registry_order_and_configs():
    assert method_names() == ("svd", "svd-llm", "asvd", "fwsvd")
    assert REGISTRY["asvd"].config_cls is ASVDConfig and REGISTRY["fwsvd"].config_cls is FWSVDConfig
    assert get_method("asvd", {"alpha": 0.7}).config == ASVDConfig(alpha=0.7)
    assert get_method("fwsvd").config.samples == 16


@pytest.mark.parametrize("name, options, message", [
    ("asvd", {"alpha": 3}, "method_options.alpha must be in (0, 2]"),
    ("asvd", {"alpha": True}, "method_options.alpha"),
    ("fwsvd", {"samples": 0}, "method_options.samples"),
    ("svd-llm", {"alpha": 0.5}, "svd-llm has no option alpha (its options: none)"),
    ("asvd", {"beta": 1}, "asvd has no option beta (its options: alpha)"),
    ("svdx", {}, "method must be one of svd, svd-llm, asvd, fwsvd"),
])
def test_bad_options_name_the_field(name, options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        method_config(name, options)


def test_compress_config_carries_validated_options_through_json():
    cfg = CompressConfig(model="m", ratio=0.4, method="asvd", method_options={"alpha": 0.25})
    assert cfg.method_options == ASVDConfig(alpha=0.25)
    d = cfg.to_dict()
    assert d["method_options"] == {"alpha": 0.25}
    assert CompressConfig.from_dict(d) == cfg
    with pytest.raises(UserError, match="method_options"):
        CompressConfig(model="m", ratio=0.4, method="svd", method_options={"alpha": 0.25})


def test_importing_the_registry_imports_no_torch():
    code = ("import sys; import svdforge.core.config, svdforge.core.methods; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_readme_table_is_the_registry():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("| method | what | options (default) |"):].split("\n\n")[0]
    rows = re.findall(r"^\| `([\w-]+)` \| (.+?) \| ?(.*?) ?\|$", block, re.M)
    table = {name: (what, opts) for name, what, opts in rows}
    expected = {name: (cls.summary, ", ".join(f"`{f.name}={f.default}`" for f in dataclasses.fields(cls.config_cls)))
                for name, cls in REGISTRY.items()}
    assert table == expected
    assert [name for name, _, _ in rows] == list(method_names())


def test_cli_lists_the_registry():
    out = subprocess.run([sys.executable, "-m", "svdforge.cli.main", "compress", "--help"], capture_output=True,
                         text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert " | ".join(method_names()) in out.stdout
    assert "asvd: alpha=0.5" in out.stdout and "fwsvd: samples=16" in out.stdout
