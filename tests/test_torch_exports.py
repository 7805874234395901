"""Real exporter output: TorchScript export with BN preserved, and the dynamo exporter without its optimizer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from bnfold import fold_onnx  # noqa: E402
from bnfold.testing import assert_fully_folded  # noqa: E402
from tests.onnx.helpers import ort_session  # noqa: E402


def randomise_bn(net: "nn.Module", seed: int = 0) -> "nn.Module":
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 2)
            m.running_var.copy_(torch.exp(torch.empty(c).uniform_(-9, 4.6, generator=g)))
            m.weight.data.copy_(torch.randn(c, generator=g) * 1.5)
            m.bias.data.copy_(torch.randn(c, generator=g))
    return net.eval()


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head_bn, self.head = nn.BatchNorm1d(8), nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(self.head_bn(x.mean((2, 3))))  # BatchNorm1d before the Linear head


def outputs_match(model: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray) -> float:
    name = model.graph.input[0].name
    a = ort_session(model).run(None, {name: x})[0]
    b = ort_session(folded).run(None, {name: x})[0]
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def test_bn_preserved_export_with_bn1d_head_folds_to_zero(tmp_path: Path) -> None:
    net = randomise_bn(TinyResNet())
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "preserve.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, input_names=["input"])
    model = onnx.load(path)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 6
    folded, report = fold_onnx(model)
    assert report.folded == 6 and report.left == 0
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert_fully_folded(folded)
    assert outputs_match(model, folded, x.numpy()) < 1e-5


def test_dynamo_export_without_optimizer_folds_to_zero(tmp_path: Path) -> None:
    """dynamo=True, optimize=False writes each conv bias as Expand(CastLike(0, x), Shape(W)[0])."""
    pytest.importorskip("onnxscript")
    net = randomise_bn(TinyResNet(), seed=1)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=True, optimize=False, verbose=False)
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 6 and "CastLike" in ops
    folded, report = fold_onnx(model)
    assert report.folded == 6 and report.left == 0, str(report)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert outputs_match(model, folded, x.numpy()) < 1e-5
    with torch.no_grad():
        ref = net(x).numpy()
    got = ort_session(folded).run(None, {folded.graph.input[0].name: x.numpy()})[0]
    assert np.max(np.abs(ref - got)) / np.max(np.abs(ref)) < 1e-5
