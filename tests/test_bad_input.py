"""Bad input: a one-line error naming the problem, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import EXIT_USAGE, InputError
from tests.onnx.helpers import conv_bn_relu


def fold_cli(tmp_path: Path, source: Path | str, out_name: str = "out.onnx"):
    out = tmp_path / "outdir" / out_name
    out.parent.mkdir(exist_ok=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, [str(source), "-o", str(out)])
    after = sorted(p.name for p in tmp_path.rglob("*"))
    return result, out, before, after


def assert_clean_failure(result, out: Path, before, after, needle: str) -> None:
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.output.strip()
    assert len(text.splitlines()) == 1, text
    assert "Traceback" not in text
    assert needle in text, text
    assert not out.exists()
    assert before == after, "a file was written or removed"


def test_missing_path(tmp_path: Path) -> None:
    assert_clean_failure(*fold_cli(tmp_path, tmp_path / "nope.onnx"), "no such file")


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "adir"
    d.mkdir()
    assert_clean_failure(*fold_cli(tmp_path, d), "is a directory")


@pytest.mark.parametrize(
    "content",
    [os.urandom(2048), b"this is a text file, not a model\n" * 20, b""],
    ids=["random-bytes", "text", "empty"],
)
def test_not_onnx(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    assert_clean_failure(*fold_cli(tmp_path, p), "bad.onnx")


def test_truncated_model(tmp_path: Path) -> None:
    data = conv_bn_relu(np.random.default_rng(0)).SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    assert_clean_failure(*fold_cli(tmp_path, p), "trunc.onnx")


def test_model_failing_the_checker(tmp_path: Path) -> None:
    m = conv_bn_relu(np.random.default_rng(0))
    m.graph.node[1].input[1] = "undefined_tensor"
    p = tmp_path / "invalid.onnx"
    onnx.save(m, p)
    assert_clean_failure(*fold_cli(tmp_path, p), "checker")


def test_missing_external_data_file(tmp_path: Path) -> None:
    m = conv_bn_relu(np.random.default_rng(0), c_out=32)
    p = tmp_path / "ext.onnx"
    onnx.save(m, p, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    assert_clean_failure(*fold_cli(tmp_path, p), "external data")


def test_output_folder_missing(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(0)), p)
    result = CliRunner().invoke(main, [str(p), "-o", str(tmp_path / "no" / "such" / "dir" / "o.onnx")])
    assert result.exit_code == EXIT_USAGE
    assert "does not exist" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_output_folder_not_writable(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(0)), p)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        result = CliRunner().invoke(main, [str(p), "-o", str(ro / "o.onnx")])
        assert result.exit_code == EXIT_USAGE and "not writable" in result.output
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_output_write_failure_leaves_existing_file_untouched(tmp_path: Path, monkeypatch) -> None:
    """A failure while writing keeps the old output as it was (temp file + rename)."""
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(0)), p)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous result")

    def half_then_fail(model, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr("bnfold.onnx.storage._write_serialized", half_then_fail)
    result = CliRunner().invoke(main, [str(p), "-o", str(out), "--no-verify"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "No space left" in result.output
    assert out.read_bytes() == b"previous result"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]


def test_api_raises_input_error_for_a_non_model(tmp_path: Path) -> None:
    from bnfold import fold_onnx

    p = tmp_path / "x.onnx"
    p.write_text("hello")
    with pytest.raises(InputError):
        fold_onnx(p)
    with pytest.raises(InputError):
        fold_onnx(42)  # type: ignore[arg-type]
