"""Dead and fragile channels are reported, so the user sees what the original model already did."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold import fold_onnx
from bnfold.report import Reason
from tests.onnx.helpers import F16, assert_equivalent, conv_bn_relu, init, make_model


def with_bn(m: onnx.ModelProto, **values) -> onnx.ModelProto:
    for t in m.graph.initializer:
        key = t.name.split(".")[-1]
        if t.name.startswith("bn.") and key in values:
            arr = onnx.numpy_helper.to_array(t).copy()
            for idx, v in values[key]:
                arr[idx] = v
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    return m


def test_tiny_variance_and_dead_channels_are_noted() -> None:
    rng = np.random.default_rng(0)
    m = with_bn(conv_bn_relu(rng), var=[(1, 0.0)], scale=[(2, 0.0)])
    out, report = fold_onnx(m)
    assert report.folded == 1
    text = "\n".join(report.notes)
    assert "bn: 1 fragile channel(s)" in text and "channels 1" in text
    assert "bn: 1 dead channel(s) with gamma = 0" in text and "channels 2" in text
    assert "note:" in str(report)


def test_subnormal_results_are_flushed_and_reported() -> None:
    rng = np.random.default_rng(1)
    m = conv_bn_relu(rng)
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = 1e-39  # stays subnormal after scaling by a moderate s
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "conv.w"))
    m = with_bn(m, scale=[(0, 0.5)], var=[(0, 1.0)])
    out, report = fold_onnx(m)
    assert any("subnormal" in n for n in report.notes)
    folded_w = onnx.numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "conv.w"))
    assert folded_w[0, 0, 0, 0] == 0.0
    assert_equivalent(m, out, rng)


def test_fp16_overflow_is_refused_not_written() -> None:
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((4, 3, 1, 1)) * 100).astype(np.float16)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["output"], name="bn")]
    inits = [init("w", w), init("g", np.full(4, 100, np.float16)), init("b", np.zeros(4, np.float16)),
             init("m", np.zeros(4, np.float16)), init("v", np.full(4, 1e-3, np.float16))]
    m = make_model(nodes, [("input", [1, 3, 4, 4], F16)], [("output", F16, [1, 4, 4, 4])], inits)
    out, report = fold_onnx(m)
    assert report.folded == 0
    assert report.candidates[0].reasons[0].code is Reason.FP16_OVERFLOW
    assert "float16" in report.candidates[0].reasons[0].message
    assert out.SerializeToString() == m.SerializeToString()
