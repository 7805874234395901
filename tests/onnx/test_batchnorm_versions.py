"""BatchNormalization of every opset version (1, 6, 7, 9, 14, 15) and dtype folds exactly, or is refused.

Oracles: onnxruntime at ORT_DISABLE_ALL runs BatchNormalization 7, 9, 14 and 15. It has no kernel for
versions 1 and 6: there the original model is converted to opset 9 with `onnx.version_converter` (with
`is_test=1` that conversion only drops attributes) and run in onnxruntime, and for version 6 the
unconverted model also runs in `onnx.reference.ReferenceEvaluator` (which has no version-1 kernel).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, version_converter

from bnfold import fold_onnx
from bnfold.report import Reason
from tests.onnx.helpers import (
    BF16,
    F16,
    F32,
    F64,
    assert_equivalent,
    bn_node,
    bn_stats,
    conv_bn,
    fold_and_verify,
    gemm_bn,
    init,
    make_model,
    op_types,
    rand,
)


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
@pytest.mark.parametrize("epsilon", [None, 1e-3, 0.1], ids=["eps-default", "eps1e-3", "eps0.1"])
def test_versions_run_by_onnxruntime(opset, epsilon):
    rng = np.random.default_rng(opset * 7 + (epsilon is None))
    m = conv_bn(rng, opset=opset, groups=2, pads=[1, 1, 1, 1])
    bn = m.graph.node[1]
    if epsilon is not None:
        bn.attribute.append(helper.make_attribute("epsilon", epsilon))
    if opset == 7:
        bn.attribute.append(helper.make_attribute("spatial", 1))
    if opset >= 14:
        bn.attribute.append(helper.make_attribute("training_mode", 0))
    bn.attribute.append(helper.make_attribute("momentum", 0.7))  # ignored at inference
    out, _ = fold_and_verify(m, rng)
    assert op_types(out) == ["Conv"]
    assert out.opset_import[0].version == opset


@pytest.mark.parametrize("opset", [1, 6])
@pytest.mark.parametrize("epsilon", [None, 1e-3], ids=["eps-default", "eps1e-3"])
def test_old_versions_against_converted_model(opset, epsilon):
    rng = np.random.default_rng(opset + 3 * (epsilon is None))
    m = conv_bn(rng, opset=opset, pads=[1, 1, 1, 1])
    bn = m.graph.node[1]
    if epsilon is not None:
        bn.attribute.append(helper.make_attribute("epsilon", epsilon))
    assert m.ir_version == 3
    reference = version_converter.convert_version(m, 9)
    assert [n.op_type for n in reference.graph.node] == ["Conv", "BatchNormalization"]
    out, report = fold_and_verify(m, rng, reference=reference)
    assert op_types(out) == ["Conv"]
    assert out.ir_version == 3 and out.opset_import[0].version == opset
    # IR 3: every initializer stays listed as a graph input, and nothing else is.
    inits = {t.name for t in out.graph.initializer}
    assert inits <= {i.name for i in out.graph.input}
    assert {i.name for i in out.graph.input} - inits == {"input"}
    if opset == 6:  # a second, unconverted oracle
        assert_equivalent(m, out, rng, backend="ref")


def test_opset6_is_test_0_is_training_mode_and_refused():
    """BatchNormalization < 7 with is_test = 0 (the default) normalises with batch statistics."""
    m = conv_bn(np.random.default_rng(6), opset=6, pads=[1, 1, 1, 1])
    bn = m.graph.node[1]
    del bn.attribute[:]  # is_test absent: 0
    out, report = fold_onnx(m)
    assert report.folded == 0 and report.left == 1
    assert report.candidates[0].reasons[0].code is Reason.TRAINING_MODE
    assert out.SerializeToString() == m.SerializeToString()


@pytest.mark.parametrize("opset", [6, 7])
def test_spatial_0_is_refused(opset):
    """spatial = 0: per-element statistics (shape [C, H, W]); not a per-channel map."""
    rng = np.random.default_rng(60 + opset)
    m = conv_bn(rng, opset=opset, c_out=4, spatial=4, pads=[1, 1, 1, 1])
    bn = m.graph.node[1]
    bn.attribute.append(helper.make_attribute("spatial", 0))
    del m.graph.initializer[:]
    m.graph.initializer.extend(
        [init("conv.w", rand((4, 4, 3, 3), rng)), init("conv.b", rand(4, rng))]
        + [init(f"bn.{k}", v) for k, v in bn_stats(4, rng).items()]
    )
    # per-element statistics would be [C, H, W]; keep [C] here: the refusal is on the attribute itself
    out, report = fold_onnx(m)
    assert report.folded == 0 and report.left == 1
    assert report.candidates[0].reasons[0].code is Reason.UNSUPPORTED
    assert out.SerializeToString() == m.SerializeToString()


def test_default_epsilon_is_float32_1e_5():
    """Regression: an absent epsilon is the float32 1e-5 (9.99999974738e-06), not the float64 1e-5.

    With a variance of 1e-4 the two differ by ~1e-9 in the scale: visible at float64 tolerance (1e-12).
    """
    rng = np.random.default_rng(5)
    m = gemm_bn(rng, dtype=F64, c_shape=(4,))
    assert not [a for a in m.graph.node[1].attribute if a.name == "epsilon"]
    fold_and_verify(m, rng)  # float64 Gemm and BatchNormalization both run in onnxruntime


# ---------------------------------------------------------------------------------------------
# dtypes of the BatchNorm itself (Gemm producer: every dtype runs in onnxruntime or its float32 copy)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, F64, BF16], ids=["f32", "f16", "f64", "bf16"])
@pytest.mark.parametrize("opset", [14, 15])
def test_batchnorm_dtypes(dtype, opset):
    rng = np.random.default_rng(int(opset) + len(np.dtype(dtype).name))
    m = gemm_bn(rng, dtype=dtype, beta=1.5, trans_b=1)
    m.opset_import[0].version = opset
    fold_and_verify(m, rng)


def test_opset15_mixed_parameter_types():
    """BatchNormalization-15: X float16, scale/B float16 (T1), mean/var float32 (T2)."""
    rng = np.random.default_rng(15)
    st = bn_stats(4, rng, F32)
    nodes = [
        helper.make_node("Gemm", ["input", "B"], ["g"], name="gemm"),
        bn_node("g", "output"),
    ]
    inits = [
        init("B", rand((5, 4), rng, F16, 0.5)),
        init("bn.scale", st["scale"].astype(F16)),
        init("bn.bias", st["bias"].astype(F16)),
        init("bn.mean", st["mean"]),
        init("bn.var", st["var"]),
    ]
    m = make_model(nodes, [("input", [3, 5], F16)], [("output", F16)], inits, opset=15)
    out, _ = fold_and_verify(m, rng)
    assert {t.data_type for t in out.graph.initializer} == {10}, "folded tensors keep the layer's float16"


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bn_with_tiny_variance_and_large_inputs(dtype):
    """var = 1e-4 on every channel: |s| up to ~300, inputs ×100 — still within tolerance of the scale."""
    rng = np.random.default_rng(99)
    m = conv_bn(rng, dtype=dtype, pads=[1, 1, 1, 1])
    for t in m.graph.initializer:
        if t.name == "bn.var":
            t.CopyFrom(init("bn.var", np.full(6, 1e-4, dtype)))
    fold_and_verify(m, rng, backend="ref" if dtype == F64 else "ort")
