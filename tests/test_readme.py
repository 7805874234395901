"""README.md opens with the two set-up commands, and what they run works (the pip part aside)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import onnx
from click.testing import CliRunner

from bnfold.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def test_readme_opens_with_the_two_commands() -> None:
    first, second = bash_blocks()[:2]
    assert first == "pip install -e . && bnfold sample_models/resnet_tiny.onnx -o folded.onnx"
    assert second == 'pip install -e ".[test]" && pytest'
    assert README.index(first) < README.index("## ")  # before the first section
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and re.search(r"^pytest\s*$", ci, flags=re.M)


def test_first_command_folds_the_sample(tmp_path: Path, monkeypatch) -> None:
    command = bash_blocks()[0].split("&&", 1)[1].split()
    assert command[0] == "bnfold"
    args = [str(ROOT / a) if a.startswith("sample_models/") else a for a in command[1:]]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "6 BatchNorm found, 6 folded, 0 left" in result.output and "verify PASS" in result.output
    folded = onnx.load(tmp_path / "folded.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)


def test_console_examples_name_real_commands_and_options() -> None:
    """Every `$ bnfold …` line in the README parses: its command and options exist."""
    lines = [l.split("#", 1)[0].strip()[2:] for l in README.splitlines() if l.strip().startswith("$ bnfold")]
    assert len(lines) > 10
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv and argv[0] not in ("fold", "check", "verify", "bench"):
            argv = ["fold", *argv]
        cmd = main.get_command(None, argv[0])  # type: ignore[arg-type]
        assert cmd is not None, line
        known = {o for p in cmd.params for o in getattr(p, "opts", [])}
        for token in argv[1:]:
            if token.startswith("-"):
                assert token.split("=")[0] in known, f"{line}: unknown option {token}"
