"""Small ONNX models for the CLI, bad-input and issue-6 tests, built at test time."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def bn_stats(c: int, rng: np.random.Generator, dtype=np.float32) -> list[np.ndarray]:
    """Random statistics that hide no bug: negative γ, variances 1e-4..1e2, non-zero means."""
    gamma = rng.standard_normal(c) * 1.5
    gamma[0] = -abs(gamma[0]) - 0.5
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c) * 2
    var = np.exp(rng.uniform(np.log(1e-4), np.log(1e2), c))
    return [a.astype(dtype) for a in (gamma, beta, mean, var)]


def init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def bn_node(name: str, x: str, y: str, prefix: str | None = None, **attrs) -> onnx.NodeProto:
    p = prefix or name
    return helper.make_node(
        "BatchNormalization", [x, f"{p}.scale", f"{p}.bias", f"{p}.mean", f"{p}.var"], [y], name=name, **attrs
    )


def bn_inits(prefix: str, c: int, rng: np.random.Generator, dtype=np.float32) -> list[onnx.TensorProto]:
    g, b, m, v = bn_stats(c, rng, dtype)
    return [init(f"{prefix}.scale", g), init(f"{prefix}.bias", b), init(f"{prefix}.mean", m), init(f"{prefix}.var", v)]


def model(
    nodes,
    inputs: list[tuple[str, list]],
    outputs: list[tuple[str, list | None]],
    inits,
    *,
    opset: int = 17,
    ir: int = 8,
    elem=TensorProto.FLOAT,
    functions=(),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    m.ir_version = ir
    if any(s is None for _, s in outputs):  # let onnx fill in the output shapes the test left open
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for out in m.graph.output:
            if not out.type.tensor_type.HasField("shape") and out.name in known:
                out.type.CopyFrom(known[out.name].type)
    return m


def conv_bn_relu(rng: np.random.Generator, c_in=3, c_out=4, hw=6, pads=(1, 1, 1, 1)) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], name="conv", pads=list(pads)),
        bn_node("bn", "c", "y"),
        helper.make_node("Relu", ["y"], ["output"], name="relu"),
    ]
    inits = [
        init("conv.w", rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)),
        init("conv.b", rng.standard_normal(c_out).astype(np.float32)),
        *bn_inits("bn", c_out, rng),
    ]
    return model(nodes, [("input", [1, c_in, hw, hw])], [("output", None)], inits)


def session(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT fuses Conv+BN itself otherwise
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # initializer-as-input warnings are expected in some tests
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feeds_for(m: onnx.ModelProto, rng: np.random.Generator, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    inits = {t.name for t in m.graph.initializer}
    out = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 2) for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype == np.bool_:
            out[vi.name] = np.array(True)
        else:
            out[vi.name] = (rng.standard_normal(shape) * 3).astype(dtype)
    return out


def assert_equivalent(a: onnx.ModelProto, b: onnx.ModelProto, rng: np.random.Generator, rel: float = 1e-5, trials: int = 3) -> None:
    """Outputs agree within `rel` of each output's scale, over several random inputs."""
    sa, sb = session(a), session(b)
    for _ in range(trials):
        feeds = feeds_for(a, rng)
        for ra, rb in zip(sa.run(None, feeds), sb.run(None, feeds)):
            ra64, rb64 = np.asarray(ra, np.float64), np.asarray(rb, np.float64)
            scale = max(float(np.max(np.abs(ra64))), 1e-30)
            err = float(np.max(np.abs(ra64 - rb64))) / scale
            assert err <= rel, f"outputs differ: {err:.3g} of scale > {rel}"


def op_types(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]
