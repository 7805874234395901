"""Property: for random producer → BatchNormalization graphs, bnfold either folds with equal outputs or
refuses with the expected reason and leaves the model byte-identical.

Random: the layer (Conv / ConvTranspose 1-3-D, Gemm, MatMul), channels, groups, kernel, strides, pads,
dilations, output padding, bias, Gemm's α/β/transA/transB/C shape, dtype (float32/float64/float16), BN
epsilon and statistics, and a twist: a weight shared with another reader, an extra consumer of the layer's
output, the layer's output as a graph output, or a BN parameter fed at run time.
Deterministic: `derandomize=True` (the same examples every run), no example database.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import helper

from bnfold import fold_onnx
from bnfold.report import Reason
from tests.onnx.helpers import (
    F16,
    F32,
    F64,
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

TWISTS = ["none", "none", "shared-weight", "other-consumer", "graph-output", "param-input"]
EXPECTED = {"other-consumer": Reason.OTHER_CONSUMER, "graph-output": Reason.GRAPH_OUTPUT, "param-input": Reason.NOT_CONSTANT}


@st.composite
def cases(draw):
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]))
    dtype = draw(st.sampled_from([F32, F32, F64, F16]))
    twist = draw(st.sampled_from(TWISTS))
    seed = draw(st.integers(0, 2**20))
    rng = np.random.default_rng(seed)
    attrs: dict = {}
    if op in ("Conv", "ConvTranspose"):
        dims = draw(st.integers(1, 3))
        groups = draw(st.integers(1, 3))
        if dtype == F64 and op == "ConvTranspose":
            groups = 1  # onnx.reference (the float64 oracle) mis-handles grouped ConvTranspose
        cig, cog = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        c_in, c_out = groups * cig, groups * cog
        k = draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims))
        strides = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
        dil = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
        pads = [draw(st.integers(0, kk - 1)) for kk in k] + [draw(st.integers(0, kk - 1)) for kk in k]
        spatial = 6 if dims < 3 else 4
        x_shape = [2, c_in] + [spatial] * dims
        attrs = {"group": groups, "kernel_shape": k, "strides": strides, "dilations": dil, "pads": pads}
        if op == "ConvTranspose" and draw(st.booleans()):
            attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]
        wshape = (c_in, cog, *k) if op == "ConvTranspose" else (c_out, cig, *k)
        inits = [init("w", rand(wshape, rng, dtype, 0.5))]
        ins = ["input", "w"]
        if draw(st.booleans()):
            inits.append(init("b", rand(c_out, rng, dtype)))
            ins.append("b")
        nodes = [helper.make_node(op, ins, ["y"], name="layer", **attrs)]
        c = c_out
    elif op == "Gemm":
        m, kk, n = (draw(st.integers(1, 5)) for _ in range(3))
        ta, tb = draw(st.integers(0, 1)), draw(st.integers(0, 1))
        alpha = draw(st.sampled_from([1.0, 0.5, -2.0]))
        beta = draw(st.sampled_from([1.0, 2.5, -0.5, 0.0]))
        c_shape = draw(st.sampled_from([None, (n,), (1, n), (m, n), ()]))
        x_shape = [kk, m] if ta else [m, kk]
        inits = [init("w", rand((n, kk) if tb else (kk, n), rng, dtype, 0.5))]
        ins = ["input", "w"]
        if c_shape is not None:
            inits.append(init("b", rand(c_shape, rng, dtype)))
            ins.append("b")
        nodes = [helper.make_node("Gemm", ins, ["y"], name="layer", alpha=alpha, beta=beta, transA=ta, transB=tb)]
        c = n
    else:
        m, kk, n = (draw(st.integers(1, 5)) for _ in range(3))
        x_shape = [m, kk]
        inits = [init("w", rand((kk, n), rng, dtype, 0.5))]
        nodes = [helper.make_node("MatMul", ["input", "w"], ["y"], name="layer")]
        if draw(st.booleans()):
            inits.append(init("b", rand(n, rng, dtype)))
            nodes.append(helper.make_node("Add", ["y", "b"], ["y2"], name="bias_add"))
            nodes[0].output[0] = "y0"
            nodes[1].input[0] = "y0"
            nodes[1].output[0] = "y"
        c = n
    bn_attrs = {}
    if draw(st.booleans()):
        bn_attrs["epsilon"] = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    nodes.append(bn_node("y", "output", **bn_attrs))
    inits += bn_inits("bn", bn_stats(c, rng, dtype))
    inputs = [("input", x_shape, dtype)]
    outputs = [("output", dtype)]
    producer_out = nodes[-2].output[0]  # the tensor BN reads (after the bias Add for MatMul)
    if twist == "shared-weight":
        nodes.append(helper.make_node("ReduceSum", ["w"], ["wsum"], name="wsum", keepdims=0))
        outputs.append(("wsum", dtype))
    elif twist == "other-consumer":
        nodes.append(helper.make_node("Relu", [producer_out], ["other"], name="other"))
        outputs.append(("other", dtype))
    elif twist == "graph-output":
        outputs.append((producer_out, dtype))
    elif twist == "param-input":
        which = draw(st.sampled_from(["bn.scale", "bn.bias", "bn.mean", "bn.var"]))
        inits = [t for t in inits if t.name != which]
        inputs.append((which, [c], dtype))
    try:
        model = make_model(nodes, inputs, outputs, inits)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        model = None  # e.g. a kernel larger than the padded input
    return model, twist, dtype, op, seed


@settings(max_examples=200, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_fold_is_exact_or_refused(case):
    model, twist, dtype, op, seed = case
    event(f"{op} {np.dtype(dtype).name} {twist}" if model is not None else "invalid model")
    if model is None:
        return
    before = model.SerializeToString()
    out, report = fold_onnx(model)
    assert model.SerializeToString() == before, "the caller's model is never mutated"
    rng = np.random.default_rng(seed)
    if twist in EXPECTED:
        assert report.folded == 0 and report.left == 1, str(report)
        code = report.candidates[0].reasons[0].code
        if op == "MatMul" and len(model.graph.node) > 2 and twist != "param-input":
            # MatMul → Add(bias) whose output is read elsewhere: reported as no-linear-neighbour today
            # (test_refusals.py::test_matmul_bias_add_output_with_other_consumer_reason, xfail)
            assert code in (EXPECTED[twist], Reason.NO_LINEAR_NEIGHBOUR), str(report)
        else:
            assert code is EXPECTED[twist], str(report)
        assert out.SerializeToString() == before
        return
    if report.folded == 0:  # the only acceptable refusal left: a folded float16 value beyond 65504
        assert dtype == F16 and report.candidates[0].reasons[0].code is Reason.FP16_OVERFLOW, str(report)
        assert out.SerializeToString() == before
        return
    assert report.folded == 1 and report.left == 0
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    assert_valid(out)
    if twist == "shared-weight":
        assert initializers(out)["w"].tobytes() == initializers(model)["w"].tobytes()
    backend = "ref" if dtype == F64 and op in ("Conv", "ConvTranspose") else "ort"
    assert_equivalent(model, out, rng, backend=backend)
    again, r2 = fold_onnx(out)
    assert r2.found == 0 and again.SerializeToString() == out.SerializeToString()
