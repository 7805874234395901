"""Model builders, runners and float64 oracles for the ONNX tests (engine, CLI, verification, hostile input).

The one set of test-model builders: every test imports from here (`sample_models/zoo.py` keeps its own,
since benchmarks import it and `sample_models` must not import `tests`). Everything is built at test time
with `onnx.helper`; nothing here imports `bnfold.affine`, so the oracles below are independent of the code
under test.

Runners: onnxruntime with `ORT_DISABLE_ALL` (at its basic level onnxruntime fuses Conv+BN itself, and a
reference run with fusion on would compare the fold with itself), or `onnx.reference.ReferenceEvaluator`
where onnxruntime has no kernel (float64 Conv/ConvTranspose, BatchNormalization opset 1 and 6).
bfloat16 models are compared through an exact float32 copy (`upcast_bf16`): every bfloat16 value is a
float32 value, so the copy computes what the bfloat16 model means without onnxruntime's missing kernels.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

ELEM = {F16: TensorProto.FLOAT16, F32: TensorProto.FLOAT, F64: TensorProto.DOUBLE, BF16: TensorProto.BFLOAT16}

# Relative to the output's scale (max |reference|).
#  float32: a handful of ulps (2^-24 ≈ 6e-8) over sums of ≤ ~150 products: 1e-5 leaves a wide margin but
#           catches any wrong channel, axis or bias (those are O(1) of the scale).
#  float64: the same argument with 2^-53 ≈ 1.1e-16 → 1e-12.
#  float16: the folded weights are rounded to fp16 (2^-11 ≈ 4.9e-4 relative each) and both models round
#           every partial sum to fp16; over ≤ ~150 terms whose |sum| can be a few times the output's
#           scale, the observed error is ~1e-3; 1e-2 is ~20 ulps, still far below any wrong fold (≥ 0.1).
#  bfloat16: weights rounded to bfloat16 (2^-9 ≈ 2e-3 relative each) → 3e-2 by the same argument.
TOL = {F32: 1e-5, F64: 1e-12, F16: 1e-2, BF16: 3e-2}


# ---------------------------------------------------------------------------------------------
# random data
# ---------------------------------------------------------------------------------------------
def bn_stats(c: int, rng: np.random.Generator, dtype=F32) -> dict[str, np.ndarray]:
    """Statistics that hide no bug: negative γ, variances 1e-4..1e2 (log-uniform), non-zero means."""
    gamma = rng.standard_normal(c) * 1.5
    gamma[0] = -abs(gamma[0]) - 0.5
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c) * 2 + 0.5
    var = np.exp(rng.uniform(np.log(1e-4), np.log(1e2), c))
    var[-1] = 1e-4
    return {k: v.astype(dtype) for k, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))}


def rand(shape, rng: np.random.Generator, dtype=F32, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def input_batches(shape, dtype, rng: np.random.Generator) -> list[np.ndarray]:
    """Three distributions: standard normal, uniform[-1, 1], and large magnitude (normal × 100)."""
    big = 100.0 if dtype in (F32, F64, BF16) else 8.0  # fp16: keep the convolution sums finite
    return [
        rng.standard_normal(shape).astype(dtype),
        rng.uniform(-1, 1, shape).astype(dtype),
        (rng.standard_normal(shape) * big).astype(dtype),
    ]


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def bn_node(x: str, y: str, prefix: str = "bn", *, name: str | None = None, opset: int = 17, **attrs) -> onnx.NodeProto:
    """A BatchNormalization in inference mode for the given opset (is_test / consumed_inputs where needed)."""
    if opset < 7:
        attrs.setdefault("is_test", 1)
    if opset < 6:
        attrs.setdefault("consumed_inputs", [0, 0, 0, 1, 1])
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}.scale", f"{prefix}.bias", f"{prefix}.mean", f"{prefix}.var"],
        [y],
        name=name or prefix,
        **attrs,
    )


def bn_inits(
    prefix: str, stats: dict[str, np.ndarray] | int, rng: np.random.Generator | None = None, dtype=F32
) -> list[onnx.TensorProto]:
    """The four statistics as initializers `prefix.scale/bias/mean/var`: the given ones, or, given a channel
    count and a generator, fresh `bn_stats(c, rng, dtype)`."""
    if isinstance(stats, int):
        assert rng is not None, "bn_inits(prefix, channels, rng): random statistics need a generator"
        stats = bn_stats(stats, rng, dtype)
    return [init(f"{prefix}.{k}", v) for k, v in stats.items()]


def make_model(
    nodes,
    inputs: list[tuple[str, list, np.dtype]],
    outputs: list[tuple],  # (name, dtype) or (name, dtype, shape)
    inits,
    *,
    opset: int = 17,
    ir: int | None = None,
    functions=(),
    check: bool = True,
) -> onnx.ModelProto:
    """Outputs get their shapes from onnx's shape inference (strict), so the model is fully typed.

    `check=False` is for graphs the strict checker refuses on purpose (hostile shapes, symbolic dimensions
    some op cannot infer, models that break at run time): outputs left without a shape get what lenient
    shape inference finds, given shapes are kept, and nothing is checked.
    """
    ir = ir if ir is not None else (3 if opset < 7 else 8)
    graph_inputs = [helper.make_tensor_value_info(n, ELEM[np.dtype(d)], s) for n, s, d in inputs]
    if ir < 4:  # before IR 4 every initializer is listed as a graph input
        graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes,
        "g",
        graph_inputs,
        [helper.make_tensor_value_info(o[0], ELEM[np.dtype(o[1])], o[2] if len(o) > 2 else None) for o in outputs],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    m.ir_version = ir
    if not check:
        if any(not o.type.tensor_type.HasField("shape") for o in m.graph.output):
            inferred = onnx.shape_inference.infer_shapes(m)
            known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
            for out in m.graph.output:
                if not out.type.tensor_type.HasField("shape") and out.name in known:
                    out.type.CopyFrom(known[out.name].type)
        return m
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in m.graph.output:
        if out.name in known and known[out.name].type.tensor_type.HasField("shape"):
            out.type.CopyFrom(known[out.name].type)
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_bn_relu(rng: np.random.Generator, c_in: int = 3, c_out: int = 4, hw: int = 6, pads=(1, 1, 1, 1)) -> onnx.ModelProto:
    """input[1, c_in, hw, hw] → Conv(3×3, bias) → BatchNormalization → Relu → output: the CLI tests' model."""
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], name="conv", pads=list(pads)),
        bn_node("c", "y"),
        helper.make_node("Relu", ["y"], ["output"], name="relu"),
    ]
    inits = [
        init("conv.w", rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)),
        init("conv.b", rng.standard_normal(c_out).astype(np.float32)),
        *bn_inits("bn", c_out, rng),
    ]
    return make_model(nodes, [("input", [1, c_in, hw, hw], F32)], [("output", F32)], inits)


def unchecked_model(
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
    """make_model(check=False) with one element type for every input and output, given as (name, shape):
    for graphs the strict checker refuses on purpose (hostile shapes, outputs of unknown shape)."""
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    return make_model(
        nodes,
        [(n, shape, dtype) for n, shape in inputs],
        [(n, dtype, shape) for n, shape in outputs],
        inits,
        opset=opset,
        ir=ir,
        functions=functions,
        check=False,
    )


def conv_bn(
    rng,
    *,
    dims: int = 2,
    c_in: int = 4,
    c_out: int = 6,
    groups: int = 1,
    bias: bool = True,
    k: int = 3,
    spatial: int = 6,
    dtype=F32,
    opset: int | None = None,
    transpose: bool = False,
    **conv_attrs,
) -> onnx.ModelProto:
    """input → Conv/ConvTranspose → BatchNormalization → output (opset 22 for bfloat16: Conv's first with it)."""
    if opset is None:
        opset = 22 if np.dtype(dtype) == BF16 else 17
    op = "ConvTranspose" if transpose else "Conv"
    wshape = (c_in, c_out // groups) if transpose else (c_out, c_in // groups)
    w = rand((*wshape, *([k] * dims)), rng, dtype, 0.5)
    inits = [init("conv.w", w), *bn_inits("bn", bn_stats(c_out, rng, dtype))]
    ins = ["input", "conv.w"]
    if bias:
        inits.append(init("conv.b", rand(c_out, rng, dtype)))
        ins.append("conv.b")
    nodes = [
        helper.make_node(op, ins, ["conv_out"], name="conv", group=groups, **conv_attrs),
        bn_node("conv_out", "output", opset=opset),
    ]
    out_shape = None if opset >= 7 or transpose else _conv_out_shape(c_out, dims, spatial, k, conv_attrs)
    return make_model(
        nodes, [("input", [2, c_in, *([spatial] * dims)], dtype)], [("output", dtype, out_shape)], inits, opset=opset
    )


def _conv_out_shape(c_out, dims, spatial, k, attrs):
    """Old BatchNormalization versions have no shape inference: the output shape given by hand."""
    assert not attrs.get("strides") and not attrs.get("dilations") and "auto_pad" not in attrs
    pads = attrs.get("pads", [0] * 2 * dims)
    return [2, c_out, *(spatial + pads[i] + pads[i + dims] - k + 1 for i in range(dims))]


def gemm_bn(
    rng,
    *,
    m: int = 3,
    k: int = 5,
    n: int = 4,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_a: int = 0,
    trans_b: int = 0,
    c_shape: tuple | None = (4,),
    dtype=F32,
) -> onnx.ModelProto:
    """input → Gemm(α, β, transA, transB, C of the given shape or absent) → BatchNormalization → output."""
    b = rand((n, k) if trans_b else (k, n), rng, dtype, 0.5)
    inits = [init("gemm.B", b), *bn_inits("bn", bn_stats(n, rng, dtype))]
    ins = ["input", "gemm.B"]
    if c_shape is not None:
        inits.append(init("gemm.C", rand(c_shape, rng, dtype)))
        ins.append("gemm.C")
    nodes = [
        helper.make_node("Gemm", ins, ["gemm_out"], name="gemm", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b),
        bn_node("gemm_out", "output"),
    ]
    a_shape = [k, m] if trans_a else [m, k]
    return make_model(nodes, [("input", a_shape, dtype)], [("output", dtype)], inits)


def matmul_bn(rng, *, m: int = 3, k: int = 5, n: int = 4, bias_add: bool = False, dtype=F32, rank: int = 2) -> onnx.ModelProto:
    """input[M, K] (or rank 3) → MatMul(W[K, N]) (→ Add(b[N])) → BatchNormalization → output."""
    inits = [init("mm.W", rand((k, n), rng, dtype, 0.5)), *bn_inits("bn", bn_stats(n if rank == 2 else m, rng, dtype))]
    nodes = [helper.make_node("MatMul", ["input", "mm.W"], ["mm_out"], name="matmul")]
    bn_in = "mm_out"
    if bias_add:
        inits.append(init("mm.b", rand(n, rng, dtype)))
        nodes.append(helper.make_node("Add", ["mm_out", "mm.b"], ["add_out"], name="bias_add"))
        bn_in = "add_out"
    nodes.append(bn_node(bn_in, "output"))
    shape = [m, k] if rank == 2 else [2, m, k]
    return make_model(nodes, [("input", shape, dtype)], [("output", dtype)], inits)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def ort_session(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray], backend: str = "ort") -> list[np.ndarray]:
    if backend == "ort":
        return ort_session(m).run(None, feeds)
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(m).run(None, feeds))


def upcast_bf16(m: onnx.ModelProto) -> onnx.ModelProto:
    """An exact float32 copy of a bfloat16 model (every bfloat16 value is a float32 value)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.BFLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for vi in list(out.graph.input) + list(out.graph.output) + list(out.graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for n in out.graph.node:
        assert n.op_type != "Constant", "upcast_bf16 handles initializers only"
    return out


def input_specs(m: onnx.ModelProto) -> list[tuple[str, list[int], np.dtype]]:
    inits = {t.name for t in m.graph.initializer}
    specs = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        specs.append((vi.name, [d.dim_value for d in tt.shape.dim], np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def feeds_for(m: onnx.ModelProto, rng: np.random.Generator, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """One random feed per graph input (normal × 3; symbolic dimensions from `dims`, else 2; booleans True)."""
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


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    r, g = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert r.shape == g.shape, (r.shape, g.shape)
    assert np.all(np.isfinite(r)) and np.all(np.isfinite(g))
    scale = max(float(np.max(np.abs(r))), 1e-30)
    return float(np.max(np.abs(r - g))) / scale


def assert_equivalent(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    rng: np.random.Generator,
    *,
    backend: str = "ort",
    reference: onnx.ModelProto | None = None,
    rel: float | None = None,
) -> float:
    """Outputs of `folded` agree with `reference` (default: `original`) on three input distributions.

    bfloat16 models run through their exact float32 copies. Returns the worst relative error seen.
    """
    reference = reference or original
    specs = input_specs(original)
    dtype = specs[0][2]
    tol = rel if rel is not None else TOL[dtype]
    is_bf16 = dtype == BF16
    ref_m = upcast_bf16(reference) if is_bf16 else reference
    got_m = upcast_bf16(folded) if is_bf16 else folded
    worst = 0.0
    batches = [input_batches(shape, dt, rng) for _, shape, dt in specs]
    for i in range(3):
        feeds = {name: b[i] for (name, _, _), b in zip(specs, batches)}
        if is_bf16:
            feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
        ref_out = run(ref_m, feeds, backend)
        got_out = run(got_m, feeds, backend)
        assert len(ref_out) == len(got_out)
        for r, g in zip(ref_out, got_out):
            err = rel_err(r, g)
            worst = max(worst, err)
            assert err <= tol, f"folded output differs by {err:.3g} of scale (> {tol:g}) on input batch {i}"
    return worst


def assert_valid(m: onnx.ModelProto) -> None:
    """The full checker and strict shape inference both accept the model."""
    onnx.checker.check_model(m, full_check=True)
    onnx.shape_inference.infer_shapes(m, strict_mode=True, check_type=True)


def op_types(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def initializers(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def inputs_of(m: onnx.ModelProto, op_type: str) -> list[str]:
    return [list(n.input) for n in m.graph.node if n.op_type == op_type][0]


# ---------------------------------------------------------------------------------------------
# float64 oracles (independent of bnfold.affine: loops and Python floats, not the shared vectorised code)
# ---------------------------------------------------------------------------------------------
def oracle_affine(stats: dict[str, np.ndarray], epsilon: float = float(np.float32(1e-5))) -> tuple[list[float], list[float]]:
    """Per channel, with Python floats: s = γ/√(σ²+ε), t = β − s·μ."""
    s, t = [], []
    for g, b, m, v in zip(*(np.asarray(stats[k], np.float64).tolist() for k in ("scale", "bias", "mean", "var"))):
        sc = g / math.sqrt(v + epsilon)
        s.append(sc)
        t.append(b - sc * m)
    return s, t


def oracle_conv(w, b, s, t):
    w = np.asarray(w, np.float64)
    nw = np.empty_like(w)
    nb = np.empty(w.shape[0])
    for o in range(w.shape[0]):
        nw[o] = w[o] * s[o]
        nb[o] = s[o] * (0.0 if b is None else float(b[o])) + t[o]
    return nw, nb


def oracle_conv_transpose(w, b, s, t, groups: int):
    """Weight [C_in, C_out/g, k…]: input channel i belongs to group i // (C_in/g); column k of it is output
    channel group·(C_out/g) + k."""
    w = np.asarray(w, np.float64)
    c_in, c_out_g = w.shape[0], w.shape[1]
    nw = np.empty_like(w)
    for i in range(c_in):
        group = i // (c_in // groups)
        for k in range(c_out_g):
            nw[i, k] = w[i, k] * s[group * c_out_g + k]
    c_out = groups * c_out_g
    nb = np.array([s[o] * (0.0 if b is None else float(b[o])) + t[o] for o in range(c_out)])
    return nw, nb


def oracle_gemm(bm, c, s, t, *, trans_b: int, beta: float):
    """Returns (B', C', β'): column n of B' (row n if transB) times s[n]; C' = s·C + t/β (or t, β' = 1)."""
    bm = np.asarray(bm, np.float64)
    nb = bm.copy()
    n_cols = bm.shape[0] if trans_b else bm.shape[1]
    for n in range(n_cols):
        if trans_b:
            nb[n, :] = bm[n, :] * s[n]
        else:
            nb[:, n] = bm[:, n] * s[n]
    if c is None or beta == 0.0:
        return nb, np.array(t), 1.0
    c = np.asarray(c, np.float64)
    full = np.broadcast_to(c, np.broadcast_shapes(c.shape, (n_cols,))).copy()
    for n in range(n_cols):
        full[..., n] = full[..., n] * s[n] + t[n] / beta
    return nb, full, beta


def round_bf16_oracle(x: float) -> float:
    """The bfloat16 nearest to the float64 `x`, ties to even, by exact integer rounding of the significand."""
    if x == 0 or not math.isfinite(x):
        return x
    f, e = math.frexp(x)  # x = f·2^e, 0.5 ≤ |f| < 1: 8 significant bits are f·2^8 ∈ [128, 256)
    if e - 1 < -126:  # subnormal in bfloat16: the grid is 2^-133
        return float(round(x * 2.0**133)) * 2.0**-133
    q = round(f * 256.0)  # exact: f·256 is a float64; Python's round is half-to-even on the exact value
    return math.ldexp(q, e - 8)


def round_once(values: np.ndarray, dtype) -> np.ndarray:
    """float64 → dtype, rounded once to nearest-even (numpy converts float64 → float32/float16 directly)."""
    dtype = np.dtype(dtype)
    values = np.asarray(values, np.float64)
    if dtype == BF16:
        return np.array([round_bf16_oracle(float(v)) for v in values.reshape(-1)]).reshape(values.shape).astype(BF16)
    return values.astype(dtype)


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


# ---------------------------------------------------------------------------------------------
# the common check
# ---------------------------------------------------------------------------------------------
def fold_and_verify(
    m: onnx.ModelProto,
    rng: np.random.Generator,
    *,
    folds: int = 1,
    backend: str = "ort",
    reference: onnx.ModelProto | None = None,
    rel: float | None = None,
    compare: bool = True,
):
    """Fold, then: the report counts, no BatchNorm left, full checker + strict shape inference, the graph
    outputs keep their names, and the outputs match the original's on three input distributions."""
    from bnfold import fold_onnx

    out, report = fold_onnx(m)
    assert report.folded == folds, str(report)
    assert report.left == 0, str(report)
    assert op_types(out).count("BatchNormalization") == op_types(m).count("BatchNormalization") - folds
    assert_valid(out)
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    if compare:
        assert_equivalent(m, out, rng, backend=backend, reference=reference, rel=rel)
    return out, report


# ---------------------------------------------------------------------------------------------
# torch-built blocks (torch imported by the caller's test, which skips without it)
# ---------------------------------------------------------------------------------------------
def folds_from_every_exporter(net, x, tmp_path, *, gone: tuple[str, ...] = ("BatchNormalization",)) -> None:
    """Give `net`'s BatchNorms trained-like statistics, export it with TorchScript, dynamo and dynamo
    `optimize=False` (where onnxscript is there), and assert each export folds completely: no BatchNorm
    left, none of the `gone` ops, a valid model, and torch's own outputs within 1e-5 of scale."""
    import warnings

    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) + 0.3)
                mod.running_var.copy_(torch.exp(torch.empty(c).uniform_(np.log(1e-4), np.log(10.0), generator=g)))
                mod.weight.copy_(torch.randn(c, generator=g) * 0.8)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.5)
    net.eval()
    x = x if x is not None else torch.randn(2, 3, 9, 9, generator=g)
    exports = [dict(dynamo=False, do_constant_folding=False, opset_version=17)]
    try:
        import onnxscript  # noqa: F401

        exports += [dict(dynamo=True), dict(dynamo=True, optimize=False)]
    except ImportError:
        pass
    from bnfold import fold_onnx

    for i, kw in enumerate(exports):
        path = tmp_path / f"m{i}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), str(path), input_names=["input"], **kw)
        out, report = fold_onnx(onnx.load(str(path)))
        assert report.left == 0, (kw, str(report))
        assert not set(gone) & set(op_types(out)), kw
        assert_valid(out)
        with torch.no_grad():
            ref = net(x).numpy()
        assert rel_err(ref, run(out, {out.graph.input[0].name: x.numpy()})[0]) < 1e-5, kw
