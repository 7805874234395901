"""The planner's fast paths give exactly what the general code gives: same bits, same notes, same counts.

Planning runs per BatchNorm on small arrays, where numpy's per-call overhead is most of the cost, so a few
functions take a shortcut when they can prove the general code has nothing to add (`batchnorm_affine`
with no channel to note, `round_to_dtype` with nothing to flush, `constants._values` on plain inline
data). The suite's folds would still pass if a shortcut dropped a note or a flush count in a corner they
do not reach; these compare each shortcut with the general path on the corners (NaN, ±inf, ±0, σ² = 0,
negative σ²+ε, subnormals, the float16 limit).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import affine as A
from bnfold.onnx import constants

SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-300, -1e-300, 1e-45, 6e-8, 1e-3, -1e-3, 1.0, -2.5, 1e3, 1e5, 65504.0, 65520.0, 1e300]
values = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e6, 1e6, allow_nan=False, width=32))
DTYPES = [np.float16, np.float32, np.float64]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@st.composite
def batchnorm_params(draw):
    n = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    arrays = [np.array(draw(st.lists(values, min_size=n, max_size=n)), np.float64) for _ in range(4)]
    if draw(st.booleans()):  # trained-like: the fast path's own ground
        arrays[3] = np.abs(arrays[3]) + 1e-3
    with np.errstate(over="ignore", invalid="ignore"):
        arrays = [a.astype(dtype) for a in arrays]
    eps = draw(st.sampled_from([1e-5, float(np.float32(1e-5)), 1e-3, 0.0, -1e-3]))
    return arrays, eps


@settings(max_examples=400, deadline=None)
@given(batchnorm_params())
def test_batchnorm_affine_shortcut_equals_the_full_checks(case) -> None:
    arrays, eps = case
    with np.errstate(all="ignore"):
        fast = A.batchnorm_affine(*arrays, epsilon=eps)
        original = A._unremarkable
        A._unremarkable = lambda *args: False
        try:
            full = A.batchnorm_affine(*arrays, epsilon=eps)
        finally:
            A._unremarkable = original
    assert same_bits(fast.scale, full.scale) and same_bits(fast.shift, full.shift)
    assert fast.notes == full.notes


def test_batchnorm_affine_shortcut_is_taken_on_ordinary_statistics() -> None:
    rng = np.random.default_rng(0)
    gamma, beta, mean = (rng.standard_normal(16).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 2.0, 16).astype(np.float32)
    s = A.as_f64(gamma) / np.sqrt(A.as_f64(var) + 1e-5)
    assert A._unremarkable(A.as_f64(var), s, A.as_f64(beta) - s * A.as_f64(mean))


def reference_round(values: np.ndarray, dtype) -> tuple[np.ndarray, int] | str:
    """`round_to_dtype` as it reads without its shortcut: cast, refuse a finite value that overflowed, flush subnormals."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):
        out = values.astype(dtype)
    if (np.isfinite(values) & ~np.isfinite(out.astype(np.float64))).any():
        return "overflow"
    magnitude = np.abs(out)
    with np.errstate(invalid="ignore"):
        sub = (magnitude < np.finfo(dtype).tiny) & (magnitude > 0)
    flushed = int(np.count_nonzero(sub))
    if flushed:
        out = np.where(sub, np.zeros((), dtype), out).astype(dtype)
    return out, flushed


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(values, st.sampled_from([1e-39, -1e-39, 3e-308, 1e-310, 1.1754942e-38, 6.1e-5, -6.0e-8])), min_size=0, max_size=8),
       st.sampled_from(DTYPES))
def test_round_to_dtype_equals_the_general_rounding(xs: list[float], dtype) -> None:
    v = np.array(xs, np.float64)
    want = reference_round(v, dtype)
    try:
        got = A.round_to_dtype(v, dtype, "x")
    except A.FoldOverflowError:
        assert want == "overflow"
        return
    assert want != "overflow"
    assert same_bits(got[0], want[0]) and got[1] == want[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 1)])
def test_values_of_inline_raw_data_equal_to_array(dtype, shape) -> None:
    array = (np.arange(int(np.prod(shape))) - 2).astype(dtype).reshape(shape)
    proto = onnx.numpy_helper.from_array(array, "t")
    assert proto.HasField("raw_data")
    got = constants._values(gs.Constant("t", gs.ir.tensor.LazyValues(proto)))
    want = onnx.numpy_helper.to_array(proto)
    assert same_bits(got, want)


@pytest.mark.parametrize("dims", [[4], [6], [-1], [5, 1], []])
def test_values_of_raw_data_that_does_not_fit_its_dims_fail_or_pass_as_to_array(dims) -> None:
    proto = onnx.numpy_helper.from_array(np.arange(5, dtype=np.float32), "t")
    del proto.dims[:]
    proto.dims.extend(dims)
    const = gs.Constant("t", gs.ir.tensor.LazyValues(proto))
    try:
        want = onnx.numpy_helper.to_array(proto)
    except ValueError:
        with pytest.raises(ValueError):
            constants._values(const)
        return
    assert same_bits(constants._values(const), want)


def test_values_of_other_encodings_still_go_through_onnx() -> None:
    as_floats = onnx.helper.make_tensor("f", onnx.TensorProto.FLOAT, [2], [1.5, -2.0])  # float_data, not raw
    assert not as_floats.HasField("raw_data")
    assert same_bits(constants._values(gs.Constant("f", gs.ir.tensor.LazyValues(as_floats))), np.array([1.5, -2.0], np.float32))
    import ml_dtypes

    bf16 = onnx.numpy_helper.from_array(np.array([1.0, -3.0], ml_dtypes.bfloat16), "b")
    got = constants._values(gs.Constant("b", gs.ir.tensor.LazyValues(bf16)))
    assert got.dtype == ml_dtypes.bfloat16 and got.tolist() == [1.0, -3.0]


@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_stand_in_is_the_broadcast_zero(shape, dtype) -> None:
    got = A.stand_in(shape, dtype)
    want = np.broadcast_to(np.zeros((), dtype), shape)
    assert isinstance(got, A.StandIn) and got.shape == want.shape and got.dtype == want.dtype
    assert got.strides == want.strides and not got.flags.writeable and np.array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_limits_are_where_numpy_rounding_crosses(dtype) -> None:
    """`scaling_rounds_cleanly` compares its extreme products with these instead of rounding them: they must be
    numpy's own thresholds (found here by bisection over the float64 bit patterns), ties included."""
    dtype = np.dtype(dtype)
    tiny = np.finfo(dtype).tiny

    def first(crosses) -> float:
        lo, hi = 0, 0x7FF0000000000000  # +0.0 does not cross, +inf does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            with np.errstate(over="ignore"):
                rounded = np.array([mid], np.int64).view(np.float64).astype(dtype)[0]
            lo, hi = (lo, mid) if crosses(rounded) else (mid, hi)
        return float(np.array([hi], np.int64).view(np.float64)[0])

    assert A._rounding_limits(dtype) == (first(np.isinf), first(lambda r: r >= tiny))


def batchnorm_graph(stats: list[tuple[list[np.ndarray], float | None]]) -> gs.Graph:
    """One BatchNormalization per entry (parameters as initializers, epsilon absent where None), in a row."""
    nodes, x = [], gs.Variable("x", np.float32, None)
    for i, (params, eps) in enumerate(stats):
        y = gs.Variable(f"y{i}", np.float32, None)
        consts = [gs.Constant(f"bn{i}.{k}", gs.ir.tensor.LazyValues(onnx.numpy_helper.from_array(p, f"bn{i}.{k}")))
                  for k, p in zip("gbmv", params)]
        nodes.append(gs.Node("BatchNormalization", f"bn{i}", {} if eps is None else {"epsilon": eps}, inputs=[x, *consts], outputs=[y]))
        x = y
    return gs.Graph(nodes=nodes, inputs=[nodes[0].inputs[0]], outputs=[x])


@settings(max_examples=100, deadline=None)
@given(st.lists(batchnorm_params(), min_size=1, max_size=6), st.lists(st.sampled_from([None, 1e-5, 1e-3, 0.0]), min_size=6, max_size=6))
def test_batchnorms_done_at_once_equal_each_done_alone(cases, epsilons) -> None:
    """`chain.batchnorm_affines` (every plain BatchNorm of the graph in one pass) gives each BatchNorm the bits
    and the notes `batchnorm_step` gives it alone, whatever the others hold (NaN, zeros, dtypes)."""
    from bnfold.onnx.chain import batchnorm_affines, batchnorm_step

    graph = batchnorm_graph([(params, eps) for (params, _), eps in zip(cases, epsilons)])
    resolver = constants.ConstantResolver(set(), False, {}, 17)
    with np.errstate(all="ignore"):
        table = batchnorm_affines(graph.nodes, resolver)
        assert set(table) == {id(n) for n in graph.nodes}
        for node in graph.nodes:
            alone, together = batchnorm_step(node, resolver), batchnorm_step(node, resolver, table)
            assert same_bits(alone.affine.scale, together.affine.scale) and same_bits(alone.affine.shift, together.affine.shift)
            assert alone.affine.notes == together.affine.notes


def test_a_batchnorm_whose_parameters_changed_is_done_again() -> None:
    from bnfold.onnx.chain import batchnorm_affines, batchnorm_step

    rng = np.random.default_rng(3)
    params = [rng.standard_normal(4).astype(np.float32) for _ in range(3)] + [rng.uniform(0.5, 1, 4).astype(np.float32)]
    graph = batchnorm_graph([(params, None)])
    resolver = constants.ConstantResolver(set(), False, {}, 17)
    (node,) = graph.nodes
    table = batchnorm_affines(graph.nodes, resolver)
    node.inputs[4].values = params[3] * 4  # a fold wrote it: the precomputed map is stale
    resolver.forget(node.inputs[4])
    want = A.batchnorm_affine(*params[:3], params[3] * 4, epsilon=float(np.float32(1e-5)))
    assert same_bits(batchnorm_step(node, resolver, table).affine.scale, want.scale)
    node.inputs[4] = gs.Constant("other", params[3])  # another tensor altogether
    assert same_bits(batchnorm_step(node, resolver, table).affine.scale, A.batchnorm_affine(*params, epsilon=float(np.float32(1e-5))).scale)


def test_only_plain_batchnorms_are_done_at_once() -> None:
    from bnfold.onnx.chain import batchnorm_affines

    rng = np.random.default_rng(4)
    plain = [rng.standard_normal(3).astype(np.float32) for _ in range(3)] + [np.ones(3, np.float32)]
    graph = batchnorm_graph([(plain, None)] * 4)
    a, b, c, d = graph.nodes
    b.attrs["training_mode"] = 1  # refused before its parameters are read
    c.inputs[2] = gs.Variable("beta_at_run_time", np.float32, [3])  # not a constant
    table = batchnorm_affines(graph.nodes, constants.ConstantResolver({"bn3.m"}, True, {}, 17))  # d: an overridable input
    assert set(table) == {id(a)}


def test_batchnorms_done_at_once_keep_every_note() -> None:
    """One BatchNorm per kind of note (σ² = 0 with a modest scale, a huge scale, NaN μ, γ = 0, σ²+ε < 0, inf β)
    between clean ones: each gets its notes, the clean ones none."""
    from bnfold.onnx.chain import batchnorm_affines, batchnorm_step

    clean = [np.array([1.0, -0.5], np.float32), np.array([0.1, 0.2], np.float32), np.array([0.0, 1.0], np.float32), np.array([1.0, 2.0], np.float32)]

    def odd(k: int, value: float) -> list[np.ndarray]:
        params = [p.copy() for p in clean]
        params[k][1] = value
        return params

    cases = [clean, odd(3, 0.0), clean, odd(0, 1e6), odd(2, np.nan), odd(0, 0.0), odd(3, -1.0), odd(1, np.inf), clean]
    graph = batchnorm_graph([(p, 1e-3) for p in cases])
    resolver = constants.ConstantResolver(set(), False, {}, 17)
    with np.errstate(all="ignore"):
        table = batchnorm_affines(graph.nodes, resolver)
        notes = []
        for node in graph.nodes:
            alone, together = batchnorm_step(node, resolver), batchnorm_step(node, resolver, table)
            assert same_bits(alone.affine.scale, together.affine.scale) and same_bits(alone.affine.shift, together.affine.shift)
            assert alone.affine.notes == together.affine.notes
            notes.append(len(together.affine.notes))
    assert notes == [0, 1, 0, 1, 1, 1, 1, 1, 0]


def test_remove_dead_knows_the_nodes_appended_since_it_last_looked() -> None:
    """`GraphEdit` keeps the ids of its graph's nodes across folds; one appended since (a bias Add) is still
    this graph's, so a later fold that leaves it unused removes it."""
    from bnfold.onnx.fold import GraphEdit

    x, out = gs.Variable("x", np.float32, [2]), gs.Variable("out", np.float32, [2])
    keep = gs.Node("Relu", "keep", inputs=[x], outputs=[out])

    def pair(i: int) -> tuple[gs.Node, gs.Node]:
        t, u = gs.Variable(f"t{i}", np.float32, [2]), gs.Variable(f"u{i}", np.float32, [2])
        source = gs.Node("Identity", f"source{i}", inputs=[gs.Constant(f"c{i}", np.ones(2, np.float32))], outputs=[t])
        return source, gs.Node("Neg", f"user{i}", inputs=[t], outputs=[u])

    first, second = pair(1), pair(2)
    graph = gs.Graph(nodes=[keep, *first], inputs=[x], outputs=[out])
    edit = GraphEdit(graph, set())
    edit.remove_dead([first[1]])  # reaches source1 through t1: the ids of graph.nodes are taken here
    graph.nodes.extend(second)  # as add_bias_after appends
    edit.remove_dead([second[1]])
    edit.prune()
    assert [n.name for n in graph.nodes] == ["keep"]
