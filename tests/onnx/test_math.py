"""bnfold.affine against oracles that do not share its code.

* the BatchNorm map (s, t) against `onnx.reference`'s own test-mode BatchNormalization in float64;
* each fold as an identity of float64 linear algebra: the folded layer applied to x equals the BatchNorm
  applied to the original layer's output (numpy matmul / an explicit loop convolution);
* `round_to_dtype` against a bfloat16 rounding written from the definition (frexp + exact half-to-even),
  numpy's direct float64 → float16/float32 conversion, the fp16 overflow limit and subnormal flushing.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from onnx.reference.ops.op_batch_normalization import _batchnorm_test_mode

from bnfold import affine as A
from tests.onnx.helpers import BF16, F16, F32, F64, bn_stats, oracle_conv_transpose, round_bf16_oracle, round_once

RNG = np.random.default_rng(2024)


def _affine(c, eps=1e-5):
    st = bn_stats(c, RNG, F64)
    return st, A.batchnorm_affine(st["scale"], st["bias"], st["mean"], st["var"], eps)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0])
def test_batchnorm_affine_matches_onnx_reference(eps):
    st, a = _affine(6, eps)
    x = RNG.standard_normal((3, 6, 4)) * 10
    ref = _batchnorm_test_mode(x, st["scale"], st["bias"], st["mean"], st["var"], epsilon=eps)
    got = a.scale[None, :, None] * x + a.shift[None, :, None]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))


def test_batchnorm_affine_notes_fragile_and_dead_channels():
    a = A.batchnorm_affine(np.array([1.0, 0.0, 2.0]), np.zeros(3), np.zeros(3), np.array([1e-12, 1.0, 1.0]), 0.0)
    assert any("amplifies" in n for n in a.notes) and any("dead" in n for n in a.notes)


def _conv_nd(x, w, groups):
    """Valid, stride-1 N-d convolution (cross-correlation) by explicit loops over the kernel."""
    n, c_in = x.shape[:2]
    c_out, c_in_g = w.shape[:2]
    k = w.shape[2:]
    out_sp = tuple(s - kk + 1 for s, kk in zip(x.shape[2:], k))
    y = np.zeros((n, c_out, *out_sp))
    per_out = c_out // groups
    for o in range(c_out):
        g = o // per_out
        xs = x[:, g * c_in_g : (g + 1) * c_in_g]
        for idx in np.ndindex(*k):
            sl = tuple(slice(i, i + s) for i, s in zip(idx, out_sp))
            y[:, o] += np.einsum("nc...,c->n...", xs[(slice(None), slice(None), *sl)], w[(o, slice(None), *idx)])
    return y


def _bn(y, a):
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return y * a.scale.reshape(shape) + a.shift.reshape(shape)


@pytest.mark.parametrize("groups,c_in,c_out", [(1, 3, 4), (2, 4, 6), (4, 4, 8)])
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_conv_is_bn_of_conv(groups, c_in, c_out, dims, bias):
    _, a = _affine(c_out)
    w = RNG.standard_normal((c_out, c_in // groups, *([3] * dims)))
    b = RNG.standard_normal(c_out) if bias else None
    x = RNG.standard_normal((2, c_in, *([5] * dims)))
    shape = (1, -1) + (1,) * dims
    ref = _bn(_conv_nd(x, w, groups) + (0 if b is None else b.reshape(shape)), a)
    nw, nb = A.fold_into_conv(w, b, a)
    got = _conv_nd(x, nw, groups) + nb.reshape(shape)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))


def _conv_transpose_nd(x, w, groups):
    """Stride-1, unpadded ConvTranspose by scattering: out[o, i + k] += x[c, i]·w[c, o − g·C_out/g, k]."""
    n, c_in = x.shape[:2]
    c_out_g = w.shape[1]
    k = w.shape[2:]
    out_sp = tuple(s + kk - 1 for s, kk in zip(x.shape[2:], k))
    y = np.zeros((n, groups * c_out_g, *out_sp))
    c_in_g = c_in // groups
    for c in range(c_in):
        g = c // c_in_g
        for j in range(c_out_g):
            o = g * c_out_g + j
            for idx in np.ndindex(*k):
                sl = tuple(slice(i, i + s) for i, s in zip(idx, x.shape[2:]))
                y[(slice(None), o, *sl)] += x[:, c] * w[(c, j, *idx)]
    return y


@pytest.mark.parametrize("groups,c_in,c_out", [(1, 3, 4), (2, 4, 6), (2, 6, 4), (3, 3, 6), (4, 4, 4)])
def test_fold_into_conv_transpose_is_bn_of_conv_transpose(groups, c_in, c_out):
    _, a = _affine(c_out)
    w = RNG.standard_normal((c_in, c_out // groups, 3, 2))
    b = RNG.standard_normal(c_out)
    x = RNG.standard_normal((2, c_in, 4, 3))
    ref = _bn(_conv_transpose_nd(x, w, groups) + b.reshape(1, -1, 1, 1), a)
    nw, nb = A.fold_into_conv_transpose(w, b, a, groups)
    got = _conv_transpose_nd(x, nw, groups) + nb.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))
    ow, ob = oracle_conv_transpose(w, b, a.scale.tolist(), a.shift.tolist(), groups)
    np.testing.assert_array_equal(nw, ow)


@pytest.mark.parametrize("c_shape", [None, (4,), (1, 4), (3, 4), (), (3, 1)], ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.5), (-2.0, -0.3), (1.0, 0.0)])
def test_fold_into_gemm_is_bn_of_gemm(c_shape, trans_b, alpha, beta):
    _, a = _affine(4)
    am = RNG.standard_normal((3, 5))
    bm = RNG.standard_normal((4, 5) if trans_b else (5, 4))
    c = None if c_shape is None else RNG.standard_normal(c_shape)
    bb = bm.T if trans_b else bm

    def gemm(bmat, cc, be):
        y = alpha * am @ (bmat.T if trans_b else bmat)
        return y if cc is None else y + be * cc

    ref = _bn(gemm(bm, c, beta), a)
    nb, nc, nbeta = A.fold_into_gemm(bm, c, a, trans_b=trans_b, beta=beta)
    got = gemm(nb, nc, nbeta)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))
    assert nb.shape == bb.T.shape if trans_b else nb.shape == bm.shape


@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_matmul_is_bn_of_matmul(bias):
    _, a = _affine(4)
    x, w = RNG.standard_normal((3, 5)), RNG.standard_normal((5, 4))
    b = RNG.standard_normal(4) if bias else None
    ref = _bn(x @ w + (0 if b is None else b), a)
    nw, nb = A.fold_into_matmul(w, b, a)
    np.testing.assert_allclose(x @ nw + nb, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))


# ---------------------------------------------------------------------------------------------
# rounding once
# ---------------------------------------------------------------------------------------------
def test_round_bf16_matches_definition_on_random_values():
    x = np.concatenate(
        [RNG.standard_normal(2000) * 10.0 ** RNG.integers(-30, 30, 2000), RNG.uniform(-1, 1, 500), [0.0, -0.0, 1.0, -3.5]]
    )
    got, flushed = A.round_to_dtype(x, BF16, "t")
    want = round_once(x, BF16)
    assert flushed == 0
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize(
    "x,want",
    [
        (1 + 2**-8, 1.0),  # a tie: to even
        (1 + 3 * 2**-8, 1 + 2**-6),  # a tie: to even, upwards
        (1 + 2**-8 + 2**-30, 1 + 2**-7),  # just above the tie: through float32 it becomes a tie → 1.0 (double rounding)
        (-(1 + 2**-8 + 2**-30), -(1 + 2**-7)),
        (1 + 2**-8 - 2**-40, 1.0),
    ],
)
def test_round_bf16_once_not_twice(x, want):
    got, _ = A.round_to_dtype(np.array([x]), BF16, "t")
    assert float(got[0]) == want == round_bf16_oracle(x)


def test_bf16_double_rounding_trap_exists():
    """Documents why rounding once matters: float64 → float32 → bfloat16 gets the case above wrong."""
    x = 1 + 2**-8 + 2**-30
    assert float(np.float32(x).astype(BF16)) == 1.0 != round_bf16_oracle(x)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_round_float_matches_numpy_direct_conversion(dtype):
    x = RNG.standard_normal(3000) * 10.0 ** RNG.integers(-3, 4, 3000)
    got, flushed = A.round_to_dtype(x, dtype, "t")
    want = x.astype(dtype)
    sub = (want != 0) & (np.abs(want) < np.finfo(dtype).tiny)
    assert flushed == int(sub.sum())
    np.testing.assert_array_equal(got, np.where(sub, np.zeros((), dtype), want))
    assert got.dtype == dtype


def test_fp16_overflow_raises_at_the_right_limit():
    ok, _ = A.round_to_dtype(np.array([65504.0, 65519.99, -65519.0]), F16, "w")
    assert np.all(np.abs(ok.astype(F64)) == 65504)
    for bad in (65520.0, -7e4, 1e6):
        with pytest.raises(A.FoldOverflowError, match="65504"):
            A.round_to_dtype(np.array([1.0, bad]), F16, "w")


def test_bf16_overflow_raises():
    top = float(ml_dtypes.finfo(BF16).max)
    got, _ = A.round_to_dtype(np.array([top]), BF16, "w")
    assert float(got[0]) == top
    with pytest.raises(A.FoldOverflowError):
        A.round_to_dtype(np.array([top * 1.01]), BF16, "w")


@pytest.mark.parametrize("dtype,tiny", [(F16, 1e-6), (F32, 1e-40), (BF16, 1e-39)])
def test_subnormals_are_flushed_and_counted(dtype, tiny):
    got, flushed = A.round_to_dtype(np.array([tiny, -tiny, 1.0, 0.0]), dtype, "w")
    assert flushed == 2
    assert np.all(got.astype(F64)[:2] == 0) and float(got[2]) == 1.0
    assert got.dtype == np.dtype(dtype)


def test_non_finite_inputs_stay():
    got, _ = A.round_to_dtype(np.array([np.inf, -np.inf]), F16, "w")
    assert np.all(np.isinf(got.astype(F64)))
    got, _ = A.round_to_dtype(np.array([np.nan]), BF16, "w")
    assert math.isnan(float(got[0]))
