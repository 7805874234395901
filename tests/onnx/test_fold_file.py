"""fold_file: what `bnfold fold` runs — folded weights go from numpy straight into the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold.onnx.api as api
from bnfold.errors import VerificationError
from bnfold.onnx import storage
from tests.onnx.helpers import assert_equivalent, conv_bn_relu


@pytest.fixture
def all_pending(monkeypatch):
    """Every folded array pending, however small, so the streaming path runs on tiny test models."""
    monkeypatch.setattr(storage, "PENDING_BYTES", 0)


def test_streamed_bytes_equal_the_materialised_model(tmp_path: Path, all_pending) -> None:
    m = conv_bn_relu(np.random.default_rng(0))
    m.doc_string = "kept"
    store = storage.TensorStore(pending=True)
    stand_ins, _ = api._fold_model(m, api.FoldOptions(store=store))
    pending = store.pending
    assert pending and all(not t.HasField("raw_data") for t in stand_ins.graph.initializer if t.name in pending)
    materialised, _ = api.fold_onnx(m)
    storage._write_streaming(stand_ins, str(tmp_path / "s.onnx"), pending)
    assert (tmp_path / "s.onnx").read_bytes() == materialised.SerializeToString()


@pytest.mark.parametrize("external", [None, True])
def test_fold_file_inline_and_external(tmp_path: Path, all_pending, external) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "out" / "f.onnx"
    dst.parent.mkdir()
    m = conv_bn_relu(np.random.default_rng(1), c_in=16, c_out=32)
    onnx.save(m, src)
    report = api.fold_file(src, dst, external_data=external)
    assert report.folded == 1 and report.source == str(src)
    written = sorted(p.name for p in dst.parent.iterdir())
    assert written == (["f.onnx", "f.onnx.data"] if external else ["f.onnx"])
    onnx.checker.check_model(str(dst), full_check=True)
    assert_equivalent(m, onnx.load(dst), np.random.default_rng(2))


def test_fold_file_twice_is_byte_identical(tmp_path: Path, all_pending) -> None:
    onnx.save(conv_bn_relu(np.random.default_rng(3)), tmp_path / "m.onnx")
    api.fold_file(tmp_path / "m.onnx", tmp_path / "a.onnx")
    report = api.fold_file(tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert report.folded == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_before_commit_failure_writes_nothing(tmp_path: Path, all_pending) -> None:
    onnx.save(conv_bn_relu(np.random.default_rng(4)), tmp_path / "m.onnx")

    def refuse(written: str, report) -> None:
        assert Path(written).exists() and report.folded == 1
        raise VerificationError("no")

    with pytest.raises(VerificationError):
        api.fold_file(tmp_path / "m.onnx", tmp_path / "o.onnx", before_commit=refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
