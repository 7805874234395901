"""Initializers listed as graph inputs: constants before IR 4, overridable defaults from IR 4 on."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold import fold_onnx
from bnfold.report import Reason
from tests.onnx.helpers import bn_inits, bn_node, init, ort_session


def ir3_model(rng):
    """IR 3 (every initializer listed as an input), the conv weight built by ConstantOfShape × a constant."""
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["w0"], name="cos", value=helper.make_tensor("v", 1, [1], [0.25])),
        helper.make_node("Mul", ["w0", "wscale"], ["w"], name="wmul"),
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "output"),
    ]
    inits = [init("wshape", np.array([4, 3, 3, 3], np.int64)), init("wscale", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), *bn_inits("bn", 4, rng)]
    inputs = [helper.make_tensor_value_info("input", 1, [1, 3, 5, 5])] + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("output", 1, [1, 4, 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    onnx.checker.check_model(m, full_check=True)
    return m


def close(a, b, x):
    ra, rb = ort_session(a).run(None, x)[0], ort_session(b).run(None, x)[0]
    return np.max(np.abs(ra - rb)) <= 1e-5 * np.max(np.abs(ra))


def test_ir3_folds_by_default_and_keeps_the_spec() -> None:
    rng = np.random.default_rng(0)
    m = ir3_model(rng)
    out, report = fold_onnx(m)
    assert report.folded == 1
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    inputs = [i.name for i in out.graph.input]
    assert not any(name.startswith("bn.") for name in inputs)  # folded parameters dropped from the inputs
    assert {t.name for t in out.graph.initializer} <= set(inputs)  # IR 3: every initializer is listed
    assert any("IR version 3" in n for n in report.notes)
    onnx.checker.check_model(out, full_check=True)
    assert close(m, out, {"input": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)})


def test_ir8_refuses_by_default_and_folds_with_assume_constant() -> None:
    rng = np.random.default_rng(1)
    m = ir3_model(rng)
    m.ir_version = 8
    out, report = fold_onnx(m)
    assert report.folded == 0
    assert report.candidates[0].reasons[0].code is Reason.OVERRIDABLE_INITIALIZER
    assert out.SerializeToString() == m.SerializeToString()

    out2, report2 = fold_onnx(m, assume_constant=True)
    assert report2.folded == 1
    assert [i.name for i in out2.graph.input] == ["input"]  # changed defaults are no longer offered as inputs
    assert close(m, out2, {"input": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)})


def test_ir8_untouched_overridable_inputs_stay_listed() -> None:
    """With --assume-constant, an overridable initializer the fold did not change stays an input."""
    rng = np.random.default_rng(2)
    m = ir3_model(rng)
    m.ir_version = 8
    m.graph.node.append(helper.make_node("Add", ["output", "offset"], ["output2"], name="add_offset"))
    m.graph.initializer.append(init("offset", np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)))
    m.graph.input.append(helper.make_tensor_value_info("offset", 1, [1, 1, 5, 5]))
    m.graph.output[0].name = "output2"
    out, report = fold_onnx(m, assume_constant=True)
    names = [i.name for i in out.graph.input]
    assert report.folded == 1 and "offset" in names
