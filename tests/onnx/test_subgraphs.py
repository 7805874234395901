"""BatchNorms inside If/Loop/Scan bodies and model-local functions are folded too."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from bnfold import fold_onnx
from tests.onnx.helpers import bn_inits, bn_node, init, ort_session


def if_model(rng):
    """then: Conv → BN using outer-scope constants; else: Conv with the same (shared) weight."""
    then_nodes = [helper.make_node("Conv", ["input", "conv.w"], ["c"], name="conv_then", pads=[1, 1, 1, 1]), bn_node("c", "t_out", "bn_then")]
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4, 5, 5])])
    else_g = helper.make_graph(
        [helper.make_node("Conv", ["input", "conv.w"], ["e_out"], name="conv_else", pads=[1, 1, 1, 1])],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4, 5, 5])],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["output"], name="if", then_branch=then_g, else_branch=else_g)],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 5, 5])],
        [init("conv.w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), *bn_inits("bn_then", 4, rng)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_if_branch_folds_with_outer_constants_and_shared_weight_copied() -> None:
    rng = np.random.default_rng(0)
    m = if_model(rng)
    out, report = fold_onnx(m)
    assert report.folded == 1 and report.candidates[0].graph == "if.then_branch"
    then_ops = [n.op_type for n in out.graph.node[0].attribute[0].g.node]
    assert then_ops == ["Conv"]
    # the else branch still reads the original, unscaled weight
    # (onnx-graphsurgeon moves a constant into the subgraph that alone reads it)
    graphs = [out.graph] + [a.g for a in out.graph.node[0].attribute]
    w = next(t for g in graphs for t in g.initializer if t.name == "conv.w")
    assert onnx.numpy_helper.to_array(w).tobytes() == onnx.numpy_helper.to_array(m.graph.initializer[0]).tobytes()
    s1, s2 = ort_session(m), ort_session(out)
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    for cond in (True, False):
        a = s1.run(None, {"input": x, "cond": np.array(cond)})[0]
        b = s2.run(None, {"input": x, "cond": np.array(cond)})[0]
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_loop_body_folds() -> None:
    rng = np.random.default_rng(1)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state", "W"], ["mm"], name="body_mm"),
            bn_node("mm", "state_out", "body_bn"),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, 4])],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "input"], ["output"], name="loop", body=body)],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 4])],
        [init("trip", np.array(3, np.int64)), init("W", (rng.standard_normal((4, 4)) * 0.5).astype(np.float32)), *bn_inits("body_bn", 4, rng)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, report = fold_onnx(m)
    assert report.folded == 1
    x = rng.standard_normal((2, 4)).astype(np.float32)
    a, b = ort_session(m).run(None, {"input": x})[0], ort_session(out).run(None, {"input": x})[0]
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_model_local_function_folds() -> None:
    rng = np.random.default_rng(2)

    def const(name, arr):
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr.astype(np.float32), name))

    g_, b_, mu, var = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(1e-3, 3, 4)
    fn = helper.make_function(
        "local", "ConvBn", ["x"], ["y"],
        [const("w", rng.standard_normal((4, 3, 1, 1))), helper.make_node("Conv", ["x", "w"], ["c"], name="fconv"),
         const("g", g_), const("b", b_), const("mu", mu), const("v", var),
         helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "v"], ["y"], name="fbn")],
        [helper.make_opsetid("", 17)],
    )
    g = helper.make_graph(
        [helper.make_node("ConvBn", ["input"], ["output"], domain="local", name="call")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 5, 5])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn])
    m.ir_version = 8
    out, report = fold_onnx(m)
    assert report.folded == 1 and report.candidates[0].graph.startswith("function")
    assert "BatchNormalization" not in [n.op_type for n in out.functions[0].node]
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    a, b = ort_session(m).run(None, {"input": x})[0], ort_session(out).run(None, {"input": x})[0]
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
