"""Rule `token-bn`: MatMul/Gemm (→ Add bias) → Reshape/Flatten → BatchNorm (→ reshape back), into the producer.

Hand-built graphs over the shapes the exporters produce (Flatten axis = rank − 1, Reshape to a constant
``[-1, C]`` / ``[M, C]`` / ``[0, -1]``, a target built by Concat of Constants, the bias Add either operand
order), opsets 13/17 and float16/32/64; real torch exports (TorchScript, dynamo, dynamo optimize=False);
refusals with their codes and the graph unchanged; and variants of the rule that are wrong on purpose
(scaling rows, accepting a bias that varies along another axis) caught by the output comparison.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold.onnx.rules.token_bn as token_bn
from bnfold import check_onnx, fold_onnx
from bnfold.affine import as_f64
from bnfold.report import Reason, Status
from tests.onnx.helpers import (
    F16,
    F32,
    F64,
    assert_equivalent,
    assert_valid,
    bn_node,
    fold_and_verify,
    init,
    initializers,
    make_model,
    op_types,
    rand,
    rel_err,
    run,
)

RULE = "token-bn"


def trained_stats(c: int, rng: np.random.Generator, dtype=F32, smallest_var: float = 1e-6) -> dict[str, np.ndarray]:
    """Trained-like statistics: non-zero means, variances log-uniform down to `smallest_var`, negative γ."""
    gamma = rng.standard_normal(c) * 1.5
    gamma[: max(1, c // 4)] = -np.abs(gamma[: max(1, c // 4)]) - 0.3
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c) * 2 + 0.5
    var = np.exp(rng.uniform(np.log(smallest_var), np.log(1e2), c))
    var[-1] = smallest_var
    return {k: v.astype(dtype) for k, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))}


def token_model(
    rng: np.random.Generator,
    *,
    n: int = 2,
    l: int = 5,
    k: int = 8,
    c: int = 6,
    rank: int = 3,
    bias: str | None = None,  # None, "add" (MatMul, b) or "add-first" (b, MatMul: TorchScript's order)
    bias_shape: tuple | None = None,
    flat: str = "flatten",  # flatten | minus1 | static | zero-minus1 | concat | flatten-neg
    back: bool = True,
    dtype=F32,
    opset: int = 17,
    dynamic_batch: bool = False,
    smallest_var: float = 1e-6,
) -> onnx.ModelProto:
    """x[N, L, K] (or [M, K]) → MatMul(W[K, C]) (→ Add b) → flatten to [N·L, C] → BN (→ Reshape back)."""
    x_shape = [n, l, k] if rank == 3 else [n * l, k]
    z_shape = [*x_shape[:-1], c]
    m_rows = n * l
    inits = [init("W", rand((k, c), rng, dtype, 0.5))]
    inits += [init(f"bn.{key}", v) for key, v in trained_stats(c, rng, dtype, smallest_var).items()]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul")]
    z = "mm"
    if bias is not None:
        inits.append(init("b", rand(bias_shape or (c,), rng, dtype)))
        ins = ["mm", "b"] if bias == "add" else ["b", "mm"]
        nodes.append(helper.make_node("Add", ins, ["z"], name="bias_add"))
        z = "z"
    if flat in ("flatten", "flatten-neg"):
        axis = -1 if flat == "flatten-neg" else rank - 1
        nodes.append(helper.make_node("Flatten", [z], ["flat"], name="flatten", axis=axis))
    else:
        target = {"minus1": [-1, c], "static": [m_rows, c], "zero-minus1": [0, -1], "concat": None}[flat]
        if target is None:  # dynamo optimize=False: Concat of Constants
            nodes += [
                helper.make_node("Constant", [], ["t0"], value_ints=[m_rows]),
                helper.make_node("Constant", [], ["t1"], value_ints=[c]),
                helper.make_node("Concat", ["t0", "t1"], ["target"], axis=0),
            ]
        else:
            inits.append(init("target", np.array(target, np.int64)))
        nodes.append(helper.make_node("Reshape", [z, "target"], ["flat"], name="reshape"))
    nodes.append(bn_node("flat", "y" if back else "output", opset=opset))
    if back:
        inits.append(init("back", np.array(z_shape, np.int64)))
        nodes.append(helper.make_node("Reshape", ["y", "back"], ["output"], name="reshape_back"))
    in_shape = ["N", *x_shape[1:]] if dynamic_batch else x_shape
    return make_model(nodes, [("x", in_shape, dtype)], [("output", dtype)], inits, opset=opset)


def gemm_model(
    rng: np.random.Generator, *, m: int = 7, k: int = 5, c: int = 4, trans_b: int = 1, beta: float = 0.5, flat: str = "flatten"
) -> onnx.ModelProto:
    """x[M, K] → Gemm(B, C; transB, β) → Flatten(axis=1) / Reshape[-1, C] → BN."""
    b = rand((c, k) if trans_b else (k, c), rng, F32, 0.5)
    inits = [init("B", b), init("C", rand(c, rng)), *(init(f"bn.{key}", v) for key, v in trained_stats(c, rng).items())]
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm", transB=trans_b, beta=beta)]
    if flat == "flatten":
        nodes.append(helper.make_node("Flatten", ["g"], ["flat"], name="flatten", axis=1))
    else:
        inits.append(init("target", np.array([-1, c], np.int64)))
        nodes.append(helper.make_node("Reshape", ["g", "target"], ["flat"], name="reshape"))
    nodes.append(bn_node("flat", "output"))
    return make_model(nodes, [("x", [m, k], F32)], [("output", F32)], inits)


def assert_token_fold(m: onnx.ModelProto, rng: np.random.Generator, **kw) -> onnx.ModelProto:
    out, report = fold_and_verify(m, rng, **kw)
    (cand,) = report.candidates
    assert (cand.status, cand.rule, cand.direction) == (Status.FOLDED, RULE, "into-producer")
    (checked,) = check_onnx(m).candidates  # check == fold
    assert (checked.status, checked.rule) == (Status.FOLDABLE, RULE)
    return out


def assert_refused(m: onnx.ModelProto, code: Reason) -> str:
    """The BatchNorm stays with `code` among its reasons, and the fold leaves the graph as it was."""
    out, report = fold_onnx(m)
    (cand,) = [c for c in report.candidates if c.op_type == "BatchNormalization"]
    assert cand.status is Status.SKIPPED, str(report)
    assert code in [r.code for r in cand.reasons], str(report)
    assert op_types(out) == op_types(m)
    before, after = initializers(m), initializers(out)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    (checked,) = [c for c in check_onnx(m).candidates if c.op_type == "BatchNormalization"]
    assert checked.status is Status.SKIPPED and code in [r.code for r in checked.reasons]
    return next(r.message for r in cand.reasons if r.code is code)


# ---------------------------------------------------------------------------------------------
# positive cases: hand-built graphs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat", ["flatten", "flatten-neg", "minus1", "static", "concat"])
@pytest.mark.parametrize("bias", [None, "add", "add-first"])
def test_folds_every_exporter_shape(flat: str, bias: str | None) -> None:
    rng = np.random.default_rng(hash((flat, bias)) % 2**32)
    out = assert_token_fold(token_model(rng, bias=bias, flat=flat), rng)
    ops = op_types(out)
    assert ops.count("MatMul") == 1 and ops.count("Add") == 1  # the bias Add is reused or added once
    assert ops.index("Add") < ops.index("Flatten" if flat.startswith("flatten") else "Reshape")


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("dtype", [F32, F16, F64])
@pytest.mark.parametrize("bias", [None, "add"])
def test_dtypes_and_opsets(opset: int, dtype, bias: str | None) -> None:
    rng = np.random.default_rng(opset * 7 + len(str(dtype)))
    # float16: a variance of 1e-6 gives |s| ~ 1e3, and the *original* model overflows on large inputs
    kw = {"smallest_var": 1e-3} if dtype == F16 else {}
    assert_token_fold(token_model(rng, bias=bias, flat="minus1", dtype=dtype, opset=opset, **kw), rng)


@pytest.mark.parametrize(
    "shape",
    [
        dict(n=1, l=1, k=3, c=2),
        dict(n=3, l=7, k=16, c=32),
        dict(n=2, l=4, k=4, c=4),  # L = K = C: a wrong axis would not be caught by a shape error
        dict(n=2, l=5, k=8, c=6, rank=2),  # rank-2 MatMul + Flatten(axis=1) / Reshape
        dict(n=4, l=9, k=12, c=1),
    ],
)
@pytest.mark.parametrize("flat", ["flatten", "minus1"])
def test_shapes(shape: dict, flat: str) -> None:
    rng = np.random.default_rng(shape["c"] * 31 + shape["l"])
    assert_token_fold(token_model(rng, bias="add", flat=flat, **shape), rng)


def test_rank2_reshape_zero_minus1() -> None:
    """[0, -1] on [M, C] (allowzero = 0) copies M; -1 is then C. (On [N, L, C] it gives [N, L·C]: refused.)"""
    rng = np.random.default_rng(6)
    assert_token_fold(token_model(rng, bias="add", flat="zero-minus1", rank=2), rng)


def test_dynamic_batch_with_a_constant_minus1_target() -> None:
    """[-1, C] needs no static batch: the second output dimension is C whatever N is."""
    rng = np.random.default_rng(5)
    m = token_model(rng, bias="add", flat="minus1", dynamic_batch=True, back=False)
    out, report = fold_onnx(m)
    assert [c.rule for c in report.candidates] == [RULE] and report.folded == 1
    assert_valid(out)
    for batch in (1, 3):
        x = {"x": rand((batch, 5, 8), rng)}
        assert rel_err(run(m, x)[0], run(out, x)[0]) <= 1e-5


def test_bias_of_shape_1_1_c_and_scalar() -> None:
    for shape in [(1, 1, 6), (1,), ()]:
        rng = np.random.default_rng(len(shape))
        out = assert_token_fold(token_model(rng, bias="add", bias_shape=shape), rng)
        b = initializers(out)["b"]
        assert b.shape == (*shape[:-1], 6)


def test_chain_of_bn_and_per_channel_mul_after_the_flatten() -> None:
    rng = np.random.default_rng(11)
    m = token_model(rng, bias="add", back=False)
    m.graph.node[-1].output[0] = "y"
    m.graph.node.append(helper.make_node("Mul", ["y", "gain"], ["output"], name="gain_mul"))
    m.graph.initializer.append(init("gain", rand((1, 6), rng, F32)))
    m = make_model(list(m.graph.node), [("x", [2, 5, 8], F32)], [("output", F32)], list(m.graph.initializer))
    out = assert_token_fold(m, rng)
    assert "Mul" not in op_types(out)


@pytest.mark.parametrize("flat", ["flatten", "minus1"])
@pytest.mark.parametrize("trans_b,beta", [(0, 1.0), (1, 0.5)])
def test_gemm_rank2(flat: str, trans_b: int, beta: float) -> None:
    rng = np.random.default_rng(trans_b + 2)
    assert_token_fold(gemm_model(rng, trans_b=trans_b, beta=beta, flat=flat), rng)


def test_shape_only_reader_of_the_layer_output_is_allowed() -> None:
    """TorchScript's reshape_as reads Shape(z): the fold changes values, never shapes."""
    rng = np.random.default_rng(12)
    m = token_model(rng, bias="add-first", back=False)
    nodes = list(m.graph.node)
    nodes[-1].output[0] = "y"
    nodes += [helper.make_node("Shape", ["z"], ["zs"]), helper.make_node("Reshape", ["y", "zs"], ["output"])]
    m = make_model(nodes, [("x", [2, 5, 8], F32)], [("output", F32)], list(m.graph.initializer))
    assert "Shape" in op_types(assert_token_fold(m, rng))


# ---------------------------------------------------------------------------------------------
# positive cases: real torch exports
# ---------------------------------------------------------------------------------------------
EXPORTERS = {
    "torchscript": dict(dynamo=False, do_constant_folding=False),
    "dynamo-noopt": dict(dynamo=True, optimize=False),
    "dynamo": dict(dynamo=True),
}


def torch_export(
    tmp_path, exporter: str, bias: bool, n: int, l: int, k: int, c: int, seed: int, dynamic: bool = False
) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    if exporter.startswith("dynamo"):
        pytest.importorskip("onnxscript")

    class TokenBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.nn.Linear(k, c, bias=bias)
            self.bn = torch.nn.BatchNorm1d(c)

        def forward(self, x):
            y = self.l(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y)

    torch.manual_seed(seed)
    block = TokenBlock().eval()
    stats = trained_stats(c, np.random.default_rng(seed))
    with torch.no_grad():
        for name, key in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
            getattr(block.bn, name).copy_(torch.from_numpy(stats[key]))
    path = tmp_path / f"{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(EXPORTERS[exporter])
        if dynamic and exporter.startswith("dynamo"):
            kw["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        elif dynamic:
            kw.update(input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        torch.onnx.export(block, (torch.randn(n, l, k),), str(path), **kw)
    m = onnx.load(str(path))
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 1
    return m


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("bias", [False, True])
def test_torch_exports_fold(tmp_path, exporter: str, bias: bool) -> None:
    m = torch_export(tmp_path, exporter, bias, n=2, l=5, k=16, c=32, seed=3)
    rng = np.random.default_rng(4)
    assert_token_fold(m, rng)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torch_exports_other_shape(tmp_path, exporter: str) -> None:
    m = torch_export(tmp_path, exporter, True, n=3, l=7, k=12, c=20, seed=8)
    assert_token_fold(m, np.random.default_rng(9))


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_torch_exports_with_a_dynamic_batch(tmp_path, exporter: str) -> None:
    """dynamo optimize=False computes the flatten target at run time from Shape(x): proved by the BN."""
    m = torch_export(tmp_path, exporter, True, n=2, l=5, k=16, c=32, seed=10, dynamic=True)
    out, report = fold_onnx(m)
    assert [c.rule for c in report.candidates] == [RULE] and report.folded == 1, str(report)
    assert "BatchNormalization" not in op_types(out)
    assert_valid(out)
    rng = np.random.default_rng(11)
    name = m.graph.input[0].name
    for batch in (1, 3):
        x = {name: rand((batch, 5, 16), rng)}
        assert rel_err(run(m, x)[0], run(out, x)[0]) <= 1e-5


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torch_levit_like_stack_folds_every_batchnorm(tmp_path, exporter: str) -> None:
    """Several LinearNorm blocks (Linear → BN1d over tokens), a residual and an activation between them."""
    torch = pytest.importorskip("torch")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")

    class LinearNorm(torch.nn.Module):
        def __init__(self, k: int, c: int) -> None:
            super().__init__()
            self.l, self.bn = torch.nn.Linear(k, c, bias=False), torch.nn.BatchNorm1d(c)

        def forward(self, x):
            y = self.l(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y)

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = LinearNorm(16, 48), LinearNorm(48, 16), LinearNorm(16, 24)

        def forward(self, x):
            x = x + self.b(torch.nn.functional.hardswish(self.a(x)))
            return self.c(x)

    torch.manual_seed(12)
    net = Stack().eval()
    rng = np.random.default_rng(12)
    with torch.no_grad():
        for block in (net.a, net.b, net.c):
            stats = trained_stats(block.bn.num_features, rng)
            for name, key in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
                getattr(block.bn, name).copy_(torch.from_numpy(stats[key]))
    path = tmp_path / "stack.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 7, 16),), str(path), **EXPORTERS[exporter])
    m = onnx.load(str(path))
    assert op_types(m).count("BatchNormalization") == 3
    out, report = fold_and_verify(m, rng, folds=3)
    assert [c.rule for c in report.candidates] == [RULE] * 3


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def test_flatten_that_merges_the_feature_axis_is_a_shape_mismatch() -> None:
    """Flatten(axis=1) of [N, L, C] gives [N, L·C]: the BN's channels are (token, feature) pairs."""
    rng = np.random.default_rng(20)
    n, l, k, c = 2, 3, 4, 2
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul"),
        helper.make_node("Flatten", ["mm"], ["flat"], name="flatten", axis=1),
        bn_node("flat", "output"),
    ]
    inits = [init("W", rand((k, c), rng)), *(init(f"bn.{key}", v) for key, v in trained_stats(l * c, rng).items())]
    m = make_model(nodes, [("x", [n, l, k], F32)], [("output", F32)], inits)
    msg = assert_refused(m, Reason.SHAPE_MISMATCH)
    assert "axis=1" in msg and "flatten" in msg


def test_reshape_target_that_merges_the_feature_axis_is_a_shape_mismatch() -> None:
    rng = np.random.default_rng(21)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul"),
        helper.make_node("Reshape", ["mm", "target"], ["flat"], name="reshape"),
        bn_node("flat", "output"),
    ]
    inits = [
        init("W", rand((4, 3), rng)),
        init("target", np.array([2, -1], np.int64)),
        *(init(f"bn.{key}", v) for key, v in trained_stats(15, rng).items()),
    ]
    m = make_model(nodes, [("x", [2, 5, 4], F32)], [("output", F32)], inits)
    assert "[2, -1]" in assert_refused(m, Reason.SHAPE_MISMATCH)


def runtime_target_model(rng: np.random.Generator, target_len: int | None) -> onnx.ModelProto:
    """The Reshape's target is a graph input (computed at run time), of static length `target_len`."""
    m = token_model(rng, bias="add", flat="minus1", back=False, dynamic_batch=True)
    g = m.graph
    del g.initializer[[t.name for t in g.initializer].index("target")]
    g.input.append(helper.make_tensor_value_info("target", onnx.TensorProto.INT64, [target_len]))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_runtime_reshape_target_of_unknown_length_is_not_constant() -> None:
    m = runtime_target_model(np.random.default_rng(22), None)
    assert "shape" in assert_refused(m, Reason.NOT_CONSTANT)


def test_runtime_reshape_target_of_length_2_is_proved_by_the_batchnorm() -> None:
    """Rank 2, and the BN requires axis 1 to be C long: wherever the original runs, the fold is exact."""
    rng = np.random.default_rng(22)
    m = runtime_target_model(rng, 2)
    out, report = fold_onnx(m)
    assert [c.rule for c in report.candidates] == [RULE] and report.folded == 1
    assert_valid(out)
    for batch in (1, 3):
        x = {"x": rand((batch, 5, 8), rng), "target": np.array([-1, 6], np.int64)}
        assert rel_err(run(m, x)[0], run(out, x)[0]) <= 1e-5


def test_weight_that_is_a_graph_input_is_not_constant() -> None:
    rng = np.random.default_rng(23)
    m = token_model(rng, back=False)
    g = m.graph
    del g.initializer[[t.name for t in g.initializer].index("W")]
    m = make_model(list(g.node), [("x", [2, 5, 8], F32), ("W", [8, 6], F32)], [("output", F32)], list(g.initializer))
    assert "weight" in assert_refused(m, Reason.NOT_CONSTANT)


@pytest.mark.parametrize("where", ["mm", "z", "flat"])
def test_another_reader_is_other_consumer(where: str) -> None:
    rng = np.random.default_rng(24)
    m = token_model(rng, bias="add", back=False)
    nodes = [*m.graph.node, helper.make_node("Relu", [where], ["side"], name="side_relu")]
    m = make_model(nodes, [("x", [2, 5, 8], F32)], [("output", F32), ("side", F32)], list(m.graph.initializer))
    assert "side_relu" in assert_refused(m, Reason.OTHER_CONSUMER)


@pytest.mark.parametrize("where", ["mm", "z", "flat"])
def test_an_intermediate_graph_output_is_refused(where: str) -> None:
    rng = np.random.default_rng(25)
    m = token_model(rng, bias="add", back=False)
    m = make_model(list(m.graph.node), [("x", [2, 5, 8], F32)], [("output", F32), (where, F32)], list(m.graph.initializer))
    assert where in assert_refused(m, Reason.GRAPH_OUTPUT)


def test_bias_that_varies_along_the_tokens_is_a_shape_mismatch() -> None:
    rng = np.random.default_rng(26)
    m = token_model(rng, n=2, l=6, c=6, bias="add", bias_shape=(6, 1))
    assert "[6, 1]" in assert_refused(m, Reason.SHAPE_MISMATCH)


def test_rank3_weight_is_a_shape_mismatch() -> None:
    rng = np.random.default_rng(27)
    m = token_model(rng, n=2, l=5, k=8, c=6, back=False)
    g = m.graph
    w = [t for t in g.initializer if t.name == "W"][0]
    w.CopyFrom(init("W", rand((2, 8, 6), rng)))
    m = make_model(list(g.node), [("x", [2, 5, 8], F32)], [("output", F32)], list(g.initializer))
    assert "rank-2" in assert_refused(m, Reason.SHAPE_MISMATCH)


def test_left_multiplication_is_not_the_pattern() -> None:
    """W·X (a constant on the left): the features are not z's last axis, so the rule does not claim it."""
    rng = np.random.default_rng(28)
    nodes = [
        helper.make_node("MatMul", ["W", "x"], ["mm"], name="matmul"),
        helper.make_node("Flatten", ["mm"], ["flat"], name="flatten", axis=2),
        bn_node("flat", "output"),
    ]
    inits = [init("W", rand((3, 4), rng)), *(init(f"bn.{key}", v) for key, v in trained_stats(5, rng).items())]
    m = make_model(nodes, [("x", [2, 4, 5], F32)], [("output", F32)], inits)
    assert_refused(m, Reason.NO_LINEAR_NEIGHBOUR)


# ---------------------------------------------------------------------------------------------
# the rule made wrong on purpose: the comparison catches it
# ---------------------------------------------------------------------------------------------
def test_scaling_rows_instead_of_columns_is_caught(monkeypatch) -> None:
    rng = np.random.default_rng(30)
    m = token_model(rng, n=2, l=4, k=6, c=6, bias="add")  # K = C: the wrong axis has the right length

    def rows(w, b, a):
        bias = np.zeros(a.scale.shape[0]) if b is None else as_f64(b)
        return as_f64(w) * a.scale[:, None], a.scale * bias + a.shift

    monkeypatch.setattr(token_bn, "A", SimpleNamespace(fold_into_matmul=rows))
    out, report = fold_onnx(m)
    assert report.folded == 1
    with pytest.raises(AssertionError, match="differs"):
        assert_equivalent(m, out, rng)


def test_accepting_a_bias_along_the_tokens_is_caught(monkeypatch) -> None:
    """The precondition on the bias Add matters: a [L, 1] bias read as per-feature folds wrongly."""
    rng = np.random.default_rng(31)
    m = token_model(rng, n=2, l=6, c=6, bias="add", bias_shape=(6, 1))
    monkeypatch.setattr(token_bn, "_per_feature", lambda b, c: b.reshape(-1) if b.size == c else None)
    out, report = fold_onnx(m)
    assert report.folded == 1
    assert_valid(out)
    with pytest.raises(AssertionError, match="differs"):
        assert_equivalent(m, out, rng)


def test_tolerance_is_tight_for_float32() -> None:
    rng = np.random.default_rng(32)
    m = token_model(rng, n=3, l=7, k=16, c=32, bias="add")
    out, _ = fold_onnx(m)
    assert assert_equivalent(m, out, rng) <= 1e-5


# ---------------------------------------------------------------------------------------------
# bnfold check on the command line calls it foldable
# ---------------------------------------------------------------------------------------------
def test_cli_check_reports_it_foldable(tmp_path) -> None:
    from click.testing import CliRunner

    from bnfold.cli import main
    from bnfold.errors import EXIT_CHECK_FAILED

    rng = np.random.default_rng(40)
    path = tmp_path / "token.onnx"
    onnx.save(token_model(rng, bias="add-first", flat="concat"), str(path))
    r = CliRunner().invoke(main, ["check", "--format", "json", str(path)], catch_exceptions=False)
    assert r.exit_code == EXIT_CHECK_FAILED, r.output
    (finding,) = json.loads(r.stdout)["models"][0]["findings"]
    assert (finding["status"], finding["target"], finding["direction"]) == ("foldable", "matmul", "into-producer")
