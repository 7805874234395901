"""Per-channel Mul/Add/Sub/Div chains (Keras, Caffe BN+Scale, BN→BN) compose into one fold; only where per-channel."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold import fold_onnx
from tests.onnx.helpers import F32, assert_equivalent, bn_inits, bn_node, init, make_model, op_types

C = 4


def conv_then(rng, chain_nodes, chain_inits, hw=5, last="z"):
    nodes = [helper.make_node("Conv", ["input", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1]), *chain_nodes,
             helper.make_node("Relu", [last], ["output"], name="relu")]
    inits = [init("conv.w", rng.standard_normal((C, 3, 3, 3)).astype(np.float32)), *chain_inits]
    return make_model(nodes, [("input", [1, 3, hw, hw], F32)], [("output", F32)], inits)


def pc(rng, shape=(C, 1, 1), positive=False):
    v = rng.standard_normal(shape).astype(np.float32)
    return np.abs(v) + 0.5 if positive else v


def test_keras_mul_add_after_conv() -> None:
    rng = np.random.default_rng(0)
    m = conv_then(rng, [helper.make_node("Mul", ["c", "s"], ["m"], name="mul"), helper.make_node("Add", ["m", "t"], ["z"], name="add")],
                  [init("s", pc(rng)), init("t", pc(rng))])
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", "Relu"]
    assert report.affine_ops_folded == 2
    assert_equivalent(m, out, rng)


def test_sub_div_mul_add_normalisation_either_operand_order() -> None:
    """Sub(μ) → Div(√(σ²+ε)) → Mul(γ) → Add(β), with the constants written first where legal."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Sub", ["c", "mu"], ["a"], name="sub"),
        helper.make_node("Div", ["a", "sd"], ["b"], name="div"),
        helper.make_node("Mul", ["g", "b"], ["d"], name="mul"),  # constant first
        helper.make_node("Add", ["be", "d"], ["z"], name="add"),  # constant first
    ]
    inits = [init("mu", pc(rng)), init("sd", pc(rng, positive=True)), init("g", pc(rng)), init("be", pc(rng))]
    m = conv_then(rng, nodes, inits)
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", "Relu"], str(report)
    assert_equivalent(m, out, rng)


def test_constant_minus_x_negates() -> None:
    rng = np.random.default_rng(2)
    m = conv_then(rng, [helper.make_node("Sub", ["k", "c"], ["z"], name="rsub")], [init("k", pc(rng))])
    out, _ = fold_onnx(m)
    assert op_types(out) == ["Conv", "Relu"]
    assert_equivalent(m, out, rng)


def test_constant_divided_by_x_is_not_affine() -> None:
    rng = np.random.default_rng(3)
    m = conv_then(rng, [helper.make_node("Div", ["k", "c"], ["z"], name="rdiv")], [init("k", pc(rng, positive=True))])
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", "Div", "Relu"]
    assert out.SerializeToString() == m.SerializeToString()


def test_caffe_batchnorm_plus_scale() -> None:
    """Caffe exports BN (γ=1, β=0) followed by a Scale layer: BN → Mul → Add folds as one."""
    rng = np.random.default_rng(4)
    nodes = [bn_node("c", "b"), helper.make_node("Mul", ["b", "gamma"], ["s"], name="scale_mul"),
             helper.make_node("Add", ["s", "beta"], ["z"], name="scale_add")]
    m = conv_then(rng, nodes, [*bn_inits("bn", C, rng), init("gamma", pc(rng)), init("beta", pc(rng))])
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", "Relu"] and report.folded == 1
    assert report.candidates[0].nodes == ["bn", "scale_mul", "scale_add"]
    assert_equivalent(m, out, rng)


def test_bn_then_bn() -> None:
    rng = np.random.default_rng(5)
    m = conv_then(rng, [bn_node("c", "b", "bn1"), bn_node("b", "z", "bn2")], [*bn_inits("bn1", C, rng), *bn_inits("bn2", C, rng)])
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", "Relu"]
    assert report.found == 2 and report.folded == 2
    assert_equivalent(m, out, rng)


def test_conv_add_bias_then_bn() -> None:
    rng = np.random.default_rng(6)
    m = conv_then(rng, [helper.make_node("Add", ["c", "bias"], ["a"], name="bias_add"), bn_node("a", "z")],
                  [init("bias", pc(rng)), *bn_inits("bn", C, rng)])
    out, _ = fold_onnx(m)
    assert op_types(out) == ["Conv", "Relu"]
    assert_equivalent(m, out, rng)


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_width_broadcast_constant_is_left_alone(op: str) -> None:
    """A [C] constant on [N, C, H, W] broadcasts along the width, even when W == C: not per-channel."""
    rng = np.random.default_rng(7)
    m = conv_then(rng, [helper.make_node(op, ["c", "k"], ["z"], name="wmul")], [init("k", pc(rng, shape=(C,)))], hw=C)
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", op, "Relu"]
    assert out.SerializeToString() == m.SerializeToString()
    assert report.affine_ops_folded == 0


def test_width_broadcast_after_bn_stops_the_chain() -> None:
    rng = np.random.default_rng(8)
    nodes = [bn_node("c", "b"), helper.make_node("Mul", ["b", "k"], ["z"], name="wmul")]
    m = conv_then(rng, nodes, [*bn_inits("bn", C, rng), init("k", pc(rng, shape=(C,)))], hw=C)
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", "Mul", "Relu"]
    assert report.candidates[0].nodes == ["bn"]
    assert_equivalent(m, out, rng)


def test_scalar_constant_joins_the_chain() -> None:
    rng = np.random.default_rng(9)
    m = conv_then(rng, [helper.make_node("Mul", ["c", "k"], ["z"], name="smul")], [init("k", np.array(0.5, np.float32))])
    out, _ = fold_onnx(m)
    assert op_types(out) == ["Conv", "Relu"]
    assert_equivalent(m, out, rng)


def test_matmul_add_bias_alone_is_not_rewritten() -> None:
    """MatMul → Add(bias) with no BatchNorm is already canonical: folding it would churn, not help."""
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("MatMul", ["input", "W"], ["a"], name="mm"), helper.make_node("Add", ["a", "b"], ["output"], name="add")]
    inits = [init("W", rng.standard_normal((5, 3)).astype(np.float32)), init("b", pc(rng, shape=(3,)))]
    m = make_model(nodes, [("input", [2, 5], F32)], [("output", F32, [2, 3])], inits)
    out, report = fold_onnx(m)
    assert out.SerializeToString() == m.SerializeToString() and not report.candidates


def test_constant_that_broadcasts_the_data_up_is_not_folded() -> None:
    """[N, 1, H, W] · [1, C, 1, 1] → [N, C, H, W]: the Mul creates channels, it does not scale them."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "k"], ["m"], name="expand_mul"),
        helper.make_node("Conv", ["m", "w2"], ["output"], name="conv2"),
    ]
    inits = [init("w", rng.standard_normal((1, 3, 1, 1)).astype(np.float32)), init("k", pc(rng)),
             init("w2", rng.standard_normal((2, C, 1, 1)).astype(np.float32))]
    m = make_model(nodes, [("input", [1, 3, 5, 5], F32)], [("output", F32, [1, 2, 5, 5])], inits)
    out, report = fold_onnx(m)
    assert op_types(out) == ["Conv", "Mul", "Conv"]
    assert out.SerializeToString() == m.SerializeToString()
