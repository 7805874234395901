"""README.md opens with the two set-up commands, and what they run works (the pip part aside)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from tests.paths import RESNET, ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def ci_commands() -> str:
    """What `.ci/run` runs, as one `&&` line: its commands less comments, `set` and the `cd` to the root."""
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    return " && ".join(l for l in lines if l and not l.startswith(("#", "set ", "cd ")))


def test_readme_opens_with_the_two_commands() -> None:
    first, second = bash_blocks()[:2]
    assert first == "pip install -e . && bnfold sample_models/resnet_tiny.onnx -o folded.onnx"
    assert second == 'pip install -e ".[test]" -c .ci/constraints.txt && pytest'
    assert README.index(first) < README.index("## ")  # before the first section
    assert ci_commands() == second  # the README's test command is exactly what CI runs


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
    lines = [l.split("  #", 1)[0].strip()[2:] for l in README.splitlines() if l.strip().startswith("$ bnfold")]
    assert len(lines) > 10
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv and argv[0] not in ("fold", "check", "verify", "bench"):
            argv = ["fold", *argv]
        cmd = main.get_command(None, argv[0])  # type: ignore[arg-type]
        assert cmd is not None, line
        known = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        for token in argv[1:]:
            if token.startswith("-"):
                assert token.split("=")[0] in known, f"{line}: unknown option {token}"


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _examples(section: str) -> list[list[str]]:
    """The `$ bnfold …` and `$ python -m bnfold …` lines of a ```console block, as argv (comments dropped)."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("$ bnfold ") or line.startswith("$ python -m bnfold "):
                words = shlex.split(line[2:])
                out.append(words[3:] if words[0] == "python" else words[1:])
    return out


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch) -> Path:
    """model.onnx (batch symbolic), models/ and exports/ with foldable models, as the examples assume."""
    m = onnx.load(RESNET)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(m, tmp_path / "model.onnx")
    for folder in ("models", "exports/a"):
        (tmp_path / folder).mkdir(parents=True)
        onnx.save(m, tmp_path / folder / "net.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("title", ["Command line", "CI gate: `bnfold check`"])
def test_every_command_line_example_runs(title: str, sandbox: Path) -> None:
    """Each example, run as written: it ends with 0 (or 1 where a check finds a foldable BatchNorm)."""
    examples = _examples(_section(title))
    assert len(examples) >= 7
    for argv in examples:
        result = CliRunner().invoke(main, argv)
        expected = {0, 1} if argv and argv[0] == "check" else {0}
        assert result.exit_code in expected, f"bnfold {' '.join(argv)}: exit {result.exit_code}\n{result.output}"
        assert "Traceback" not in result.output


def test_the_run_shown_is_what_the_command_prints(tmp_path: Path, monkeypatch) -> None:
    block = re.search(r"```text\n\$ (bnfold [^\n]*)\n(.*?)```", _section("Command line"), flags=re.S)
    argv = shlex.split(block.group(1))[1:]
    shown = [l for l in block.group(2).splitlines() if not l.startswith("verify PASS: …")]
    argv = [str(ROOT / a) if a.startswith("sample_models/") else a for a in argv]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    printed = result.output.replace(str(ROOT) + "/", "").splitlines()
    mask = lambda line: re.sub(r"\d+\.\d+s \(", "T s (", line)  # the fold time varies
    for line in shown:
        assert mask(line) in map(mask, printed), line
