"""Rule `concat`: Concat(axis 1) of several layers → BatchNormalization, one channel slice per producer.

Models are built inline (Split → branch layers → Concat → BN → Relu, as MixNet exports them) and by the
three exporters (TorchScript, dynamo with and without its optimizer). BatchNorm statistics are
trained-like: non-zero means, variances log-uniform down to 1e-6, some negative γ.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold.onnx.rules.concat as concat_rule
from bnfold import check_onnx, fold_onnx
from bnfold.affine import Affine
from bnfold.report import Reason, Status
from tests.onnx.helpers import (
    F16,
    F32,
    F64,
    assert_equivalent,
    assert_valid,
    bn_inits,
    bn_node,
    fold_and_verify,
    init,
    initializers,
    make_model,
    op_types,
    rand,
    run,
)

SPATIAL = 6


def trained_stats(c: int, rng: np.random.Generator, dtype=F32) -> dict[str, np.ndarray]:
    """Non-zero means, log-uniform variances 1e-6..1e2 (the smallest present), negative γ on every third channel."""
    gamma = rng.uniform(0.3, 2.0, c) * np.where(np.arange(c) % 3 == 0, -1.0, 1.0)
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c) * 2 + 0.5
    var = np.exp(rng.uniform(np.log(1e-6), np.log(1e2), c))
    var[c // 2] = 1e-6
    return {k: v.astype(dtype) for k, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))}


# ---------------------------------------------------------------------------------------------
# building: input → Split → one layer per branch → Concat → BN → Relu → output
# ---------------------------------------------------------------------------------------------
def branch(kind: str, name: str, x: str, c_in: int, c_out: int, rng, dtype, *, k: int = 3, groups: int = 1, bias: bool = True):
    """One layer `name` reading `x`, writing `name`_out; spatial size kept (pads (k−1)/2)."""
    out = f"{name}_out"
    p = (k - 1) // 2
    if kind == "conv":
        w = rand((c_out, c_in // groups, k, k), rng, dtype, 0.5)
        attrs = dict(group=groups, pads=[p] * 4, kernel_shape=[k, k])
    elif kind == "convT":
        w = rand((c_in, c_out // groups, k, k), rng, dtype, 0.5)
        attrs = dict(group=groups, pads=[p] * 4, kernel_shape=[k, k])
    elif kind == "gemm":  # transB=1, β = 0.5
        w = rand((c_out, c_in), rng, dtype, 0.5)
        attrs = dict(transB=1, beta=0.5, alpha=1.25)
    elif kind == "matmul":
        w = rand((c_in, c_out), rng, dtype, 0.5)
        attrs = {}
    else:
        raise ValueError(kind)
    op = {"conv": "Conv", "convT": "ConvTranspose", "gemm": "Gemm", "matmul": "MatMul"}[kind]
    inits = [init(f"{name}.w", w)]
    ins = [x, f"{name}.w"]
    if bias and kind != "matmul":
        inits.append(init(f"{name}.b", rand(c_out, rng, dtype)))
        ins.append(f"{name}.b")
    return helper.make_node(op, ins, [out], name=name, **attrs), inits, out


def concat_bn(
    rng,
    branches: list[tuple],  # (kind, c_in, c_out, k, groups, bias)
    *,
    dtype=F32,
    opset: int = 17,
    axis: int = 1,
    relu: bool = True,
    bn_channels: int | None = None,
    tweak=None,
) -> onnx.ModelProto:
    """Split the input by the branches' c_in, run each branch's layer, Concat(axis), BN, Relu.

    ``tweak(nodes, inputs, inits)`` edits the lists before the model is built (the refusal cases).
    """
    rank2 = branches[0][0] in ("gemm", "matmul")
    c_ins = [b[1] for b in branches]
    total_out = sum(b[2] for b in branches)
    shape = [3, sum(c_ins)] if rank2 else [2, sum(c_ins), SPATIAL, SPATIAL]
    nodes = [
        helper.make_node("Split", ["input", "split"], [f"x{i}" for i in range(len(branches))], name="split", axis=1)
    ]
    inits = [init("split", np.array(c_ins, np.int64))]
    outs = []
    for i, (kind, c_in, c_out, k, groups, bias) in enumerate(branches):
        node, ws, out = branch(kind, f"l{i}", f"x{i}", c_in, c_out, rng, dtype, k=k, groups=groups, bias=bias)
        nodes.append(node)
        inits += ws
        outs.append(out)
    nodes.append(helper.make_node("Concat", outs, ["cat"], name="concat", axis=axis))
    nodes.append(bn_node("cat", "bn_out" if relu else "output", "bn"))
    inits += bn_inits("bn", trained_stats(bn_channels or total_out, rng, dtype))
    if relu:
        nodes.append(helper.make_node("Relu", ["bn_out"], ["output"], name="relu"))
    inputs = [("input", shape, dtype)]
    if tweak is not None:
        tweak(nodes, inputs, inits)
    return make_model(nodes, inputs, [("output", dtype)], inits, opset=opset)


def assert_concat_fold(m: onnx.ModelProto, rng, *, backend: str = "ort", rel: float | None = None):
    out, report = fold_and_verify(m, rng, folds=1, backend=backend, rel=rel)
    (cand,) = report.candidates
    producers = [n.name for n in m.graph.node if n.output[0] in [x for c in m.graph.node if c.op_type == "Concat" for x in c.input]]
    assert (cand.status, cand.rule, cand.direction) == (Status.FOLDED, "concat", "into-producer")
    assert cand.target == " + ".join(producers), cand.target
    assert cand.describe().endswith("(rule concat)")
    # the Concat stays and writes the BN chain's output tensor; each producer feeds it directly
    (cat,) = [n for n in out.graph.node if n.op_type == "Concat"]
    bn_out = [n for n in m.graph.node if n.op_type == "BatchNormalization"][0].output[0]
    assert list(cat.output) == [bn_out]
    # check calls it foldable, with the same target
    dry = check_onnx(m)
    assert dry.foldable == 1 and dry.left == 0, str(dry)
    assert [(c.rule, c.target, c.target_op) for c in dry.candidates] == [(cand.rule, cand.target, cand.target_op)]
    return out, report


# ---------------------------------------------------------------------------------------------
# positive cases
# ---------------------------------------------------------------------------------------------
CONV_CASES = {
    "k3+k5": [("conv", 4, 6, 3, 1, True), ("conv", 4, 10, 5, 1, True)],
    "k3+k5+k7-nobias": [("conv", 2, 4, 3, 1, False), ("conv", 3, 5, 5, 1, True), ("conv", 3, 3, 7, 1, False)],
    "4-branches-grouped-depthwise": [
        ("conv", 4, 4, 3, 1, True),
        ("conv", 4, 8, 5, 2, True),  # grouped
        ("conv", 3, 3, 3, 3, True),  # depthwise
        ("conv", 2, 6, 1, 1, False),
    ],
    "conv+convT": [("conv", 4, 5, 3, 1, True), ("convT", 4, 6, 3, 2, True)],
    "convT+convT": [("convT", 2, 3, 3, 1, False), ("convT", 4, 8, 5, 4, True)],
}


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_branches_fold_fp32(case: str, opset: int) -> None:
    rng = np.random.default_rng(sorted(CONV_CASES).index(case) * 100 + opset)  # str hash() is salted per run
    m = concat_bn(rng, CONV_CASES[case], opset=opset)
    out, report = assert_concat_fold(m, rng)
    assert report.folded == 1
    assert op_types(out) == [t for t in op_types(m) if t != "BatchNormalization"]


@pytest.mark.parametrize(
    "branches,axis",
    [
        ([("gemm", 3, 4, 0, 1, True), ("gemm", 2, 5, 0, 1, False)], 1),
        ([("gemm", 3, 4, 0, 1, True), ("gemm", 2, 5, 0, 1, True)], -1),  # -1 is axis 1 for rank 2
        ([("gemm", 3, 4, 0, 1, True), ("matmul", 2, 3, 0, 1, False), ("gemm", 4, 2, 0, 1, False)], 1),
    ],
    ids=["gemm+gemm", "gemm+gemm-axis-1", "gemm+matmul+gemm"],
)
@pytest.mark.parametrize("opset", [13, 17])
def test_rank2_branches_fold(branches, axis: int, opset: int) -> None:
    rng = np.random.default_rng(7 + opset + len(branches))
    m = concat_bn(rng, branches, axis=axis, opset=opset)
    assert_concat_fold(m, rng)


@pytest.mark.parametrize("dtype", [F16, F64], ids=["f16", "f64"])
@pytest.mark.parametrize("case", ["k3+k5", "4-branches-grouped-depthwise", "conv+convT"])
def test_conv_branches_fold_other_dtypes(case: str, dtype) -> None:
    branches = CONV_CASES[case]
    if dtype == F64 and case == "conv+convT":  # float64 runs on onnx.reference, which mis-reshapes grouped ConvTranspose weights
        branches = [("conv", 4, 5, 3, 1, True), ("convT", 4, 6, 3, 1, True)]
    rng = np.random.default_rng(11)
    m = concat_bn(rng, branches, dtype=dtype)
    assert_concat_fold(m, rng, backend="ref" if dtype == F64 else "ort")


@pytest.mark.parametrize("dtype", [F16, F64], ids=["f16", "f64"])
def test_rank2_branches_other_dtypes(dtype) -> None:
    rng = np.random.default_rng(12)
    m = concat_bn(rng, [("gemm", 3, 4, 0, 1, True), ("matmul", 2, 3, 0, 1, False)], dtype=dtype)
    assert_concat_fold(m, rng)


def _if_model(rng, *, convs_outside: bool) -> onnx.ModelProto:
    """If(cond) whose two branches each hold Concat → BN over the same weights (inside, or outer convs)."""
    shape = [1, 8, SPATIAL, SPATIAL]

    def convs(prefix: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name=f"{prefix}c0", pads=[1] * 4),
            helper.make_node("Conv", ["x", "w1"], ["c1"], name=f"{prefix}c1", pads=[2] * 4),
        ]

    def body(name: str) -> onnx.GraphProto:
        nodes = ([] if convs_outside else convs(f"{name}_")) + [
            helper.make_node("Concat", ["c0", "c1"], [f"{name}_cat"], name=f"{name}_cat", axis=1),
            bn_node(f"{name}_cat", f"{name}_y", "bn", name=f"{name}_bn"),
        ]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, shape)])

    nodes = (convs("") if convs_outside else []) + [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body("then"), else_branch=body("else"))
    ]
    inits = [init("w0", rand((3, 4, 3, 3), rng, F32, 0.5)), init("b0", rand(3, rng)), init("w1", rand((5, 4, 5, 5), rng, F32, 0.5))]
    inits += bn_inits("bn", trained_stats(8, rng))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []), helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, SPATIAL, SPATIAL])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_concat_in_subgraphs() -> None:
    """Inside each If branch it folds (the shared weights get private copies); outer convs read by both
    branches are refused in each, naming the other branch's Concat."""
    rng = np.random.default_rng(15)
    m = _if_model(rng, convs_outside=False)
    out, report = fold_onnx(m)
    assert report.folded == 2 and report.left == 0 and {c.rule for c in report.candidates} == {"concat"}, str(report)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": rand((1, 4, SPATIAL, SPATIAL), rng)}
        ref, got = run(m, feeds)[0], run(out, feeds)[0]
        assert np.max(np.abs(ref - got)) <= 1e-5 * np.max(np.abs(ref))
    m = _if_model(rng, convs_outside=True)
    out, report = fold_onnx(m)
    assert report.folded == 0 and out.SerializeToString() == m.SerializeToString()
    other = {"then_bn": "else_cat", "else_bn": "then_cat"}
    assert sorted(c.node for c in report.candidates) == ["else_bn", "then_bn"]
    for c in report.candidates:
        assert c.reasons[0].code is Reason.OTHER_CONSUMER and f"Concat '{other[c.node]}'" in c.reasons[0].message


def test_folded_slices_are_each_producers_own_fold() -> None:
    """Branch i's weight is scaled by s[o_i : o_i + C_i] exactly (float64, rounded once)."""
    rng = np.random.default_rng(3)
    m = concat_bn(rng, CONV_CASES["k3+k5"], relu=False)
    out, _ = assert_concat_fold(m, rng)
    src, dst = initializers(m), initializers(out)
    g, b, mu, v = (src[f"bn.{k}"].astype(np.float64) for k in ("scale", "bias", "mean", "var"))
    s = g / np.sqrt(v + np.float64(np.float32(1e-5)))
    t = b - s * mu
    ins = {n.name: list(n.input) for n in out.graph.node}
    for name, lo, hi in (("l0", 0, 6), ("l1", 6, 16)):
        w, bias = src[f"{name}.w"].astype(np.float64), src[f"{name}.b"].astype(np.float64)
        want_w = (w * s[lo:hi, None, None, None]).astype(np.float32)
        want_b = (bias * s[lo:hi] + t[lo:hi]).astype(np.float32)
        assert dst[ins[name][1]].tobytes() == want_w.tobytes()
        assert dst[ins[name][2]].tobytes() == want_b.tobytes()


def test_wrong_slices_are_caught(monkeypatch) -> None:
    """Slices handed out in reverse order (same sizes, so nothing refuses): the outputs must differ."""
    rng = np.random.default_rng(5)
    m = concat_bn(rng, [("conv", 4, 6, 3, 1, True), ("conv", 4, 6, 5, 1, True)])
    right = concat_rule.channel_slices

    def reversed_slices(affine: Affine, counts: list[int]) -> list[Affine]:
        return right(affine, counts)[::-1]

    monkeypatch.setattr(concat_rule, "channel_slices", reversed_slices)
    out, report = fold_onnx(m)
    assert report.folded == 1
    with pytest.raises(AssertionError, match="differs"):
        assert_equivalent(m, out, rng)


def test_bn_after_bn_before_concat_both_fold() -> None:
    """Conv → BN per branch, then Concat → BN: the branch BNs fold first, then the slices into the same convs."""
    rng = np.random.default_rng(9)
    m = concat_bn(rng, CONV_CASES["k3+k5"])
    g = m.graph
    nodes = list(g.node)
    extra = []
    for i, c in enumerate((6, 10)):
        conv = next(n for n in nodes if n.name == f"l{i}")
        conv.output[0] = f"l{i}_pre"
        extra.append((nodes.index(conv) + 1, bn_node(f"l{i}_pre", f"l{i}_out", f"bbn{i}")))
        g.initializer.extend(bn_inits(f"bbn{i}", trained_stats(c, rng)))
    for pos, node in reversed(extra):
        nodes.insert(pos, node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    out, report = fold_and_verify(m, rng, folds=3)
    assert [c.rule for c in report.candidates] == ["conv", "conv", "concat"]


def _bn_replaced_by(steps):
    """A `tweak` replacing the BN by Mul/Add steps with the given constants (cat → … → bn_out)."""

    def tweak(nodes, inputs, inits):
        bn = next(n for n in nodes if n.op_type == "BatchNormalization")
        at = nodes.index(bn)
        nodes.remove(bn)
        inits[:] = [t for t in inits if not t.name.startswith("bn.")]
        x = "cat"
        for k, (op, value) in enumerate(steps):
            y = "bn_out" if k == len(steps) - 1 else f"a{k}"
            inits.append(init(f"k{k}", value))
            nodes.insert(at + k, helper.make_node(op, [x, f"k{k}"], [y], name=f"affine{k}"))
            x = y

    return tweak


@pytest.mark.parametrize("per_channel", [True, False], ids=["mul-add-per-channel", "scalar-mul"])
def test_mul_add_chain_after_concat_folds(per_channel: bool) -> None:
    """A Mul/Add chain (Keras-style) after the Concat folds the same way; a scalar map goes whole to each layer."""
    rng = np.random.default_rng(13)
    c = 16
    steps = (
        [("Mul", rand((c, 1, 1), rng)), ("Add", rand((c, 1, 1), rng))] if per_channel else [("Mul", np.float32(-2.5))]
    )
    m = concat_bn(rng, CONV_CASES["k3+k5"], tweak=_bn_replaced_by(steps))
    out, report = fold_onnx(m)
    (cand,) = report.candidates
    assert (cand.status, cand.rule, cand.target) == (Status.FOLDED, "concat", "l0 + l1")
    assert op_types(out) == ["Split", "Conv", "Conv", "Concat", "Relu"]
    assert_valid(out)
    assert_equivalent(m, out, rng)


def test_bias_add_over_matmul_branches_is_left() -> None:
    """Concat → Add(bias) over MatMuls would become one Add per branch: not worth it, nothing changes."""
    rng = np.random.default_rng(14)
    m = concat_bn(rng, [("matmul", 3, 4, 0, 1, False), ("matmul", 2, 3, 0, 1, False)], tweak=_bn_replaced_by([("Add", rand(7, rng))]))
    out, report = fold_onnx(m)
    assert report.candidates == [] and out.SerializeToString() == m.SerializeToString()


# ---------------------------------------------------------------------------------------------
# refusals: code, a message naming the obstacle, and the graph left as it was
# ---------------------------------------------------------------------------------------------
def assert_refused(m: onnx.ModelProto, code: Reason, *words: str) -> None:
    out, report = fold_onnx(m)
    assert report.folded == 0 and report.left == 1, str(report)
    (cand,) = report.candidates
    assert cand.reasons[0].code is code, str(report)
    for w in words:
        assert w in cand.reasons[0].message, cand.reasons[0].message
    assert out.SerializeToString() == m.SerializeToString()
    dry = check_onnx(m)
    assert [[r.code for r in c.reasons] for c in dry.candidates] == [[r.code for r in c.reasons] for c in report.candidates]


def _edit(m: onnx.ModelProto, fn) -> onnx.ModelProto:
    fn(m.graph)
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize(
    "tensor,reader",
    [("l1_out", "other_reader"), ("cat", "cat_reader")],
    ids=["branch-read-elsewhere (DenseNet-style)", "concat-read-elsewhere"],
)
def test_refuses_output_read_elsewhere(tensor: str, reader: str) -> None:
    """A branch's output (or the Concat's) also feeds another node: that node would see the fold."""
    rng = np.random.default_rng(21)
    m = concat_bn(rng, CONV_CASES["k3+k5"])

    def add_reader(g):
        g.node.append(helper.make_node("Sigmoid", [tensor], ["side"], name=reader))
        g.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"]))

    assert_refused(_edit(m, add_reader), Reason.OTHER_CONSUMER, reader, tensor)


def test_refuses_branch_that_is_a_graph_output() -> None:
    rng = np.random.default_rng(22)
    m = concat_bn(rng, CONV_CASES["k3+k5"])
    assert_refused(
        _edit(m, lambda g: g.output.append(helper.make_tensor_value_info("l0_out", onnx.TensorProto.FLOAT, [2, 6, SPATIAL, SPATIAL]))),
        Reason.GRAPH_OUTPUT,
        "l0_out",
    )


def test_refuses_input_that_is_not_a_layer() -> None:
    """A mixed Concat: one input comes from a Relu; the message says which input."""
    rng = np.random.default_rng(24)
    m = concat_bn(rng, CONV_CASES["k3+k5"])

    def relu_branch(g):
        conv = next(n for n in g.node if n.name == "l1")
        conv.output[0] = "l1_pre"
        g.node.insert(list(g.node).index(conv) + 1, helper.make_node("Relu", ["l1_pre"], ["l1_out"], name="branch_relu"))

    assert_refused(_edit(m, relu_branch), Reason.NO_LINEAR_NEIGHBOUR, "input 1", "Relu 'branch_relu'", "not a")


def test_refuses_graph_input_in_concat() -> None:
    rng = np.random.default_rng(25)

    def raw_input(nodes, inputs, inits):
        inputs.append(("raw", [2, 3, SPATIAL, SPATIAL], F32))
        next(n for n in nodes if n.op_type == "Concat").input.append("raw")

    m = concat_bn(rng, CONV_CASES["k3+k5"], bn_channels=19, tweak=raw_input)
    assert_refused(m, Reason.NO_LINEAR_NEIGHBOUR, "input 2 'raw' is a graph input")


def test_refuses_same_tensor_twice() -> None:
    rng = np.random.default_rng(26)
    m = concat_bn(rng, [("conv", 4, 6, 3, 1, True), ("conv", 4, 6, 5, 1, True)])

    def twice(g):
        cat = next(n for n in g.node if n.op_type == "Concat")
        cat.input[1] = "l0_out"

    m = _edit(m, twice)
    out, report = fold_onnx(m)
    (cand,) = [c for c in report.candidates if c.node == "bn"]
    assert cand.status is Status.SKIPPED and cand.reasons[0].code is Reason.OTHER_CONSUMER
    assert "twice" in cand.reasons[0].message
    assert [n for n in out.graph.node if n.name == "concat"][0].SerializeToString() == [n for n in m.graph.node if n.name == "concat"][0].SerializeToString()
    assert op_types(out).count("BatchNormalization") == 1


def test_refusal_in_a_later_branch_leaves_every_branch_as_it_was() -> None:
    """Every slice is planned before any is written: branch 1's float16 overflow leaves branch 0 unfolded too."""
    rng = np.random.default_rng(30)

    def overflowing(nodes, inputs, inits):
        for k, t in enumerate(inits):
            a = onnx.numpy_helper.to_array(t).copy()
            if t.name == "l1.w":
                a[0, 0, 0, 0] = 30000.0
            elif t.name == "bn.scale":
                a[6] = 50.0  # channel 6 is branch 1's first: s ≈ 50/√(σ²+ε), far above 65504/30000
            elif t.name == "bn.var":
                a[6] = 1e-4
            else:
                continue
            inits[k] = init(t.name, a)

    m = concat_bn(rng, CONV_CASES["k3+k5"], dtype=F16, tweak=overflowing)
    assert_refused(m, Reason.FP16_OVERFLOW, "l1")


@pytest.mark.parametrize("axis", [2, -1])
def test_refuses_axis_other_than_channels(axis: int) -> None:
    """Concat along a spatial axis: channel c of the BN spans every input, no slice to hand out."""
    rng = np.random.default_rng(27)
    m = concat_bn(rng, [("conv", 4, 6, 3, 1, True), ("conv", 4, 6, 5, 1, True)], axis=axis, bn_channels=6)
    assert_refused(m, Reason.SHAPE_MISMATCH, "axis", "channel axis 1")


def test_refuses_unknown_channel_count() -> None:
    """A branch whose weight is a graph input of unknown shape: no static channel count."""
    rng = np.random.default_rng(28)

    def dynamic_weight(nodes, inputs, inits):
        inits[:] = [t for t in inits if t.name != "l1.w"]
        inputs.append(("l1.w", ["c", 4, 5, 5], F32))

    m = concat_bn(rng, CONV_CASES["k3+k5"], tweak=dynamic_weight)
    assert_refused(m, Reason.NOT_CONSTANT, "input 1 'l1_out'", "no static channel count")


def test_refuses_channel_count_mismatch() -> None:
    """The inputs' channels do not add up to the BN's (a broken model onnxruntime would reject)."""
    rng = np.random.default_rng(29)
    m = concat_bn(rng, CONV_CASES["k3+k5"])
    for t in m.graph.initializer:
        if t.name.startswith("bn."):
            t.CopyFrom(init(t.name, onnx.numpy_helper.to_array(t)[:15]))
    del m.graph.output[0].type.tensor_type.shape.dim[:]
    out, report = fold_onnx(m)
    assert out.SerializeToString() == m.SerializeToString()
    dry = check_onnx(m)
    for r in (report, dry):
        (cand,) = r.candidates
        assert cand.status is Status.SKIPPED and cand.reasons[0].code is Reason.SHAPE_MISMATCH, str(r)
    assert "6 + 10" in cand.reasons[0].message


# ---------------------------------------------------------------------------------------------
# exporter-built: TorchScript, dynamo optimize=False, dynamo default
# ---------------------------------------------------------------------------------------------
def _mix_block():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class MixBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(4, 6, 3, padding=1)
            self.c2 = nn.Conv2d(4, 10, 5, padding=2, bias=False)  # dynamo optimize=False: Expand(CastLike) bias
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            a, b = torch.split(x, 4, 1)
            return torch.relu(self.bn(torch.cat([self.c1(a), self.c2(b)], 1)))

    net = MixBlock()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        st = trained_stats(16, np.random.default_rng(0))
        net.bn.weight.copy_(torch.from_numpy(st["scale"]))
        net.bn.bias.copy_(torch.from_numpy(st["bias"]))
        net.bn.running_mean.copy_(torch.from_numpy(st["mean"]))
        net.bn.running_var.copy_(torch.from_numpy(st["var"]))
        for conv in (net.c1, net.c2):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
    return torch, net.eval()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo-optimize-false", "dynamo"])
def test_exported_mix_block_folds(exporter: str, tmp_path: Path) -> None:
    torch, net = _mix_block()
    if exporter.startswith("dynamo"):
        pytest.importorskip("onnxscript")
    x = torch.randn(2, 8, 7, 7)
    path = tmp_path / "mix.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["input"], opset_version=17)
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=True, optimize=exporter == "dynamo", verbose=False)
    m = onnx.load(str(path))
    ops = op_types(m)
    assert ops.count("BatchNormalization") == 1 and ops.count("Conv") == 2 and "Concat" in ops, ops
    if exporter == "dynamo-optimize-false":
        assert "SplitToSequence" in ops and "CastLike" in ops, ops
    out, report = fold_onnx(m)
    assert report.folded == 1 and report.left == 0, str(report)
    (cand,) = report.candidates
    assert cand.rule == "concat" and cand.target_op == "Conv" and " + " in cand.target, str(report)
    assert "BatchNormalization" not in op_types(out)
    assert_valid(out)
    rng = np.random.default_rng(1)
    assert_equivalent(m, out, rng)
    with torch.no_grad():
        ref = net(x).numpy()
    got = run(out, {m.graph.input[0].name: x.numpy()})[0]
    assert np.max(np.abs(ref - got)) / np.max(np.abs(ref)) < 1e-5
    assert check_onnx(m).foldable == 1


def test_check_names_the_concat_rule() -> None:
    """`bnfold check` says the BatchNorm folds through the Concat, not only which layer it lands in."""
    from bnfold.check import check_model

    m = concat_bn(np.random.default_rng(7), next(iter(CONV_CASES.values())))
    finding = check_model(m).findings[0]
    assert finding.code == "foldable" and "(rule concat" in finding.message
