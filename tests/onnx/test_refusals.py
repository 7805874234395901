"""Each refusal: the graph is unchanged there (bytes, when it is the only candidate) and the reason is reported.

Every case is also checked in a model where a second, foldable Conv → BN pair *does* fold: the refused
BatchNorm, its producer and their tensors come out exactly as they went in.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from bnfold import check_onnx, fold_onnx
from bnfold.report import Reason, Status
from tests.onnx.helpers import (
    F16,
    F32,
    assert_equivalent,
    assert_valid,
    bn_inits,
    bn_node,
    bn_stats,
    init,
    initializers,
    make_model,
    rand,
)

C = 4


def _conv(name, x, y, w, b=None, pads=1):
    ins = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", ins, [y], name=name, pads=[pads] * 4)


def _base(rng, dtype=F32):
    """conv0 → bn0 (always foldable) → t0: a pair that folds beside the refused one."""
    nodes = [_conv("conv0", "input", "c0", "w0", "b0"), bn_node("c0", "t0", "bn0")]
    inits = [init("w0", rand((C, C, 3, 3), rng, dtype, 0.5)), init("b0", rand(C, rng, dtype)), *bn_inits("bn0", bn_stats(C, rng, dtype))]
    return nodes, inits


def _refused_part(out, names):
    return {n.name: n for n in out.graph.node if n.name in names}


def _assert_refused(m, code: Reason, *, bn="bn", keep=("conv", "bn"), assume_constant=False):
    """The refused BN is reported with `code`; it and its producer are untouched; the rest folds and agrees."""
    out, report = fold_onnx(m, assume_constant=assume_constant)
    refused = [c for c in report.candidates if c.node == bn]
    assert len(refused) == 1, str(report)
    cand = refused[0]
    assert cand.status is Status.SKIPPED
    assert [r.code for r in cand.reasons][:1] == [code], str(report)
    assert cand.reasons[0].message
    # same answer from the dry run
    dry = check_onnx(m, assume_constant=assume_constant)
    assert [(c.node, c.status, [r.code for r in c.reasons]) for c in dry.candidates if c.status is Status.SKIPPED] == [
        (c.node, c.status, [r.code for r in c.reasons]) for c in report.candidates if c.status is Status.SKIPPED
    ]
    before, after = _refused_part(m, keep), _refused_part(out, keep)
    assert set(after) == set(before), "the refused nodes are still there"
    for name, node in before.items():
        assert after[name].SerializeToString() == node.SerializeToString(), f"{name} changed"
    src, dst = initializers(m), initializers(out)
    for node in before.values():
        for i in node.input:
            if i in src:
                assert i in dst and dst[i].tobytes() == src[i].tobytes(), f"{i} changed"
    return out, report


def _with_fold_beside(rng, nodes, inits, inputs, outputs, **kw):
    """The refused pattern (reading t0) behind a foldable conv0 → bn0: one fold, one refusal."""
    base_nodes, base_inits = _base(rng)
    return make_model(base_nodes + nodes, inputs, outputs, base_inits + inits, **kw)


def _only(m, code, **kw):
    """Alone in its model: nothing folds, the output is the input, byte for byte."""
    out, report = fold_onnx(m, **kw)
    assert report.folded == 0 and report.left == 1, str(report)
    assert report.candidates[0].reasons[0].code is code
    assert out.SerializeToString() == m.SerializeToString()


def _conv_bn_nodes(rng, x="t0", dtype=F32):
    nodes = [_conv("conv", x, "c", "w", "b"), bn_node("c", "output", "bn")]
    inits = [init("w", rand((C, C, 3, 3), rng, dtype, 0.5)), init("b", rand(C, rng, dtype)), *bn_inits("bn", bn_stats(C, rng, dtype))]
    return nodes, inits


IN = [("input", [2, C, 5, 5], F32)]


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-a-fold"])
def test_other_consumer(beside):
    rng = np.random.default_rng(1)
    x = "t0" if beside else "input"
    nodes, inits = _conv_bn_nodes(rng, x)
    nodes.append(helper.make_node("Relu", ["c"], ["other"], name="relu"))
    outs = [("output", F32), ("other", F32)]
    m = _with_fold_beside(rng, nodes, inits, IN, outs) if beside else make_model(nodes, IN, outs, inits)
    out, report = _assert_refused(m, Reason.OTHER_CONSUMER, keep=("conv", "bn", "relu"))
    assert "relu" in report.candidates[-1].reasons[0].message or "Relu" in report.candidates[-1].reasons[0].message
    if beside:
        assert report.folded == 1
        assert_valid(out)
        assert_equivalent(m, out, rng)
    else:
        _only(m, Reason.OTHER_CONSUMER)


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-a-fold"])
def test_producer_output_is_graph_output(beside):
    rng = np.random.default_rng(2)
    x = "t0" if beside else "input"
    nodes, inits = _conv_bn_nodes(rng, x)
    outs = [("output", F32), ("c", F32)]
    m = _with_fold_beside(rng, nodes, inits, IN, outs) if beside else make_model(nodes, IN, outs, inits)
    out, report = _assert_refused(m, Reason.GRAPH_OUTPUT)
    if beside:
        assert_equivalent(m, out, rng)
    else:
        _only(m, Reason.GRAPH_OUTPUT)


@pytest.mark.parametrize("which", ["bn.var", "bn.scale", "w", "b"])
def test_parameter_is_graph_input(which):
    """A parameter fed at run time (a graph input without initializer) is not a constant."""
    rng = np.random.default_rng(3)
    nodes, inits = _conv_bn_nodes(rng, "t0")
    shape = {"w": [C, C, 3, 3]}.get(which, [C])
    inits = [t for t in inits if t.name != which]
    m = _with_fold_beside(rng, nodes, inits, IN + [(which, shape, F32)], [("output", F32)])
    out, report = _assert_refused(m, Reason.NOT_CONSTANT)
    assert which in report.candidates[-1].reasons[0].message
    assert report.folded == 1


def test_parameter_computed_at_run_time():
    """bn.scale = γ · ReduceMax(input): a value of the run, not of the model."""
    rng = np.random.default_rng(4)
    nodes, inits = _conv_bn_nodes(rng, "input")
    for t in inits:
        if t.name == "bn.scale":
            t.name = "gamma"
    nodes[1:1] = [
        helper.make_node("ReduceMax", ["input"], ["mx"], name="reduce", keepdims=0),
        helper.make_node("Mul", ["gamma", "mx"], ["bn.scale"], name="scale_mul"),
    ]
    m = make_model(nodes, IN, [("output", F32)], inits, opset=17)
    _assert_refused(m, Reason.NOT_CONSTANT, keep=("conv", "bn", "reduce", "scale_mul"))
    _only(m, Reason.NOT_CONSTANT)


def test_parameter_random_is_not_constant():
    rng = np.random.default_rng(5)
    nodes, inits = _conv_bn_nodes(rng, "input")
    inits = [t for t in inits if t.name != "bn.bias"]
    nodes.insert(0, helper.make_node("RandomNormal", [], ["bn.bias"], name="rnd", shape=[C], dtype=TensorProto.FLOAT))
    m = make_model(nodes, IN, [("output", F32)], inits)
    _only(m, Reason.NOT_CONSTANT)


def test_overridable_initializer_refused_then_assumed_constant():
    """IR ≥ 4: an initializer listed as a graph input is an overridable default."""
    rng = np.random.default_rng(6)
    nodes, inits = _conv_bn_nodes(rng, "input")
    m = make_model(nodes, IN + [("bn.mean", [C], F32)], [("output", F32)], inits)
    assert m.ir_version >= 4
    _assert_refused(m, Reason.OVERRIDABLE_INITIALIZER)
    _only(m, Reason.OVERRIDABLE_INITIALIZER)
    out, report = fold_onnx(m, assume_constant=True)
    assert report.folded == 1
    assert "bn.mean" not in {i.name for i in out.graph.input}, "a folded-away default is no longer an input"
    assert_valid(out)
    feeds = {"input": rng.standard_normal((2, C, 5, 5)).astype(np.float32)}
    from tests.onnx.helpers import rel_err, run

    assert rel_err(run(m, feeds)[0], run(out, feeds)[0]) < 1e-5


@pytest.mark.parametrize("variant", ["opset9-extra-outputs", "opset14-training_mode=1"])
def test_training_mode(variant):
    rng = np.random.default_rng(7)
    nodes, inits = _conv_bn_nodes(rng, "input")
    outs = [("output", F32)]
    opset = 15
    bn = nodes[1]
    if variant == "opset9-extra-outputs":
        opset = 9
        bn.output.extend(["rm", "rv", "sm", "sv"])
        outs += [("rm", F32, [C]), ("rv", F32, [C])]
    else:
        bn.attribute.append(helper.make_attribute("training_mode", 1))
        bn.output.extend(["rm", "rv"])
        outs += [("rm", F32, [C]), ("rv", F32, [C])]
    m = make_model(nodes, IN, outs, inits, opset=opset)
    _assert_refused(m, Reason.TRAINING_MODE)
    _only(m, Reason.TRAINING_MODE)


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_fp16_overflow(where):
    """|γ|/√(σ²+ε) ≈ 1e4 makes a folded float16 value pass 65504: refused, nothing written."""
    rng = np.random.default_rng(8)
    nodes, inits = _conv_bn_nodes(rng, "input", dtype=F16)
    st = bn_stats(C, rng, F16)
    st["var"][:] = np.float16(1e-4)
    st["scale"][:] = np.float16(100.0)  # s ≈ 1e4 (ε = 1e-5 → 9535)
    st["mean"][:] = np.float16(0.0)
    if where == "weight":
        w = rand((C, C, 3, 3), rng, F16, 0.5)
        w[1, 0, 0, 0] = np.float16(10.0)  # 95 350 > 65 504
        b = rand(C, rng, F16)
    else:
        w = (rand((C, C, 3, 3), rng, F16, 0.1)).clip(-0.5, 0.5).astype(F16)
        b = np.full(C, 10.0, F16)  # bias · s ≈ 95 350
    inits = [init("w", w), init("b", b), *bn_inits("bn", st)]
    m = make_model(nodes, [("input", [2, C, 5, 5], F16)], [("output", F16)], inits)
    out, report = _assert_refused(m, Reason.FP16_OVERFLOW)
    assert "65504" in report.candidates[0].reasons[0].message
    _only(m, Reason.FP16_OVERFLOW)


def test_matmul_rank3_output_bn_over_axis1():
    """[B, M, K]·[K, N] = [B, M, N]; BatchNorm normalises axis 1 (M), the MatMul's columns are N."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("MatMul", ["input", "W"], ["mm"], name="matmul"), bn_node("mm", "output", "bn")]
    inits = [init("W", rand((5, 4), rng)), *bn_inits("bn", bn_stats(4, rng))]  # 4 == N == M: channels line up by count only
    m = make_model(nodes, [("input", [2, 4, 5], F32)], [("output", F32)], inits)
    _assert_refused(m, Reason.SHAPE_MISMATCH, keep=("matmul", "bn"))
    _only(m, Reason.SHAPE_MISMATCH)


def test_no_linear_neighbour():
    rng = np.random.default_rng(11)
    nodes = [bn_node("input", "y", "bn"), helper.make_node("Relu", ["y"], ["output"], name="relu")]
    m = make_model(nodes, IN, [("output", F32)], bn_inits("bn", bn_stats(C, rng)))
    _assert_refused(m, Reason.NO_LINEAR_NEIGHBOUR, keep=("bn", "relu"))
    _only(m, Reason.NO_LINEAR_NEIGHBOUR)



@pytest.mark.parametrize("twist", ["other-consumer", "graph-output"])
def test_matmul_bias_add_output_with_other_consumer_reason(twist):
    """MatMul → Add(bias) → BN where the Add's output is also read elsewhere: the reason is that reader."""
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "bb"], ["y"], name="bias_add"),
        bn_node("y", "output", "bn"),
    ]
    outs = [("output", F32)]
    if twist == "other-consumer":
        nodes.append(helper.make_node("Relu", ["y"], ["other"], name="relu"))
        outs.append(("other", F32))
    else:
        outs.append(("y", F32))
    inits = [init("W", rand((5, 4), rng)), init("bb", rand(4, rng)), *bn_inits("bn", bn_stats(4, rng))]
    m = make_model(nodes, [("input", [3, 5], F32)], outs, inits)
    code = Reason.OTHER_CONSUMER if twist == "other-consumer" else Reason.GRAPH_OUTPUT
    _only(m, code)
