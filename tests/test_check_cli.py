"""`bnfold check` on the command line: each exit code, the formats, -j, the progress bar, the docs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml
from click.testing import CliRunner

from bnfold.check import CHECK_JSON_SCHEMA
from bnfold.cli import main
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE
from tests.test_check import ROOT, conv_bn, folded, mixed, models  # noqa: F401  (models: a fixture)

jsonschema = pytest.importorskip("jsonschema")


def run(*args: str):
    return CliRunner().invoke(main, ["check", *map(str, args)], catch_exceptions=False)


# ------------------------------------------------------------------------------------------------
# Exit codes
# ------------------------------------------------------------------------------------------------
def test_folded_model_exits_0(models: dict[str, Path]) -> None:
    r = run(models["folded"])
    assert r.exit_code == EXIT_OK, r.output
    assert r.stdout.strip() == "bnfold check passed: 1 model checked, 1 ok"


def test_unfolded_model_exits_1_and_names_the_batchnorm(models: dict[str, Path]) -> None:
    r = run(models["unfolded"])
    assert r.exit_code == EXIT_CHECK_FAILED
    assert f"{models['unfolded']}: FAILED" in r.stdout
    assert "FAIL    bn1 (BatchNormalization) [foldable] can be folded into its producer Conv 'conv1'" in r.stdout
    assert "hint: run `bnfold fold" in r.stdout


def test_strict_fails_on_an_unfoldable_batchnorm(models: dict[str, Path]) -> None:
    assert run(models["unfoldable"]).exit_code == EXIT_OK
    r = run(models["unfoldable"], "--strict")
    assert r.exit_code == EXIT_CHECK_FAILED
    assert "FAIL    bn1 (BatchNormalization) [other-consumer]" in r.stdout
    assert "hint: fold is only exact when the BatchNorm is the layer's sole consumer" in r.stdout


def test_unreadable_file_among_good_ones_exits_2_and_the_good_ones_are_reported(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    r = run(models["folded"], bad, models["unfolded"], "--format", "json")
    assert r.exit_code == EXIT_USAGE
    data = json.loads(r.stdout)
    assert [(Path(m["path"]).name, m["status"]) for m in data["models"]] == [
        ("folded.onnx", "ok"), ("corrupt.onnx", "error"), ("unfolded.onnx", "failed"),
    ]
    text = run(models["folded"], bad, models["unfolded"])
    assert text.exit_code == EXIT_USAGE
    assert f"ERROR {bad}: not a readable ONNX model" in text.stdout
    assert f"{models['unfolded']}: FAILED" in text.stdout  # still checked and reported
    assert "Traceback" not in text.output


def test_directory_with_one_folded_and_one_unfolded_names_exactly_the_unfolded(tmp_path: Path) -> None:
    d = tmp_path / "models"
    (d / "sub").mkdir(parents=True)
    onnx.save(folded(conv_bn()), d / "good.onnx")
    onnx.save(conv_bn(), d / "sub" / "bad.onnx")
    r = run(d)
    assert r.exit_code == EXIT_CHECK_FAILED
    named = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith(str(d))]
    assert named == [str(d / "sub" / "bad.onnx")]
    assert "good.onnx" not in r.stdout
    data = json.loads(run(d, "--format", "json").stdout)
    assert [m["path"] for m in data["models"] if m["status"] == "failed"] == [str(d / "sub" / "bad.onnx")]


def test_missing_path_and_empty_directory_exit_2(tmp_path: Path, models: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    r = run(tmp_path / "nope.onnx", tmp_path / "empty", models["folded"])
    assert r.exit_code == EXIT_USAGE
    assert f"ERROR {tmp_path / 'nope.onnx'}: no such file or directory" in r.stdout
    assert "no *.onnx file in this directory" in r.stdout
    assert run().exit_code == EXIT_USAGE  # no PATH: click's usage error


def test_allow_accepts_named_batchnorms(models: dict[str, Path]) -> None:
    assert run(models["mixed"]).exit_code == EXIT_CHECK_FAILED
    r = run(models["mixed"], "--allow", "head_*")
    assert r.exit_code == EXIT_OK
    assert "allowed head_bn (BatchNormalization) [foldable]" in r.stdout
    assert "accepted by --allow" in r.stdout
    assert run(models["mixed"], "--allow", "head_*", "--strict").exit_code == EXIT_CHECK_FAILED
    assert run(models["mixed"], "--allow", "head_*", "--allow", "bn2", "--strict").exit_code == EXIT_OK


def test_glob_argument_is_expanded_by_bnfold(models: dict[str, Path]) -> None:
    r = run(models["folded"].parent / "*fold*.onnx", "--format", "json")
    data = json.loads(r.stdout)
    assert sorted(Path(m["path"]).name for m in data["models"]) == ["folded.onnx", "unfoldable.onnx", "unfolded.onnx"]
    assert r.exit_code == EXIT_CHECK_FAILED


# ------------------------------------------------------------------------------------------------
# Formats, -j, progress
# ------------------------------------------------------------------------------------------------
def test_json_format_validates_against_the_schema(models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_text("not a model")
    for extra in ((), ("--strict",), ("--allow", "bn*")):
        r = run(tmp_path, "--format", "json", *extra)
        data = json.loads(r.stdout)
        jsonschema.validate(data, CHECK_JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
        assert data["exit_code"] == r.exit_code == EXIT_USAGE
        assert data["summary"]["models"] == 5 and data["summary"]["errors"] == 1


def test_github_format_lines(models: dict[str, Path]) -> None:
    r = run(models["folded"], models["mixed"], "--format", "github", "--strict")
    assert r.exit_code == EXIT_CHECK_FAILED
    lines = r.stdout.splitlines()
    file = str(models["mixed"]).replace(":", "%3A").replace(",", "%2C")
    assert lines[0].startswith(f"::error file={file},title=bnfold%3A foldable BatchNorm::head_bn (BatchNormalization) [foldable] ")
    assert lines[1].startswith(f"::error file={file},title=bnfold%3A BatchNorm left (--strict)::bn2 (BatchNormalization) [other-consumer] ")
    assert lines[2] == "bnfold check FAILED: 2 models checked, 1 failed (2 BatchNorms left), 1 ok"
    assert len(lines) == 3


def test_jobs_gives_the_same_output(models: dict[str, Path], monkeypatch) -> None:
    from bnfold.check import pool

    monkeypatch.setattr(pool, "BYTES_PER_WORKER", 1)  # a pool even for these tiny models
    folder = models["folded"].parent
    one = run(folder, "--format", "json", "--strict")
    two = run(folder, "--format", "json", "--strict", "-j", "2")
    assert one.exit_code == two.exit_code == EXIT_CHECK_FAILED
    assert json.loads(one.stdout) == json.loads(two.stdout)


def test_progress_only_on_a_terminal(models: dict[str, Path], monkeypatch) -> None:
    from bnfold.cli import _progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    folder = models["folded"].parent
    tty = Tty()
    monkeypatch.setattr(_progress, "stderr", lambda: tty)
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    r = run(folder)
    assert r.exit_code == EXIT_CHECK_FAILED
    assert "checking" in tty.getvalue() and "checking" not in r.stdout
    tty.seek(0)
    tty.truncate()
    run(folder, "--no-progress")
    run(folder, "-q")
    assert tty.getvalue() == ""


# ------------------------------------------------------------------------------------------------
# The installed command, fast --help, no writes
# ------------------------------------------------------------------------------------------------
def test_installed_console_script(models: dict[str, Path]) -> None:
    exe = shutil.which("bnfold")
    if exe is None:
        pytest.skip("the bnfold console script is not installed (pip install -e .)")
    folder = models["folded"].parent
    before = sorted(os.listdir(folder))
    p = subprocess.run([exe, "check", str(folder), "--format", "github"], capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_CHECK_FAILED, p.stderr
    assert p.stdout.count("::error file=") == 2  # unfolded.onnx's bn1, mixed.onnx's head_bn
    assert p.stderr == ""  # no progress bar when stderr is not a terminal
    ok = subprocess.run([exe, "check", str(models["folded"])], capture_output=True, text=True, timeout=120)
    assert ok.returncode == EXIT_OK, ok.stdout + ok.stderr
    assert sorted(os.listdir(folder)) == before


def test_help_does_not_import_the_engine() -> None:
    code = "import sys; from bnfold.cli import check_cmd; assert 'onnx' not in sys.modules, 'onnx imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
    r = CliRunner().invoke(main, ["check", "--help"])
    assert r.exit_code == 0 and "--strict" in r.stdout and "Exit codes" in r.stdout


# ------------------------------------------------------------------------------------------------
# Integrations: pre-commit hook and the docs
# ------------------------------------------------------------------------------------------------
def test_pre_commit_hook_definition() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    (hook,) = hooks
    assert hook["id"] == "bnfold-check" and hook["entry"] == "bnfold check" and hook["language"] == "python"
    import re

    assert re.search(hook["files"], "models/a.onnx") and not re.search(hook["files"], "a.onnx.data")


def _blocks(text: str, lang: str) -> list[str]:
    return [b.split("```", 1)[0] for b in text.split(f"```{lang}\n")[1:]]


def test_docs_snippets_are_valid_and_the_text_example_is_real(tmp_path: Path, monkeypatch) -> None:
    doc = (ROOT / "docs" / "check.md").read_text(encoding="utf-8")
    for block in _blocks(doc, "yaml"):
        assert yaml.safe_load(block)
    step = yaml.safe_load(_blocks(doc, "yaml")[0])[0]
    assert "bnfold check --format github" in step["run"]
    # the text example is what the command prints for these two models
    (tmp_path / "models").mkdir()
    onnx.save(folded(conv_bn()), tmp_path / "models" / "conv_bn.onnx")
    onnx.save(mixed(), tmp_path / "models" / "mixed.onnx")
    monkeypatch.chdir(tmp_path)
    r = run("models/")
    assert r.exit_code == EXIT_CHECK_FAILED
    assert r.stdout == _blocks(doc, "text")[0]
