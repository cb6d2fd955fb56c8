"""The README's Python example runs as written, on the CPU, with a tiny pipeline in place of FLUX.1-dev."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_python_example() -> str:
    """The first ``python`` block under "Use it from Python"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def _substitute(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the README example no longer contains {old!r} exactly once"
    return code.replace(old, new)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    from vramferry.pipelines import build_demo_pipeline

    folder = tmp_path / "FLUX.1-dev"
    build_demo_pipeline(seed=0).save_pretrained(folder)
    code = readme_python_example()
    # The only two substitutions: the model folder, and the CPU as the execution device (the example's
    # default, CUDA, is what a reader has; CI has no GPU).
    code = _substitute(code, '"/models/FLUX.1-dev"', repr(str(folder)))
    code = _substitute(code, "vramferry.OffloadConfig(", 'vramferry.OffloadConfig(onload_device="cpu", ')
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecated, deprecated
    assert (tmp_path / "cat.png").exists()
    out = capsys.readouterr().out
    assert out.startswith("plan: mode auto, budget 16.00 GiB")  # format_plan's table, not a dataclass repr
    assert "schedule (one request):" in out and "Plan(" not in out
    assert "OffloadStats(" in out
