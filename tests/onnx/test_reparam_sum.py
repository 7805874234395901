"""Rule ``reparam-sum``: ``BN(Σ Conv_i(x) + x)`` → one Conv (timm RepViT's RepVggDw: ``bn(conv(x) + conv1(x) + x)``).

Found on timm ``repvit_m0_9``: 23 BatchNorms per export were left (``no-linear-neighbour`` / ``other-consumer``)
although the sum is one conv and the BatchNorm folds into it. Built here by hand and as a small torch module
(no timm); the math is checked against onnxruntime, and a residual sum that is not over the convs' own
input must stay.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import fold_onnx
from bnfold.report import Status
from tests.onnx.helpers import F32, assert_equivalent, assert_valid, folds_from_every_exporter, init, make_model, op_types, rel_err, run
from tests.onnx.test_reparam import trained_stats


def _repvggdw(rng, c=6, hw=7, *, identity=True, stride=1, residual_other=False, groups=None) -> onnx.ModelProto:
    """``y = BN(dw3x3(x) + dw1x1(x) [+ x])``; y feeds a 1x1 conv and a residual Add, like RepViT's block."""
    g = c if groups is None else groups
    inits = [init(f"bn.{k}", v) for k, v in trained_stats(c, rng).items()]
    inits += [init("w0", (rng.standard_normal((c, c // g, 3, 3)) / 3).astype(F32)), init("b0", (rng.standard_normal(c) * 0.2).astype(F32))]
    inits += [init("w1", rng.standard_normal((c, c // g, 1, 1)).astype(F32)), init("b1", (rng.standard_normal(c) * 0.2).astype(F32))]
    inits.append(init("wm", (rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(F32)))
    nodes = [
        helper.make_node("Relu", ["input"], ["x"], name="pre"),
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", group=g, pads=[1] * 4, strides=[stride] * 2),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", group=g, strides=[stride] * 2),
        helper.make_node("Add", ["c0", "c1"], ["s0"], name="add0"),
    ]
    last = "s0"
    if identity:
        other = "input" if residual_other else "x"
        nodes.append(helper.make_node("Add", ["s0", other], ["s1"], name="add1"))
        last = "s1"
    nodes += [
        helper.make_node("BatchNormalization", [last, "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"], name="bn"),
        helper.make_node("Conv", ["y", "wm"], ["m"], name="mixer"),
        helper.make_node("Add", ["y", "m"], ["output"], name="residual"),
    ]
    side = hw if stride == 1 else (hw - 1) // stride + 1
    return make_model(nodes, [("input", [2, c, hw, hw], F32)], [("output", F32, [2, c, side, side])], inits)


@pytest.mark.parametrize("identity", [True, False], ids=["with-x", "convs-only"])
@pytest.mark.parametrize("groups", [None, 1, 2], ids=["dw", "dense", "g2"])
def test_sum_then_bn_is_one_conv(identity: bool, groups) -> None:
    m = _repvggdw(np.random.default_rng(1), identity=identity, groups=groups)
    out, report = fold_onnx(m)
    assert report.left == 0 and report.folded == 1, str(report)
    (cand,) = report.candidates
    assert cand.rule == "reparam-sum" and cand.status is Status.FOLDED
    assert op_types(out) == ["Relu", "Conv", "Conv", "Add"], op_types(out)
    assert [o.name for o in out.graph.output] == ["output"]
    assert_valid(out)
    assert_equivalent(m, out, np.random.default_rng(0))


def test_identity_left_out_would_be_caught() -> None:
    """Folding as if the sum had no x term gives a clearly different model: the identity kernel matters."""
    with_x = _repvggdw(np.random.default_rng(2), identity=True)
    without = _repvggdw(np.random.default_rng(2), identity=False)
    folded_without, _ = fold_onnx(without)
    folded_with, _ = fold_onnx(with_x)
    x = {"input": np.random.default_rng(3).standard_normal((2, 6, 7, 7)).astype(F32)}
    assert rel_err(run(with_x, x)[0], run(folded_without, x)[0]) > 1e-2
    assert rel_err(run(with_x, x)[0], run(folded_with, x)[0]) < 1e-5


def test_residual_over_another_tensor_stays() -> None:
    """``BN(conv(x) + conv1(x) + input)`` with input ≠ x (a Relu between): not one conv; the BN stays."""
    m = _repvggdw(np.random.default_rng(4), residual_other=True)
    out, report = fold_onnx(m)
    assert report.left == 1 and report.candidates[0].status is Status.SKIPPED and report.candidates[0].reasons
    assert op_types(out) == op_types(m)


def test_strided_branches_refused() -> None:
    m = _repvggdw(np.random.default_rng(5), identity=False, stride=2)
    out, report = fold_onnx(m)
    assert report.left == 1, str(report)
    assert any("stride 2" in r.message for r in report.candidates[0].reasons), str(report)
    assert op_types(out) == op_types(m)


def test_torch_repvggdw_exports(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    c = 8

    class RepVggDw(nn.Module):
        """timm RepViT's token mixer: ConvNorm(dw 3x3) + dw 1x1 conv + x, then BatchNorm."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
            self.conv1 = nn.Conv2d(c, c, 1, groups=c)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return self.bn(self.conv(x) + self.conv1(x) + x)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer, self.mlp = RepVggDw(), nn.Conv2d(c, c, 1)

        def forward(self, x):
            x = self.mixer(x)
            return x + self.mlp(x)

    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.GELU(), Block(), Block())
    folds_from_every_exporter(net, None, tmp_path, gone=("BatchNormalization",))
