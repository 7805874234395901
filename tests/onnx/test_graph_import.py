"""`graph_import.import_model` builds exactly what `gs.import_onnx` builds, and does so fast where it can."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from bnfold.onnx import graph_import
from sample_models import zoo
from tests.onnx.helpers import conv_bn, gemm_bn, matmul_bn

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def test_the_fast_path_is_in_use() -> None:
    """Fails when an onnx-graphsurgeon release changes what its objects hold: then every model silently
    takes `gs.import_onnx` (correct, slower), and `graph_import` needs a look."""
    assert graph_import.fast_path_available()


def _models() -> list:
    rng = np.random.default_rng(0)
    built = {
        "conv_bn": conv_bn(rng), "conv_bn_fp16": conv_bn(rng, dtype=np.float16), "gemm_bn": gemm_bn(rng),
        "matmul_bn_rank3": matmul_bn(rng, rank=3, bias_add=True),
    }
    params = [pytest.param(lambda m=m: m, id=name) for name, m in built.items()]
    params += [pytest.param(builder, id=f"zoo-{name}") for name, builder in zoo.BUILDERS.items()]
    params += [pytest.param(lambda p=p: onnx.load(p), id=p.name) for p in sorted(SAMPLES.glob("*.onnx"))]
    return params


@pytest.mark.parametrize("build", _models())
def test_same_graph_as_the_library(build) -> None:
    model = build()
    ours = graph_import.import_model(model)
    assert graph_import.describe(ours) == graph_import.describe(gs.import_onnx(model))
    assert gs.export_onnx(ours).SerializeToString() == gs.export_onnx(gs.import_onnx(model)).SerializeToString()


def _with_subgraph() -> onnx.ModelProto:
    f32 = onnx.TensorProto.FLOAT
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_then"])], "then", [], [helper.make_tensor_value_info("y_then", f32, [2])]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []), helper.make_tensor_value_info("x", f32, [2])],
        [helper.make_tensor_value_info("y", f32, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_other_models_go_to_the_library(monkeypatch) -> None:
    """Subgraphs, local functions and sparse initializers are left to `gs.import_onnx`."""
    calls = []
    real = gs.import_onnx
    monkeypatch.setattr(graph_import.gs, "import_onnx", lambda m: calls.append(1) or real(m))
    graph_import.import_model(_with_subgraph())
    assert calls == [1]
    graph_import.import_model(conv_bn(np.random.default_rng(1)))
    assert calls == [1]


def test_a_changed_library_turns_the_fast_path_off(monkeypatch) -> None:
    """The guard compares field by field: a field the library added (here: to every Variable) is noticed."""
    real = gs.Variable.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.added_by_a_new_release = None

    monkeypatch.setattr(gs.Variable, "__init__", init)
    assert not graph_import.fast_path_available.__wrapped__()
