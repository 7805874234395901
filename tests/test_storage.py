"""bnfold.onnx.storage: the ways of writing a folded model give the same bytes; the cheap counts agree.

The model is built here with `onnx.helper` (no shared builders), so the file stands on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx import api, io, storage


def _conv_bn(rng: np.random.Generator, c_in: int = 16, c_out: int = 32) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c_out).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "shift"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c_out).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_file_writes_the_in_memory_fold_byte_for_byte(tmp_path: Path, monkeypatch) -> None:
    """fold_file (pending arrays, streamed) writes exactly the bytes of the in-memory fold, serialised."""
    src = tmp_path / "m.onnx"
    model = _conv_bn(np.random.default_rng(0))
    onnx.save(model, src)
    monkeypatch.setattr(storage, "PENDING_BYTES", 0)  # every folded value pending, however small
    api.fold_file(src, tmp_path / "out.onnx")
    folded, _ = api.fold_onnx(model)
    assert (tmp_path / "out.onnx").read_bytes() == folded.SerializeToString()


def test_model_size_counts_dims_not_bytes() -> None:
    """`io.model_size` counts raw data from dims and type, which for a whole model is its byte count."""
    model = _conv_bn(np.random.default_rng(1))
    assert io.model_size(model) == sum(len(t.raw_data) for t in model.graph.initializer)


def test_the_checked_skeleton_gives_the_same_shapes() -> None:
    """The skeleton the precondition checked, handed on to shape inference, infers what a fresh one does."""
    model = _conv_bn(np.random.default_rng(2))
    skeleton = io.check_model(model)
    assert api.infer_shapes(model, skeleton) == api.infer_shapes(model)


def test_a_check_makes_no_store(tmp_path: Path, monkeypatch) -> None:
    """A check holds nothing and writes nothing: it never creates a `TensorStore`."""
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn(np.random.default_rng(3)), src)

    def forbidden(*args, **kwargs):
        raise AssertionError("check must not create a store")

    monkeypatch.setattr(api, "TensorStore", forbidden)
    assert api.check_onnx(src).foldable == 1


def test_a_spilling_store_keeps_large_values_out_of_memory(tmp_path: Path) -> None:
    """With a spill folder, a large value is written there once and held as a reference; small ones
    and values already held stay as they are."""
    store = storage.TensorStore(tmp_path)
    big = np.arange(storage.Spill.MIN_BYTES // 4, dtype=np.float32)
    held = store.hold(big, "big")
    assert store.hold(held, "big") is held  # a replay of the same edit spills nothing more
    small = store.hold(np.ones(3, np.float32), "small")
    store.close()
    assert isinstance(small, np.ndarray)
    assert held.tensor.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / "bnfold-folded-weights.bin").stat().st_size == big.nbytes
    assert np.array_equal(io.read_tensor(held.tensor), big)
