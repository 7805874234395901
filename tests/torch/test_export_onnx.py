"""export_onnx: fold, export, onnxruntime equality, and the ONNX finder over the result."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold.errors import VerificationError  # noqa: E402
from tests.torch.models import TinyResNet, assert_untouched, randomize_bn, snapshot  # noqa: E402

KEEP_BN = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}


def _ort(path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("export_kwargs", [{}, KEEP_BN], ids=["default", "keep-bn"])
def test_resnet_style_export(tmp_path, export_kwargs):
    """Even with the exporter's own Conv+BN fusion off, the file holds no BatchNormalization."""
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet(), 1).eval()
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(model)
    path = tmp_path / "resnet.onnx"
    folded, report = bnfold.export_onnx(model, (x,), path, **export_kwargs)
    assert report.folded == 10 and isinstance(folded, TinyResNet)
    assert_untouched(model, before)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 10
    assert any("no BatchNormalization left" in n for n in report.notes)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_ort(path, x), expected, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(expected).max()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet.onnx"]  # no temp file left


class FunctionalConv(nn.Module):
    """F.conv2d with the module's own tensors: no producer module for the PyTorch pass, a Conv for ONNX."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight))


def test_foldable_batchnorm_left_in_the_onnx_is_reported(tmp_path):
    model = randomize_bn(FunctionalConv(), 2).eval()
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "f.onnx"
    _, report = bnfold.export_onnx(model, x, path, **KEEP_BN)
    assert report.folded == 0 and report.left == 1
    assert any("1 BatchNormalization left, 1 of them foldable" in n for n in report.notes), report.notes
    assert path.exists()
    with pytest.raises(VerificationError, match="foldable BatchNormalization left"):
        bnfold.export_onnx(model, x, tmp_path / "strict.onnx", strict=True, **KEEP_BN)
    assert not (tmp_path / "strict.onnx").exists()


def test_mismatch_writes_nothing(tmp_path, monkeypatch):
    import bnfold.torch.export as export

    real_run = export._run
    monkeypatch.setattr(export, "_run", lambda m, a: [t + 1 for t in real_run(m, a)])
    torch.manual_seed(3)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 3).eval()
    with pytest.raises(VerificationError, match="differs"):
        bnfold.export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
