"""``vramferry serve --lora NAME=PATH``: parsing, and one-line usage errors before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramferry.cli import build_parser, main


def test_lora_flag_is_repeatable_and_parsed(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"")
    args = build_parser().parse_args(
        ["serve", "--lora", f"a={tmp_path}", "--lora", f"b-2={tmp_path / 'b.safetensors'}"]
    )
    assert args.lora == [("a", Path(tmp_path)), ("b-2", tmp_path / "b.safetensors")]
    assert build_parser().parse_args(["serve"]).lora is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("x=/no/such/lora", "argument --lora: x: /no/such/lora does not exist; give a local LoRA folder"),
        ("/some/path", "argument --lora: expected NAME=PATH"),
        ("a.b=/tmp", "argument --lora: expected NAME=PATH"),
    ],
)
def test_bad_lora_flag_is_one_line(capsys, spec, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--lora", spec])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_repeated_lora_name_is_one_line_before_the_model_loads(capsys, tmp_path):
    pytest.importorskip("fastapi")
    code = main(["serve", "--lora", f"a={tmp_path}", "--lora", f"a={tmp_path}", "--offload", "none"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == ["error: --lora: a named twice; give each adapter its own NAME"]
