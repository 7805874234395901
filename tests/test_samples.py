"""The sample-model zoo: every builder gives a checker-valid model that onnxruntime runs, and the
committed .onnx files are exactly what `sample_models/make_samples.py` writes now."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from sample_models import make_samples, zoo
from tests.onnx.helpers import ort_session
from tests.paths import SAMPLES



def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Seeded inputs for every real graph input; BN parameters fed as inputs get positive values."""
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        values = rng.standard_normal(shape) if vi.name == "input" else rng.uniform(0.5, 1.5, shape)
        feeds[vi.name] = values.astype(dtype)
    return feeds


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_builder_valid_and_runs(name: str) -> None:
    model = zoo.BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert all(n.name for n in model.graph.node), "every node is named"
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert model.SerializeToString() == zoo.BUILDERS[name]().SerializeToString(), "deterministic"
    try:
        outputs = ort_session(model).run(None, _feeds(model))  # quiet: the overridable-initializer model makes ORT warn
    except Exception:
        if name in zoo.TRAINING_MODE_BUILDERS:
            return  # onnxruntime may refuse training-mode BatchNormalization; not part of the contract
        raise
    if name != "conv_bn_fp16_overflow":  # that one overflows fp16 by construction
        assert all(np.isfinite(o).all() for o in outputs)


def test_random_bn_stats_cover_the_traps() -> None:
    for dtype in (np.float32, np.float16, np.float64):
        s = zoo.random_bn_stats(8, np.random.default_rng(1), dtype)
        assert all(v.dtype == np.dtype(dtype) and v.shape == (8,) for v in s.values())
        assert (s["scale"] < 0).any() and (s["scale"] > 0).any()
        assert np.isclose(s["var"].min(), 1e-4, rtol=1e-2) and np.isclose(s["var"].max(), 1e2, rtol=1e-2)
        assert (s["var"] > 0).all() and (np.abs(s["mean"]) >= 0.09).all()


def test_resnet_tiny_shape() -> None:
    m = zoo.resnet_tiny()
    assert [i.name for i in m.graph.input] == ["input"]
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("BatchNormalization") == 6 and ops.count("Add") == 2 and ops[-1] == "Gemm"


def test_committed_samples_match_the_script(tmp_path: Path) -> None:
    written = make_samples.write_samples(tmp_path)
    committed = sorted(p.name for p in SAMPLES.glob("*.onnx"))
    assert committed == sorted(p.name for p in written), "rerun: python sample_models/make_samples.py"
    for fresh in written:
        old = SAMPLES / fresh.name
        assert old.stat().st_size < 200 * 1024
        assert old.read_bytes() == fresh.read_bytes(), f"{fresh.name} is stale: rerun python sample_models/make_samples.py"
