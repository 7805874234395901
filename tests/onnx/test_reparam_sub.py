"""FastViT's RepMixer: ``x + γ·(Mixer(x) − Norm(x))`` with Norm a bare BatchNorm on x (rule ``reparam``).

Found on timm ``fastvit_t8`` exported three ways: the 10 ``Norm`` BatchNorms (a MobileOne block with no
conv branch, only its identity BatchNorm) were left as ``no-linear-neighbour`` although the mixer's
conv on the same x is right there: ``Σ Conv_i(x) − (s·x + t)`` is one conv with the identity kernel
``−s`` and bias ``−t``. These tests build the block here (hand-made graph and a small torch module
exported by each exporter; no timm), and check the sign: a merge with ``+s`` must be caught.
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


def _mixer(rng, c: int = 6, hw: int = 7, *, norm_first: bool, minuend_is_bn: bool = False) -> onnx.ModelProto:
    """``output = x + g·(Conv3x3_dw(x) + Conv1x1_dw(x) + BN_id(x) − BN_norm(x))`` (convs already bare)."""
    nodes, inits = [], []
    for name in ("id", "norm"):
        inits += [init(f"{name}.{k}", v) for k, v in trained_stats(c, rng).items()]
    bn_id = helper.make_node("BatchNormalization", ["input", *(f"id.{k}" for k in ("scale", "bias", "mean", "var"))], ["idy"], name="bn_id")
    bn_norm = helper.make_node("BatchNormalization", ["input", *(f"norm.{k}" for k in ("scale", "bias", "mean", "var"))], ["ny"], name="bn_norm")
    for i, k in enumerate((3, 1)):
        inits.append(init(f"w{i}", (rng.standard_normal((c, 1, k, k)) / k).astype(F32)))
        inits.append(init(f"b{i}", (rng.standard_normal(c) * 0.3).astype(F32)))
        nodes.append(helper.make_node("Conv", ["input", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=c, pads=[k // 2] * 4))
    nodes += [
        helper.make_node("Add", ["c0", "c1"], ["s0"], name="add0"),
        bn_id,
        helper.make_node("Add", ["s0", "idy"], ["mix"], name="add_id"),
    ]
    nodes = [bn_norm, *nodes] if norm_first else [*nodes, bn_norm]
    sub_in = ["ny", "mix"] if minuend_is_bn else ["mix", "ny"]
    inits.append(init("gamma", (rng.standard_normal((c, 1, 1)) * 0.5).astype(F32)))
    nodes += [
        helper.make_node("Sub", sub_in, ["d"], name="sub"),
        helper.make_node("Mul", ["d", "gamma"], ["scaled"], name="scale"),
        helper.make_node("Add", ["input", "scaled"], ["output"], name="residual"),
    ]
    return make_model(nodes, [("input", [2, c, hw, hw], F32)], [("output", F32, [2, c, hw, hw])], inits)


@pytest.mark.parametrize("norm_first", [False, True], ids=["norm-last", "norm-first"])
def test_subtracted_identity_merges_with_a_minus_sign(norm_first: bool) -> None:
    m = _mixer(np.random.default_rng(1), norm_first=norm_first)
    out, report = fold_onnx(m)
    assert report.left == 0 and report.folded == 2, str(report)
    norm = next(c for c in report.candidates if c.node == "bn_norm")
    assert norm.rule == "reparam" and norm.status is Status.FOLDED
    assert op_types(out).count("Conv") == 1 and "Sub" not in op_types(out) and "BatchNormalization" not in op_types(out)
    assert_valid(out)
    assert_equivalent(m, out, np.random.default_rng(0))


def test_plus_sign_would_be_caught() -> None:
    """The same graph with the Sub turned into an Add differs clearly: the sign is what the test checks."""
    m = _mixer(np.random.default_rng(2), norm_first=False)
    out, _ = fold_onnx(m)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(m)
    for n in wrong.graph.node:
        if n.op_type == "Sub":
            n.op_type = "Add"
    x = {"input": np.random.default_rng(3).standard_normal((2, 6, 7, 7)).astype(F32)}
    assert rel_err(run(wrong, x)[0], run(out, x)[0]) > 1e-2
    assert rel_err(run(m, x)[0], run(out, x)[0]) < 1e-5


def test_bn_as_minuend_is_left_with_a_reason() -> None:
    """``BN(x) − Σ convs`` would need the convs negated: not this rule; the BN stays, with a reason."""
    m = _mixer(np.random.default_rng(4), norm_first=False, minuend_is_bn=True)
    out, report = fold_onnx(m)
    norm = next(c for c in report.candidates if c.node == "bn_norm")
    assert norm.status is Status.SKIPPED and norm.reasons
    assert_equivalent(m, out, np.random.default_rng(0))


def test_torch_repmixer_exports(tmp_path) -> None:
    """timm's RepMixer shape (MobileOne mixer with identity/scale/kxk branches, norm = identity BN only)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    c = 8

    class MobileOne(nn.Module):
        def __init__(self, convs: bool) -> None:
            super().__init__()
            self.identity = nn.BatchNorm2d(c)
            self.scale = nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), nn.BatchNorm2d(c)) if convs else None
            self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)) if convs else None

        def forward(self, x):
            out = 0
            if self.scale is not None:
                out = self.scale(x)
            out = out + self.identity(x)
            if self.kxk is not None:
                out = out + self.kxk(x)
            return out

    class RepMixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.mixer = MobileOne(False), MobileOne(True)
            self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.7))

        def forward(self, x):
            return x + self.gamma * (self.mixer(x) - self.norm(x))

    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.GELU(), RepMixer(), RepMixer())
    folds_from_every_exporter(net, None, tmp_path, gone=("BatchNormalization", "Sub"))
