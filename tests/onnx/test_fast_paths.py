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
