"""Small ONNX models for bnfold's tests, examples and benchmark, built from a seed (no downloads).

Every builder returns an `onnx.ModelProto` that passes `onnx.checker.check_model(m, full_check=True)`
and loads in onnxruntime (CPU). Models are deterministic: the same arguments give the same bytes.
Every BatchNormalization gets random statistics from `random_bn_stats` — negative γ, variances from
1e-4 to 1e2, non-zero means, random β — because default statistics (γ=1, β=0, μ=0, σ²=1) hide bugs.

Conventions: graph input ``input``, graph output ``output`` (where there is one main output); every
node named (``conv1``, ``bn1``, …); opset 17 unless the builder is about another opset; IR version 8
(the lowest that opset 17 allows, well within what onnxruntime 1.17+ loads).

Builders that *can* be folded:
    conv_bn, depthwise_conv_bn, conv_transpose_bn, gemm_bn, matmul_bn, bn_opset,
    shared_weight_conv_bn, identity_params, constant_node_params, constant_of_shape_weight,
    expand_castlike_bias, resnet_tiny, resnet50_size
Builders with BatchNorms that must NOT be folded (or not all of them):
    conv_bn_two_consumers, bn_params_as_inputs, bn_training_mode, matmul_rank3_bn, bn_spatial0,
    conv_bn_fp16_overflow, unfoldable
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "DEFAULT_OPSET",
    "IR_VERSION",
    "random_bn_stats",
    "conv_bn",
    "depthwise_conv_bn",
    "conv_transpose_bn",
    "gemm_bn",
    "matmul_bn",
    "bn_opset",
    "shared_weight_conv_bn",
    "identity_params",
    "constant_node_params",
    "constant_of_shape_weight",
    "expand_castlike_bias",
    "resnet_tiny",
    "resnet50_size",
    "conv_bn_two_consumers",
    "bn_params_as_inputs",
    "bn_training_mode",
    "matmul_rank3_bn",
    "bn_spatial0",
    "conv_bn_fp16_overflow",
    "unfoldable",
    "BUILDERS",
    "TRAINING_MODE_BUILDERS",
]

DEFAULT_OPSET = 17
IR_VERSION = 8
PRODUCER_NAME = "bnfold.sample_models"

BN_OPSETS = (7, 9, 14, 15)
CShape = Literal["N", "1N", "MN", "scalar"] | None

_SPATIAL = {1: (16,), 2: (8, 8), 3: (5, 5, 5)}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def random_bn_stats(
    c: int,
    rng: np.random.Generator,
    dtype: type | np.dtype = np.float32,
    var_range: tuple[float, float] = (1e-4, 1e2),
) -> dict[str, np.ndarray]:
    """Random BN statistics for ``c`` channels: keys ``scale`` (γ), ``bias`` (β), ``mean``, ``var``.

    γ has magnitude 0.5..1.5 with random signs, channel 0 always negative; variances are log-uniform
    over ``var_range`` with the two extremes always present (c ≥ 2); means are non-zero
    (|μ| ≥ 0.1); β is normal. With the default range the folded scale is at most ~150, so fp16
    weights stay far from overflow.
    """
    lo, hi = var_range
    sign = rng.choice(np.array([-1.0, 1.0]), size=c)
    sign[0] = -1.0
    gamma = sign * rng.uniform(0.5, 1.5, size=c)
    var = 10.0 ** rng.uniform(np.log10(lo), np.log10(hi), size=c)
    if c >= 2:
        var[0], var[-1] = lo, hi
    mean = rng.choice(np.array([-1.0, 1.0]), size=c) * rng.uniform(0.1, 2.0, size=c)
    beta = rng.normal(0.0, 1.0, size=c)
    dt = np.dtype(dtype)
    return {"scale": gamma.astype(dt), "bias": beta.astype(dt), "mean": mean.astype(dt), "var": var.astype(dt)}


def _elem(dtype: type | np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _weight(rng: np.random.Generator, shape: Sequence[int], fan_in: int, dtype: type | np.dtype) -> np.ndarray:
    """He-normal weights (float64 draw, cast once)."""
    return (rng.standard_normal(tuple(shape)) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.dtype(dtype))


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _bn_inits(prefix: str, stats: dict[str, np.ndarray]) -> tuple[list[str], list[TensorProto]]:
    names = [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return names, [_init(n, stats[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))]


def _bn(name: str, x: str, y: str, params: list[str], **attrs: object) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *params], [y], name=name, **attrs)


def _opset_ir(opset: int) -> int:
    need = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return max(IR_VERSION, need)


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, Sequence[int | str]]],
    outputs: list[str],
    initializers: list[TensorProto],
    *,
    opset: int = DEFAULT_OPSET,
    doc: str = "",
    ir_version: int | None = None,
) -> onnx.ModelProto:
    """Assemble, fill graph-output types by strict shape inference, and check (full)."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, t, list(s)) for n, t, s in inputs],
        [],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=PRODUCER_NAME,
        doc_string=doc,
    )
    model.ir_version = ir_version if ir_version is not None else _opset_ir(opset)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {v.name: v for v in inferred.graph.value_info}
    for out in outputs:
        if out not in known:
            raise RuntimeError(f"{name}: shape inference gave no type for output {out!r}")
        model.graph.output.append(known[out])
    onnx.checker.check_model(model, full_check=True)
    return model


def _doc(fn_doc: str | None) -> str:
    return (fn_doc or "").strip().split("\n\n")[0].replace("\n", " ").replace("    ", " ")


# ----------------------------------------------------------------------------------------------
# foldable patterns
# ----------------------------------------------------------------------------------------------
def conv_bn(
    dims: int = 2,
    groups: int = 1,
    bias: bool = True,
    dtype: type | np.dtype = np.float32,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    *,
    depthwise: bool = False,
) -> onnx.ModelProto:
    """Conv (1-D/2-D/3-D, grouped or depthwise, with or without bias) → BatchNormalization.

    Channels: groups=1 → 3 in, 8 out; groups=g>1 → 2g in, 3g out; depthwise → 6 in = 6 out = groups.
    Kernel 3, pads 1, batch 2. BN epsilon left at its default (attribute absent).
    """
    if dims not in _SPATIAL:
        raise ValueError("dims must be 1, 2 or 3")
    rng = np.random.default_rng(seed)
    if depthwise:
        groups = c_in = c_out = 6
    elif groups == 1:
        c_in, c_out = 3, 8
    else:
        c_in, c_out = 2 * groups, 3 * groups
    spatial = _SPATIAL[dims]
    k = (3,) * dims
    w = _weight(rng, (c_out, c_in // groups, *k), (c_in // groups) * 3**dims, dtype)
    inits = [_init("conv1.weight", w)]
    conv_inputs = ["input", "conv1.weight"]
    if bias:
        inits.append(_init("conv1.bias", rng.normal(0, 0.5, c_out).astype(dtype)))
        conv_inputs.append("conv1.bias")
    bn_names, bn_inits = _bn_inits("bn1", random_bn_stats(c_out, rng, dtype))
    attrs: dict[str, object] = {"kernel_shape": list(k), "pads": [1] * (2 * dims)}
    if groups != 1:
        attrs["group"] = groups
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv1_out"], name="conv1", **attrs),
        _bn("bn1", "conv1_out", "output", bn_names),
    ]
    tag = "depthwise" if depthwise else f"groups={groups}"
    return _model(
        f"conv{dims}d_bn",
        nodes,
        [("input", _elem(dtype), (2, c_in, *spatial))],
        ["output"],
        inits + bn_inits,
        opset=opset,
        doc=f"Conv {dims}-D {tag} bias={bias} {np.dtype(dtype).name} -> BatchNormalization",
    )


def depthwise_conv_bn(
    dims: int = 2, bias: bool = True, dtype: type | np.dtype = np.float32, opset: int = DEFAULT_OPSET, seed: int = 0
) -> onnx.ModelProto:
    """Depthwise Conv (group = C_in = C_out = 6) → BatchNormalization."""
    return conv_bn(dims, 1, bias, dtype, opset, seed, depthwise=True)


def conv_transpose_bn(
    dims: int = 2,
    groups: int = 1,
    bias: bool = True,
    dtype: type | np.dtype = np.float32,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> onnx.ModelProto:
    """ConvTranspose (1-D/2-D/3-D, groups ≥ 1, with or without bias) → BatchNormalization.

    W is ``[C_in, C_out/g, k…]``: groups=1 → 3 in, 5 out; g>1 → 2g in, 3g out. Stride 2, kernel 3,
    pads 1, output_padding 1 (output = 2 × input). The grouped case is the one several tools got wrong.
    """
    if dims not in _SPATIAL:
        raise ValueError("dims must be 1, 2 or 3")
    rng = np.random.default_rng(seed)
    c_in, c_out = (3, 5) if groups == 1 else (2 * groups, 3 * groups)
    spatial = {1: (8,), 2: (5, 5), 3: (3, 3, 3)}[dims]
    k = (3,) * dims
    w = _weight(rng, (c_in, c_out // groups, *k), (c_in // groups) * 3**dims, dtype)
    inits = [_init("deconv1.weight", w)]
    ins = ["input", "deconv1.weight"]
    if bias:
        inits.append(_init("deconv1.bias", rng.normal(0, 0.5, c_out).astype(dtype)))
        ins.append("deconv1.bias")
    bn_names, bn_inits = _bn_inits("bn1", random_bn_stats(c_out, rng, dtype))
    attrs: dict[str, object] = {
        "kernel_shape": list(k),
        "strides": [2] * dims,
        "pads": [1] * (2 * dims),
        "output_padding": [1] * dims,
    }
    if groups != 1:
        attrs["group"] = groups
    nodes = [
        helper.make_node("ConvTranspose", ins, ["deconv1_out"], name="deconv1", **attrs),
        _bn("bn1", "deconv1_out", "output", bn_names),
    ]
    return _model(
        f"conv_transpose{dims}d_bn",
        nodes,
        [("input", _elem(dtype), (2, c_in, *spatial))],
        ["output"],
        inits + bn_inits,
        opset=opset,
        doc=f"ConvTranspose {dims}-D groups={groups} bias={bias} {np.dtype(dtype).name} -> BatchNormalization",
    )


def gemm_bn(
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_a: int = 0,
    trans_b: int = 0,
    c_shape: CShape = "N",
    dtype: type | np.dtype = np.float32,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> onnx.ModelProto:
    """Gemm ``Y = α·A'·B' + β·C`` (any α, β, transA, transB; C absent, [N], [1,N], [M,N] or scalar) → BN.

    M=4, K=6, N=5; A is the graph input (``[K, M]`` when transA), B and C are initializers. Attributes
    equal to their defaults are left out. BN's channel axis 1 is Gemm's N.
    """
    rng = np.random.default_rng(seed)
    m, k, n = 4, 6, 5
    b = _weight(rng, (n, k) if trans_b else (k, n), k, dtype)
    inits = [_init("fc1.weight", b)]
    ins = ["input", "fc1.weight"]
    if c_shape is not None:
        shape = {"N": (n,), "1N": (1, n), "MN": (m, n), "scalar": ()}[c_shape]
        inits.append(_init("fc1.bias", np.asarray(rng.normal(0, 0.5, shape)).astype(dtype)))
        ins.append("fc1.bias")
    attrs: dict[str, object] = {}
    if alpha != 1.0:
        attrs["alpha"] = float(alpha)
    if beta != 1.0:
        attrs["beta"] = float(beta)
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    bn_names, bn_inits = _bn_inits("bn1", random_bn_stats(n, rng, dtype))
    nodes = [
        helper.make_node("Gemm", ins, ["fc1_out"], name="fc1", **attrs),
        _bn("bn1", "fc1_out", "output", bn_names),
    ]
    return _model(
        "gemm_bn",
        nodes,
        [("input", _elem(dtype), (k, m) if trans_a else (m, k))],
        ["output"],
        inits + bn_inits,
        opset=opset,
        doc=f"Gemm alpha={alpha} beta={beta} transA={trans_a} transB={trans_b} C={c_shape} -> BatchNormalization",
    )


def matmul_bn(
    with_add_bias: bool = False,
    dtype: type | np.dtype = np.float32,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> onnx.ModelProto:
    """MatMul of a rank-2 input by a constant rank-2 weight ``[K, N]`` (→ Add of a constant ``[N]`` bias) → BN.

    Input ``[4, 6]``, N = 5: BN's channel axis 1 is the MatMul's last axis, so the fold is exact.
    """
    rng = np.random.default_rng(seed)
    m, k, n = 4, 6, 5
    inits = [_init("fc1.weight", _weight(rng, (k, n), k, dtype))]
    nodes = [helper.make_node("MatMul", ["input", "fc1.weight"], ["fc1_mm"], name="fc1_matmul")]
    last = "fc1_mm"
    if with_add_bias:
        inits.append(_init("fc1.bias", rng.normal(0, 0.5, n).astype(dtype)))
        nodes.append(helper.make_node("Add", ["fc1_mm", "fc1.bias"], ["fc1_out"], name="fc1_add"))
        last = "fc1_out"
    bn_names, bn_inits = _bn_inits("bn1", random_bn_stats(n, rng, dtype))
    nodes.append(_bn("bn1", last, "output", bn_names))
    return _model(
        "matmul_add_bn" if with_add_bias else "matmul_bn",
        nodes,
        [("input", _elem(dtype), (m, k))],
        ["output"],
        inits + bn_inits,
        opset=opset,
        doc=f"MatMul [M,K]x[K,N]{' -> Add bias' if with_add_bias else ''} -> BatchNormalization",
    )


def bn_opset(
    opset: int = 15,
    dtype: type | np.dtype = np.float32,
    seed: int = 0,
    *,
    stats_dtype: type | np.dtype | None = None,
    epsilon: float | None = 1e-3,
) -> onnx.ModelProto:
    """BatchNormalization of opset version 7, 9, 14 or 15 in float32, float16 or float64, after a layer.

    The model's opset is ``opset``. Producer: a 2-D Conv for float32/float16; a Gemm for float64
    (onnxruntime's CPU Conv has no double kernel). Opset 7 sets ``spatial=1`` explicitly. With opset 15,
    ``stats_dtype`` gives mean/var another type than X (T2 ≠ T, e.g. fp16 X with float32 statistics).
    ``epsilon`` None leaves the attribute out (default 1e-5).
    """
    if opset not in BN_OPSETS:
        raise ValueError(f"opset must be one of {BN_OPSETS}")
    if stats_dtype is not None and opset < 15:
        raise ValueError("mean/var of another type than X needs opset 15")
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    sdt = np.dtype(stats_dtype) if stats_dtype is not None else dt
    if dt == np.float64:
        m, k, c = 4, 6, 5
        layer = helper.make_node("Gemm", ["input", "layer1.weight", "layer1.bias"], ["layer1_out"], name="fc1")
        inits = [_init("layer1.weight", _weight(rng, (k, c), k, dt)), _init("layer1.bias", rng.normal(0, 0.5, c).astype(dt))]
        in_shape: tuple[int, ...] = (m, k)
    else:
        c_in, c = 3, 6
        layer = helper.make_node(
            "Conv", ["input", "layer1.weight", "layer1.bias"], ["layer1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        )
        inits = [_init("layer1.weight", _weight(rng, (c, c_in, 3, 3), c_in * 9, dt)), _init("layer1.bias", rng.normal(0, 0.5, c).astype(dt))]
        in_shape = (2, c_in, 6, 6)
    stats = random_bn_stats(c, rng, np.float64)
    stats = {k_: v.astype(dt if k_ in ("scale", "bias") else sdt) for k_, v in stats.items()}
    bn_names, bn_inits = _bn_inits("bn1", stats)
    attrs: dict[str, object] = {}
    if epsilon is not None:
        attrs["epsilon"] = float(epsilon)
    if opset == 7:
        attrs["spatial"] = 1
    nodes = [layer, _bn("bn1", "layer1_out", "output", bn_names, **attrs)]
    return _model(
        f"bn_opset{opset}",
        nodes,
        [("input", _elem(dt), in_shape)],
        ["output"],
        inits + bn_inits,
        opset=opset,
        doc=f"{layer.op_type} -> BatchNormalization-{opset} X {dt.name}, mean/var {sdt.name}",
    )


def shared_weight_conv_bn(seed: int = 0) -> onnx.ModelProto:
    """One weight (and bias) initializer shared by three Convs; two are followed by different BNs.

    ``conv_a`` → ``bn_a``, ``conv_b`` → ``bn_b`` (other statistics), ``conv_c`` has no BN; the three are
    summed. Folding must give each folded Conv a private copy and leave ``conv_c`` on the original.
    """
    rng = np.random.default_rng(seed)
    c_in, c_out = 4, 6
    inits = [
        _init("shared.weight", _weight(rng, (c_out, c_in, 3, 3), c_in * 9, np.float32)),
        _init("shared.bias", rng.normal(0, 0.5, c_out).astype(np.float32)),
    ]
    nodes = []
    for tag in ("a", "b", "c"):
        nodes.append(
            helper.make_node(
                "Conv", ["input", "shared.weight", "shared.bias"], [f"conv_{tag}_out"], name=f"conv_{tag}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            )
        )
    for tag in ("a", "b"):
        names, bi = _bn_inits(f"bn_{tag}", random_bn_stats(c_out, rng))
        inits += bi
        nodes.append(_bn(f"bn_{tag}", f"conv_{tag}_out", f"bn_{tag}_out", names))
    nodes.append(helper.make_node("Add", ["bn_a_out", "bn_b_out"], ["sum_ab"], name="add_ab"))
    nodes.append(helper.make_node("Add", ["sum_ab", "conv_c_out"], ["output"], name="add_c"))
    return _model(
        "shared_weight_conv_bn", nodes, [("input", TensorProto.FLOAT, (1, c_in, 8, 8))], ["output"], inits,
        doc=_doc(shared_weight_conv_bn.__doc__),
    )


def identity_params(seed: int = 0) -> onnx.ModelProto:
    """Parameters reaching the Conv and the BN through Identity nodes (exporter de-duplication).

    The conv weight is ``Identity(w)``; the conv bias is an ``Identity`` of another initializer that
    also serves elsewhere (here: it is also added to the output); BN's scale goes through one Identity
    and its mean through a chain of two.
    """
    rng = np.random.default_rng(seed)
    c_in, c = 3, 6
    stats = random_bn_stats(c, rng)
    inits = [
        _init("conv1.weight.orig", _weight(rng, (c, c_in, 3, 3), c_in * 9, np.float32)),
        _init("dedup.bias", rng.normal(0, 0.5, (c,)).astype(np.float32)),
        _init("bn1.scale.orig", stats["scale"]),
        _init("bn1.bias", stats["bias"]),
        _init("bn1.mean.orig", stats["mean"]),
        _init("bn1.var", stats["var"]),
    ]
    nodes = [
        helper.make_node("Identity", ["conv1.weight.orig"], ["conv1.weight"], name="conv1_weight_identity"),
        helper.make_node("Identity", ["dedup.bias"], ["conv1.bias"], name="conv1_bias_identity"),
        helper.make_node("Identity", ["bn1.scale.orig"], ["bn1.scale"], name="bn1_scale_identity"),
        helper.make_node("Identity", ["bn1.mean.orig"], ["bn1.mean.mid"], name="bn1_mean_identity1"),
        helper.make_node("Identity", ["bn1.mean.mid"], ["bn1.mean"], name="bn1_mean_identity2"),
        helper.make_node(
            "Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        _bn("bn1", "conv1_out", "bn1_out", ["bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"]),
        helper.make_node("Unsqueeze", ["dedup.bias", "unsq_axes"], ["dedup.bias4d"], name="bias_unsqueeze"),
        helper.make_node("Add", ["bn1_out", "dedup.bias4d"], ["output"], name="add_bias"),
    ]
    inits.append(_init("unsq_axes", np.array([1, 2], np.int64)))
    return _model(
        "identity_params", nodes, [("input", TensorProto.FLOAT, (1, c_in, 8, 8))], ["output"], inits,
        doc=_doc(identity_params.__doc__),
    )


def constant_node_params(seed: int = 0) -> onnx.ModelProto:
    """Conv weight and bias and all four BN parameters given by ``Constant`` nodes, not initializers.

    The weight uses ``value`` (a tensor), the BN mean ``value_floats``; the rest ``value`` tensors.
    """
    rng = np.random.default_rng(seed)
    c_in, c = 3, 6
    stats = random_bn_stats(c, rng)
    w = _weight(rng, (c, c_in, 3, 3), c_in * 9, np.float32)
    b = rng.normal(0, 0.5, c).astype(np.float32)

    def const(name: str, arr: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"{name}_const", value=_init(name, arr))

    nodes = [
        const("conv1.weight", w),
        const("conv1.bias", b),
        const("bn1.scale", stats["scale"]),
        const("bn1.bias", stats["bias"]),
        helper.make_node("Constant", [], ["bn1.mean"], name="bn1.mean_const", value_floats=[float(v) for v in stats["mean"]]),
        const("bn1.var", stats["var"]),
        helper.make_node(
            "Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        _bn("bn1", "conv1_out", "output", ["bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"]),
    ]
    return _model(
        "constant_node_params", nodes, [("input", TensorProto.FLOAT, (1, c_in, 8, 8))], ["output"], [],
        doc=_doc(constant_node_params.__doc__),
    )


def constant_of_shape_weight(seed: int = 0) -> onnx.ModelProto:
    """Conv weight built by ``ConstantOfShape`` (shape from a ``Constant`` node), bias and BN mean too.

    Weight: ConstantOfShape([6,3,3,3], 0.05) + a random initializer (so channels differ); bias:
    ConstantOfShape of an int64 initializer shape [6], value 0.25; BN mean: ConstantOfShape([6], -0.5).
    """
    rng = np.random.default_rng(seed)
    c_in, c = 3, 6
    stats = random_bn_stats(c, rng)
    inits = [
        _init("conv1.weight.delta", _weight(rng, (c, c_in, 3, 3), c_in * 9, np.float32)),
        _init("conv1.bias.shape", np.array([c], np.int64)),
        _init("bn1.scale", stats["scale"]),
        _init("bn1.bias", stats["bias"]),
        _init("bn1.var", stats["var"]),
    ]
    f32 = lambda v: numpy_helper.from_array(np.array([v], np.float32), "value")  # noqa: E731
    nodes = [
        helper.make_node("Constant", [], ["conv1.weight.shape"], name="weight_shape_const", value=_init("s", np.array([c, c_in, 3, 3], np.int64))),
        helper.make_node("ConstantOfShape", ["conv1.weight.shape"], ["conv1.weight.base"], name="weight_fill", value=f32(0.05)),
        helper.make_node("Add", ["conv1.weight.base", "conv1.weight.delta"], ["conv1.weight"], name="weight_add"),
        helper.make_node("ConstantOfShape", ["conv1.bias.shape"], ["conv1.bias"], name="bias_fill", value=f32(0.25)),
        helper.make_node("ConstantOfShape", ["conv1.bias.shape"], ["bn1.mean"], name="mean_fill", value=f32(-0.5)),
        helper.make_node(
            "Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        _bn("bn1", "conv1_out", "output", ["bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"]),
    ]
    return _model(
        "constant_of_shape_weight", nodes, [("input", TensorProto.FLOAT, (1, c_in, 8, 8))], ["output"], inits,
        doc=_doc(constant_of_shape_weight.__doc__),
    )


def expand_castlike_bias(seed: int = 0) -> onnx.ModelProto:
    """The dynamo exporter's bias: ``Expand(CastLike(0, input), Shape(weight)[0:1])`` → Conv → BN.

    ``torch.onnx.export(dynamo=True, optimize=False)`` writes every absent conv bias this way; it is a
    constant (zeros of the weight's C_out) though it mentions the graph input.
    """
    rng = np.random.default_rng(seed)
    c_in, c = 3, 6
    names, bn_inits = _bn_inits("bn1", random_bn_stats(c, rng))
    inits = [
        _init("conv1.weight", _weight(rng, (c, c_in, 3, 3), c_in * 9, np.float32)),
        _init("zero", np.array(0.0, np.float32)),
        _init("slice_start", np.array([0], np.int64)),
        _init("slice_end", np.array([1], np.int64)),
    ]
    nodes = [
        helper.make_node("CastLike", ["zero", "input"], ["zero_like"], name="bias_castlike"),
        helper.make_node("Shape", ["conv1.weight"], ["w_shape"], name="weight_shape"),
        helper.make_node("Slice", ["w_shape", "slice_start", "slice_end"], ["c_out"], name="weight_shape_slice"),
        helper.make_node("Expand", ["zero_like", "c_out"], ["conv1.bias"], name="bias_expand"),
        helper.make_node(
            "Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        _bn("bn1", "conv1_out", "output", names),
    ]
    return _model(
        "expand_castlike_bias", nodes, [("input", TensorProto.FLOAT, (1, c_in, 8, 8))], ["output"], inits + bn_inits,
        doc=_doc(expand_castlike_bias.__doc__),
    )


# ----------------------------------------------------------------------------------------------
# ResNets
# ----------------------------------------------------------------------------------------------
class _Net:
    """Accumulates nodes and initializers for the ResNet builders."""

    def __init__(
        self, rng: np.random.Generator, dtype: type | np.dtype = np.float32, var_range: tuple[float, float] = (1e-4, 1e2)
    ) -> None:
        self.rng = rng
        self.dtype = np.dtype(dtype)
        self.var_range = var_range
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def conv_bn(
        self, name: str, x: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True, epsilon: float | None = None
    ) -> str:
        w = _weight(self.rng, (c_out, c_in, k, k), c_in * k * k, self.dtype)
        self.inits.append(_init(f"{name}.weight", w))
        p = k // 2
        attrs: dict[str, object] = {"kernel_shape": [k, k], "pads": [p] * 4}
        if stride != 1:
            attrs["strides"] = [stride, stride]
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.weight"], [f"{name}_out"], name=name, **attrs))
        bn = name.replace("conv", "bn") if "conv" in name else f"{name}_bn"
        names, bi = _bn_inits(bn, random_bn_stats(c_out, self.rng, self.dtype, self.var_range))
        self.inits += bi
        bn_attrs = {} if epsilon is None else {"epsilon": float(epsilon)}
        self.nodes.append(_bn(bn, f"{name}_out", f"{bn}_out", names, **bn_attrs))
        out = f"{bn}_out"
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            out = f"{name}_relu"
        return out

    def add_relu(self, name: str, a: str, b: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [f"{name}_add"], name=f"{name}_add"))
        self.nodes.append(helper.make_node("Relu", [f"{name}_add"], [f"{name}_out"], name=f"{name}_relu"))
        return f"{name}_out"

    def head(self, x: str, c: int, classes: int) -> None:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="avgpool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
        self.inits.append(_init("fc.weight", _weight(self.rng, (classes, c), c, self.dtype)))
        self.inits.append(_init("fc.bias", self.rng.normal(0, 0.01, classes).astype(self.dtype)))
        self.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["output"], name="fc", transB=1))


def resnet_tiny(seed: int = 0) -> onnx.ModelProto:
    """A small ResNet: conv-bn-relu stem, a basic residual block, a strided block with a 1x1 conv-bn shortcut.

    Input ``input`` [1,3,32,32] float32 → stem (3→16) → block1 (16→16, identity shortcut, Add) →
    block2 (16→32, stride 2, 1x1 conv-bn downsample, Add) → GlobalAveragePool → Flatten → Gemm (10).
    Six BNs, all foldable; two with epsilon 1e-3, the rest at the default.
    """
    net = _Net(np.random.default_rng(seed))
    x = net.conv_bn("stem_conv", "input", 3, 16, 3)
    y = net.conv_bn("block1_conv1", x, 16, 16, 3, epsilon=1e-3)
    y = net.conv_bn("block1_conv2", y, 16, 16, 3, relu=False, epsilon=1e-3)
    x = net.add_relu("block1", y, x)
    y = net.conv_bn("block2_conv1", x, 16, 32, 3, stride=2)
    y = net.conv_bn("block2_conv2", y, 32, 32, 3, relu=False)
    sc = net.conv_bn("block2_downsample_conv", x, 16, 32, 1, stride=2, relu=False)
    x = net.add_relu("block2", y, sc)
    net.head(x, 32, 10)
    return _model(
        "resnet_tiny", net.nodes, [("input", TensorProto.FLOAT, (1, 3, 32, 32))], ["output"], net.inits,
        doc=_doc(resnet_tiny.__doc__),
    )


def resnet50_size(seed: int = 0, input_size: int = 224) -> onnx.ModelProto:
    """The ResNet-50 topology (~25.6 M parameters, 53 BNs) with random weights, for the benchmark.

    Stem 7x7/2 conv-bn-relu (64) + 3x3/2 MaxPool; bottleneck blocks [3, 4, 6, 3] with widths
    64/128/256/512 and expansion 4 (outputs 256..2048), stride on the 3x3 conv (v1.5), 1x1 conv-bn
    downsample on each stage's first block; residual Add + Relu; GlobalAveragePool, Flatten, Gemm 1000.
    About 100 MB: build it in memory, do not commit it. Variances stay within [0.5, 2]: with the wide
    default range the per-layer gains compound over 53 BatchNorms and every output overflows to inf,
    which would leave nothing for a verification to compare.
    """
    net = _Net(np.random.default_rng(seed), var_range=(0.5, 2.0))
    x = net.conv_bn("conv1", "input", 3, 64, 7, stride=2)
    net.nodes.append(
        helper.make_node("MaxPool", [x], ["maxpool_out"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    )
    x = "maxpool_out"
    c_in = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        c_out = width * 4
        for i in range(blocks):
            stride = 2 if (i == 0 and stage > 1) else 1
            p = f"layer{stage}.{i}"
            y = net.conv_bn(f"{p}.conv1", x, c_in, width, 1)
            y = net.conv_bn(f"{p}.conv2", y, width, width, 3, stride=stride)
            y = net.conv_bn(f"{p}.conv3", y, width, c_out, 1, relu=False)
            sc = x
            if i == 0:
                sc = net.conv_bn(f"{p}.downsample", x, c_in, c_out, 1, stride=stride, relu=False)
            x = net.add_relu(p, y, sc)
            c_in = c_out
    net.head(x, 2048, 1000)
    return _model(
        "resnet50_size", net.nodes, [("input", TensorProto.FLOAT, (1, 3, input_size, input_size))], ["output"], net.inits,
        doc=_doc(resnet50_size.__doc__),
    )


# ----------------------------------------------------------------------------------------------
# must NOT be folded
# ----------------------------------------------------------------------------------------------
def conv_bn_two_consumers(seed: int = 0) -> onnx.ModelProto:
    """REFUSE: the Conv's output has a second consumer (``conv1`` also feeds ``add1``), so bn1 stays.

    input → conv1 → bn1 → relu1; add1(relu1, conv1_out) → output.
    """
    rng = np.random.default_rng(seed)
    c = 4
    names, bn_inits = _bn_inits("bn1", random_bn_stats(c, rng))
    inits = [_init("conv1.weight", _weight(rng, (c, c, 3, 3), c * 9, np.float32)), _init("conv1.bias", rng.normal(0, 0.5, c).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _bn("bn1", "conv1_out", "bn1_out", names),
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Add", ["relu1_out", "conv1_out"], ["output"], name="add1"),
    ]
    return _model(
        "conv_bn_two_consumers", nodes, [("input", TensorProto.FLOAT, (1, c, 8, 8))], ["output"], inits + bn_inits,
        doc=_doc(conv_bn_two_consumers.__doc__),
    )


def bn_params_as_inputs(seed: int = 0, *, overridable_initializers: bool = False) -> onnx.ModelProto:
    """REFUSE: BN's scale, bias, mean and var are graph inputs (``bn1.scale`` …), not constants. IR 8.

    With ``overridable_initializers=True`` they are initializers that are *also* listed as graph inputs
    (IR ≥ 4: an overridable default) — folded only when the caller says to assume them constant.
    """
    rng = np.random.default_rng(seed)
    c_in, c = 3, 6
    stats = random_bn_stats(c, rng)
    names, bn_inits = _bn_inits("bn1", stats)
    inits = [_init("conv1.weight", _weight(rng, (c, c_in, 3, 3), c_in * 9, np.float32))]
    if overridable_initializers:
        inits += bn_inits
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _bn("bn1", "conv1_out", "output", names),
    ]
    inputs = [("input", TensorProto.FLOAT, (1, c_in, 8, 8))] + [(n, TensorProto.FLOAT, (c,)) for n in names]
    return _model(
        "bn_params_as_overridable_inputs" if overridable_initializers else "bn_params_as_inputs",
        nodes, inputs, ["output"], inits, ir_version=8,
        doc=_doc(bn_params_as_inputs.__doc__),
    )


def bn_training_mode(opset: int = 15, seed: int = 0) -> onnx.ModelProto:
    """REFUSE: BatchNormalization with ``training_mode=1`` (opset 14/15) and its running-stat outputs.

    Outputs: ``output``, ``bn1.running_mean``, ``bn1.running_var`` (the spec wants all three in training
    mode). Its output uses the batch's statistics, so nothing may be folded.
    """
    if opset not in (14, 15):
        raise ValueError("training_mode exists from opset 14")
    rng = np.random.default_rng(seed)
    c_in, c = 3, 6
    names, bn_inits = _bn_inits("bn1", random_bn_stats(c, rng))
    inits = [_init("conv1.weight", _weight(rng, (c, c_in, 3, 3), c_in * 9, np.float32))]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["conv1_out", *names], ["output", "bn1.running_mean", "bn1.running_var"],
            name="bn1", training_mode=1, momentum=0.9,
        ),
    ]
    return _model(
        f"bn_training_mode_opset{opset}", nodes, [("input", TensorProto.FLOAT, (2, c_in, 8, 8))],
        ["output", "bn1.running_mean", "bn1.running_var"], inits + bn_inits, opset=opset,
        doc=_doc(bn_training_mode.__doc__),
    )


def matmul_rank3_bn(seed: int = 0) -> onnx.ModelProto:
    """REFUSE: MatMul with a rank-3 output ``[2, 3, 5]`` and BN over axis 1 (3 ≠ the weight's N = 5).

    BN scales axis 1 while the weight ``[4, 5]`` mixes the last axis: the shapes do not line up.
    """
    rng = np.random.default_rng(seed)
    names, bn_inits = _bn_inits("bn1", random_bn_stats(3, rng))
    inits = [_init("fc1.weight", _weight(rng, (4, 5), 4, np.float32))]
    nodes = [
        helper.make_node("MatMul", ["input", "fc1.weight"], ["fc1_out"], name="fc1_matmul"),
        _bn("bn1", "fc1_out", "output", names),
    ]
    return _model(
        "matmul_rank3_bn", nodes, [("input", TensorProto.FLOAT, (2, 3, 4))], ["output"], inits + bn_inits,
        doc=_doc(matmul_rank3_bn.__doc__),
    )


def bn_spatial0(seed: int = 0) -> onnx.ModelProto:
    """REFUSE (per-channel fold): BatchNormalization-7 with ``spatial=0``: statistics per element ``[C,H,W]``.

    A Conv → BN(spatial=0) whose scale varies over H and W cannot be folded into per-channel weights.
    """
    rng = np.random.default_rng(seed)
    c_in, c, hw = 3, 4, 6
    flat = random_bn_stats(c * hw * hw, rng)
    stats = {k: v.reshape(c, hw, hw) for k, v in flat.items()}
    names, bn_inits = _bn_inits("bn1", stats)
    inits = [_init("conv1.weight", _weight(rng, (c, c_in, 3, 3), c_in * 9, np.float32))]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _bn("bn1", "conv1_out", "output", names, spatial=0),
    ]
    return _model(
        "bn_spatial0", nodes, [("input", TensorProto.FLOAT, (2, c_in, hw, hw))], ["output"], inits + bn_inits, opset=7,
        doc=_doc(bn_spatial0.__doc__),
    )


def conv_bn_fp16_overflow(seed: int = 0) -> onnx.ModelProto:
    """REFUSE: fp16 Conv → BN whose folded weight would exceed 65504 (large weights, variance 1e-6).

    Weights of magnitude 100..300 and γ/√(σ²+ε) ≈ -452 on channel 0 give folded weights up to ~1.3e5.
    The model is fragile by construction: its own BN output overflows fp16 for inputs of ordinary size.
    """
    rng = np.random.default_rng(seed)
    c_in, c = 3, 4
    stats = random_bn_stats(c, rng, np.float16, var_range=(1e-6, 1.0))
    stats["scale"][0] = -1.5  # channel 0: |s| = 1.5/sqrt(1e-6 + 1e-5) ≈ 452
    w = (rng.uniform(100, 300, (c, c_in, 3, 3)) * rng.choice([-1.0, 1.0], (c, c_in, 3, 3))).astype(np.float16)
    names, bn_inits = _bn_inits("bn1", stats)
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["conv1_out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _bn("bn1", "conv1_out", "output", names),
    ]
    return _model(
        "conv_bn_fp16_overflow", nodes, [("input", TensorProto.FLOAT16, (1, c_in, 6, 6))], ["output"],
        [_init("conv1.weight", w)] + bn_inits,
        doc=_doc(conv_bn_fp16_overflow.__doc__),
    )


def unfoldable(seed: int = 0) -> onnx.ModelProto:
    """Mixed: bn1 folds; bn2 must stay (conv2's output also feeds add2); bn3 must stay (training_mode=1).

    input [2,4,8,8] → conv1 → bn1 → relu1 → conv2 → bn2 → add2(bn2_out, conv2_out) → bn3 (training mode,
    opset 15) → output (+ bn3.running_mean, bn3.running_var).
    """
    rng = np.random.default_rng(seed)
    c = 4
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for i in (1, 2):
        inits.append(_init(f"conv{i}.weight", _weight(rng, (c, c, 3, 3), c * 9, np.float32)))
        inits.append(_init(f"conv{i}.bias", rng.normal(0, 0.5, c).astype(np.float32)))
    bn_names = {}
    for i in (1, 2, 3):
        names, bi = _bn_inits(f"bn{i}", random_bn_stats(c, rng))
        inits += bi
        bn_names[i] = names
    conv = lambda i, x: helper.make_node(  # noqa: E731
        "Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}_out"], name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    nodes = [
        conv(1, "input"),
        _bn("bn1", "conv1_out", "bn1_out", bn_names[1]),
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"], name="relu1"),
        conv(2, "relu1_out"),
        _bn("bn2", "conv2_out", "bn2_out", bn_names[2]),
        helper.make_node("Add", ["bn2_out", "conv2_out"], ["add2_out"], name="add2"),
        helper.make_node(
            "BatchNormalization", ["add2_out", *bn_names[3]], ["output", "bn3.running_mean", "bn3.running_var"],
            name="bn3", training_mode=1,
        ),
    ]
    return _model(
        "unfoldable", nodes, [("input", TensorProto.FLOAT, (2, c, 8, 8))],
        ["output", "bn3.running_mean", "bn3.running_var"], inits, opset=15,
        doc=_doc(unfoldable.__doc__),
    )


# ----------------------------------------------------------------------------------------------
# catalogue (for tests): name → zero-argument builder; resnet50_size is left out (too big for tests)
# ----------------------------------------------------------------------------------------------
def _catalogue() -> dict[str, object]:
    from functools import partial

    cat: dict[str, object] = {}
    for dims in (1, 2, 3):
        for groups in (1, 2):
            for bias in (True, False):
                cat[f"conv_bn[{dims}d,g{groups},bias={bias}]"] = partial(conv_bn, dims, groups, bias)
                cat[f"conv_transpose_bn[{dims}d,g{groups},bias={bias}]"] = partial(conv_transpose_bn, dims, groups, bias)
        cat[f"depthwise_conv_bn[{dims}d]"] = partial(depthwise_conv_bn, dims)
    cat["conv_transpose_bn[2d,g3]"] = partial(conv_transpose_bn, 2, 3)
    cat["conv_bn[fp16]"] = partial(conv_bn, dtype=np.float16)
    cat["conv_transpose_bn[fp16,g2]"] = partial(conv_transpose_bn, 2, 2, dtype=np.float16)
    for alpha, beta in ((1.0, 1.0), (0.5, 2.0), (-1.5, 0.25)):
        for ta in (0, 1):
            for tb in (0, 1):
                for cs in (None, "N", "1N", "MN", "scalar"):
                    cat[f"gemm_bn[a={alpha},b={beta},tA={ta},tB={tb},C={cs}]"] = partial(gemm_bn, alpha, beta, ta, tb, cs)
    cat["gemm_bn[fp64]"] = partial(gemm_bn, 0.5, 2.0, 0, 1, "N", np.float64)
    cat["matmul_bn"] = partial(matmul_bn, False)
    cat["matmul_add_bn"] = partial(matmul_bn, True)
    for opset in BN_OPSETS:
        for dt in (np.float32, np.float16, np.float64):
            cat[f"bn_opset[{opset},{np.dtype(dt).name}]"] = partial(bn_opset, opset, dt)
    cat["bn_opset[15,float16,stats=float32]"] = partial(bn_opset, 15, np.float16, stats_dtype=np.float32)
    cat["bn_opset[9,float32,eps=default]"] = partial(bn_opset, 9, np.float32, epsilon=None)
    for f in (shared_weight_conv_bn, identity_params, constant_node_params, constant_of_shape_weight, expand_castlike_bias, resnet_tiny):
        cat[f.__name__] = f
    for f in (conv_bn_two_consumers, bn_params_as_inputs, matmul_rank3_bn, bn_spatial0, conv_bn_fp16_overflow, unfoldable):
        cat[f.__name__] = f
    cat["bn_params_as_inputs[overridable]"] = partial(bn_params_as_inputs, overridable_initializers=True)
    cat["bn_training_mode[14]"] = partial(bn_training_mode, 14)
    cat["bn_training_mode[15]"] = partial(bn_training_mode, 15)
    return cat


BUILDERS = _catalogue()
"""Every small model variant by a readable id (resnet50_size excluded), for parametrized tests."""

TRAINING_MODE_BUILDERS = frozenset({"bn_training_mode[14]", "bn_training_mode[15]", "unfoldable"})
"""Variants with a BN in training mode (onnxruntime may refuse or compute batch statistics)."""
