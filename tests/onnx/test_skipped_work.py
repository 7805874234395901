"""Work the pass skips when a model does not need it — shape inference, the graph import — with the same answers."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.onnx import api, io
from tests.onnx.helpers import conv_bn, matmul_bn


def _eager(model: onnx.ModelProto) -> dict:
    """What `infer_shapes` answered before it was lazy: everything, inferred up front."""
    return api._infer_all(model, None)


def test_conv_bn_plan_needs_no_inference(monkeypatch) -> None:
    calls = []
    real = api._infer_all
    monkeypatch.setattr(api, "_infer_all", lambda *a: calls.append(1) or real(*a))
    m = conv_bn(np.random.default_rng(0))
    report = api.check_onnx(m)
    assert report.foldable == 1
    assert calls == []  # the weights' dims were enough
    folded, report = api.fold_onnx(m)
    assert report.folded == 1 and "BatchNormalization" not in {n.op_type for n in folded.graph.node}


def test_lookups_answer_as_eager_inference() -> None:
    m = matmul_bn(np.random.default_rng(1), rank=3)
    shapes = api.infer_shapes(m)
    assert shapes.get("mm.W") == ([5, 4], onnx.TensorProto.FLOAT) and not shapes.inferred  # an initializer
    assert shapes.get("mm_out") == _eager(m)["mm_out"] and shapes.inferred  # anything else: inferred, once
    assert dict(shapes) == _eager(m)
    assert shapes.get("no such tensor") is None


def test_a_given_skeleton_is_used_not_built_again(monkeypatch) -> None:
    m = matmul_bn(np.random.default_rng(2))
    skeleton = io.skeleton(m)
    eager = _eager(m)
    monkeypatch.setattr(io, "skeleton", lambda *_: (_ for _ in ()).throw(AssertionError("built again")))
    assert dict(api.infer_shapes(m, skeleton)) == eager


def test_a_model_without_affine_ops_is_not_imported(monkeypatch) -> None:
    """A folded model (the everyday CI gate) costs its load: no graph import, no plan."""
    folded, _ = api.fold_onnx(conv_bn(np.random.default_rng(3)))
    monkeypatch.setattr(api, "import_model", lambda *_: (_ for _ in ()).throw(AssertionError("imported")))
    report = api.check_onnx(folded)
    assert report.candidates == [] and report.nodes_after == report.nodes_before
    again, report = api.fold_onnx(folded)
    assert again is folded or again.SerializeToString() == folded.SerializeToString()
