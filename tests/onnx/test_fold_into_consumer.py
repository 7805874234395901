"""BatchNorm before a linear layer folds into that layer's input channels, only where exact."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold import fold_onnx
from bnfold.report import Reason, Status
from tests.onnx.helpers import F32, assert_equivalent, bn_inits, bn_node, init, make_model, op_types


def bn_conv(rng, *, groups=1, pads=(0, 0, 0, 0), auto_pad=None, c_in=4, c_out=6, bias=True):
    attrs = {"group": groups}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    conv_inputs = ["y", "conv.w"] + (["conv.b"] if bias else [])
    nodes = [bn_node("input", "y"), helper.make_node("Conv", conv_inputs, ["output"], name="conv", **attrs)]
    inits = [init("conv.w", rng.standard_normal((c_out, c_in // groups, 3, 3)).astype(np.float32)), *bn_inits("bn", c_in, rng)]
    if bias:
        inits.append(init("conv.b", rng.standard_normal(c_out).astype(np.float32)))
    return make_model(nodes, [("input", [2, c_in, 7, 7], F32)], [("output", F32)], inits)


@pytest.mark.parametrize("groups,c_in,c_out", [(1, 4, 6), (2, 4, 6), (4, 4, 8)], ids=["plain", "grouped", "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_into_unpadded_conv(groups: int, c_in: int, c_out: int, bias: bool) -> None:
    rng = np.random.default_rng(groups * 10 + bias)
    m = bn_conv(rng, groups=groups, c_in=c_in, c_out=c_out, bias=bias)
    out, report = fold_onnx(m)
    assert report.folded == 1 and report.candidates[0].direction == "into-consumer"
    assert op_types(out) == ["Conv"]
    assert_equivalent(m, out, rng)


def test_bn_into_valid_auto_pad_conv() -> None:
    rng = np.random.default_rng(5)
    m = bn_conv(rng, auto_pad="VALID")
    out, report = fold_onnx(m)
    assert report.folded == 1
    assert_equivalent(m, out, rng)


@pytest.mark.parametrize("kw", [{"pads": (1, 1, 1, 1)}, {"auto_pad": "SAME_UPPER"}], ids=["pads", "same"])
def test_padding_conv_is_refused_and_unchanged(kw) -> None:
    m = bn_conv(np.random.default_rng(6), **kw)
    out, report = fold_onnx(m)
    assert report.folded == 0 and report.left == 1
    assert report.candidates[0].reasons[0].code is Reason.PADDING
    assert out.SerializeToString() == m.SerializeToString()


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("with_c", [True, False])
def test_bn_into_gemm(trans_b: int, alpha: float, beta: float, with_c: bool) -> None:
    rng = np.random.default_rng(trans_b + 2 * with_c)
    k, n = 5, 3
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inputs = ["y", "W"] + (["C"] if with_c else [])
    nodes = [
        bn_node("input", "y"),
        helper.make_node("Gemm", inputs, ["output"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
    ]
    inits = [init("W", w), *bn_inits("bn", k, rng)]
    if with_c:
        inits.append(init("C", rng.standard_normal(n).astype(np.float32)))
    m = make_model(nodes, [("input", [4, k], F32)], [("output", F32, [4, n])], inits)
    out, report = fold_onnx(m)
    assert report.folded == 1 and op_types(out) == ["Gemm"]
    assert_equivalent(m, out, rng)


def test_bn_into_matmul() -> None:
    rng = np.random.default_rng(9)
    nodes = [bn_node("input", "y"), helper.make_node("MatMul", ["y", "W"], ["output"], name="mm")]
    inits = [init("W", rng.standard_normal((5, 3)).astype(np.float32)), *bn_inits("bn", 5, rng)]
    m = make_model(nodes, [("input", [4, 5], F32)], [("output", F32, [4, 3])], inits)
    out, report = fold_onnx(m)
    assert report.folded == 1 and "BatchNormalization" not in op_types(out)
    assert_equivalent(m, out, rng)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_classifier_head_bn_flatten_gemm(flatten: str) -> None:
    """BN over [N, C, 2, 2] → Flatten → Gemm: channel c becomes features 4c..4c+3."""
    rng = np.random.default_rng(11)
    c, hw = 3, 2
    if flatten == "Flatten":
        flat = helper.make_node("Flatten", ["y"], ["f"], name="flatten", axis=1)
        extra = []
    else:
        flat = helper.make_node("Reshape", ["y", "shape"], ["f"], name="reshape")
        extra = [init("shape", np.array([0, -1], np.int64))]
    nodes = [bn_node("input", "y"), flat, helper.make_node("Gemm", ["f", "W", "C"], ["output"], name="fc", transB=1)]
    inits = [init("W", rng.standard_normal((7, c * hw * hw)).astype(np.float32)), init("C", rng.standard_normal(7).astype(np.float32)), *bn_inits("bn", c, rng), *extra]
    m = make_model(nodes, [("input", [2, c, hw, hw], F32)], [("output", F32, [2, 7])], inits)
    out, report = fold_onnx(m)
    assert report.folded == 1, str(report)
    assert op_types(out) == [flatten, "Gemm"]
    assert_equivalent(m, out, rng)


def test_bn_feeding_two_layers_is_refused() -> None:
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("r", "y"),
        helper.make_node("MatMul", ["y", "W"], ["o1"], name="mm1"),
        helper.make_node("MatMul", ["y", "W2"], ["o2"], name="mm2"),
    ]
    inits = [init("W", rng.standard_normal((5, 3)).astype(np.float32)), init("W2", rng.standard_normal((5, 2)).astype(np.float32)), *bn_inits("bn", 5, rng)]
    m = make_model(nodes, [("input", [4, 5], F32)], [("o1", F32, [4, 3]), ("o2", F32, [4, 2])], inits)
    out, report = fold_onnx(m)
    assert report.folded == 0
    cand = report.candidates[0]
    assert cand.status is Status.SKIPPED and cand.reasons[0].code is Reason.OTHER_CONSUMER
    assert "mm1" in cand.reasons[0].message and "mm2" in cand.reasons[0].message


def test_producer_preferred_when_both_sides_fold() -> None:
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["a"], name="mm1"),
        bn_node("a", "y"),
        helper.make_node("MatMul", ["y", "W2"], ["output"], name="mm2"),
    ]
    inits = [init("W1", rng.standard_normal((5, 4)).astype(np.float32)), init("W2", rng.standard_normal((4, 3)).astype(np.float32)), *bn_inits("bn", 4, rng)]
    m = make_model(nodes, [("input", [2, 5], F32)], [("output", F32, [2, 3])], inits)
    out, report = fold_onnx(m)
    assert report.candidates[0].direction == "into-producer" and report.candidates[0].target == "mm1"
    assert_equivalent(m, out, rng)
