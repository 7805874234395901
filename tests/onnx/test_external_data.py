"""Models whose tensors live in external files load, fold and are written back with external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

from bnfold import fold_onnx
from bnfold.cli import main
from bnfold.onnx.io import has_external_data, load_model_and_layout
from bnfold.onnx.storage import save_model
from tests.onnx.helpers import assert_equivalent, conv_bn_relu


def external_model(tmp_path: Path) -> Path:
    m = conv_bn_relu(np.random.default_rng(0), c_in=64, c_out=64)  # a 144 KiB weight: spilled, not held
    p = tmp_path / "src" / "ext.onnx"
    p.parent.mkdir()
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return p


def test_api_folds_a_model_with_external_data(tmp_path: Path) -> None:
    p = external_model(tmp_path)
    model, external = load_model_and_layout(p)
    assert external
    out, report = fold_onnx(p)
    assert report.folded == 1
    assert_equivalent(model, out, np.random.default_rng(1))


def test_cli_keeps_external_data_layout(tmp_path: Path) -> None:
    p = external_model(tmp_path)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = CliRunner().invoke(main, [str(p), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(x.name for x in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    assert has_external_data(onnx.load(out, load_external_data=False))
    assert_equivalent(onnx.load(p), onnx.load(out), np.random.default_rng(2))
    # the source and its data file are untouched
    assert (p.parent / "weights.bin").exists()


def test_cli_external_data_never_writes_inline(tmp_path: Path) -> None:
    p = external_model(tmp_path)
    out = tmp_path / "inline.onnx"
    result = CliRunner().invoke(main, [str(p), "-o", str(out), "--external-data", "never"])
    assert result.exit_code == 0, result.output
    assert not has_external_data(onnx.load(out, load_external_data=False))
    assert not (tmp_path / "inline.onnx.data").exists()


def test_save_model_keeps_the_callers_model_whole(tmp_path: Path) -> None:
    m = conv_bn_relu(np.random.default_rng(3), c_out=32)
    before = m.SerializeToString()
    save_model(m, tmp_path / "x.onnx", external_data=True)
    assert m.SerializeToString() == before
    assert (tmp_path / "x.onnx.data").exists()


def test_streaming_fold_keeps_weights_on_disk(tmp_path: Path) -> None:
    """load_data=False + a spill folder: no weight is held in memory, yet the written model is right."""
    p = external_model(tmp_path)
    model, external = load_model_and_layout(p, load_data=False)
    assert external
    assert all(not t.HasField("raw_data") for t in model.graph.initializer if t.name == "conv.w")
    spill = tmp_path / "spill"
    spill.mkdir()
    folded, report = fold_onnx(model, spill_dir=spill)
    assert report.folded == 1
    w = next(t for t in folded.graph.initializer if t.name == "conv.w")
    assert not w.HasField("raw_data") and (spill / "bnfold-folded-weights.bin").stat().st_size > 0
    out = tmp_path / "streamed.onnx"
    save_model(folded, out, external_data=True, keep_data=False)
    assert_equivalent(onnx.load(p), onnx.load(out), np.random.default_rng(4))
    onnx.checker.check_model(str(out), full_check=True)


def test_verification_failure_on_external_data_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    from bnfold.onnx.rules.conv import ConvIntoProducer

    real = ConvIntoProducer.values

    def wrong(self, node, affine, ctx):
        plan = real(self, node, affine, ctx)
        plan.params[1] = (plan.params[1] * np.float32(1.001)).astype(plan.params[1].dtype)
        return plan

    monkeypatch.setattr(ConvIntoProducer, "values", wrong)
    p = external_model(tmp_path)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    result = CliRunner().invoke(main, [str(p), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert list(out.parent.iterdir()) == []


def test_check_reads_an_external_data_model_without_loading_it(tmp_path: Path) -> None:
    from bnfold import check_onnx

    p = external_model(tmp_path)
    report = check_onnx(p)
    assert report.foldable == 1 and report.source == str(p)
    assert sorted(x.name for x in p.parent.iterdir()) == ["ext.onnx", "weights.bin"]  # nothing written beside it
