"""A check may skip computing a folded conv weight, but only where that cannot change what it reports."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold import affine as A
from bnfold.affine import BFLOAT16, Affine, FoldOverflowError


def _real(w: np.ndarray, a: Affine, dtype: np.dtype) -> tuple[bool, int]:
    """(refused, flushed) of the real computation."""
    try:
        _, _, flushed = A.fold_into_conv_rounded(w, None, a, dtype, dtype, "w")
    except FoldOverflowError:
        return True, 0
    return False, flushed


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, BFLOAT16])
def test_the_dry_run_reports_what_the_fold_computes(dtype) -> None:
    rng = np.random.default_rng(0)
    dtype = np.dtype(dtype)
    finfo = A.finfo(dtype)
    cases = 0
    for trial in range(300):
        w = rng.standard_normal((6, 3, 2, 2)) * 10.0 ** rng.uniform(-3, 3)
        kind = trial % 6
        if kind == 1:
            w.flat[rng.integers(w.size)] = float(finfo.max) * rng.uniform(0.3, 1.0)  # near the top
        elif kind == 2:
            w.flat[rng.integers(w.size)] = float(finfo.tiny) * rng.uniform(1.0, 8.0)  # near the bottom
        elif kind == 3:
            w.flat[: rng.integers(1, w.size)] = 0.0
        w = w.astype(dtype)
        scale = rng.uniform(0.2, 4.0, 6) * rng.choice([-1.0, 1.0], 6)
        if kind == 4:
            scale[rng.integers(6)] = 0.0
        a = Affine(scale, rng.standard_normal(6))
        with np.errstate(over="ignore"):  # a float64 weight near its max overflows in the product itself
            refused, flushed = _real(w, a, dtype)
        try:
            with np.errstate(over="ignore"):
                nw, _, dry_flushed = A.fold_into_conv_rounded(w, None, a, dtype, dtype, "w", dry_run=True)
            dry_refused = False
        except FoldOverflowError:
            dry_refused, dry_flushed, nw = True, 0, None
        assert (dry_refused, dry_flushed) == (refused, flushed)
        if isinstance(nw, A.StandIn):
            cases += 1
            assert nw.shape == w.shape and nw.dtype == dtype and set(nw.strides) == {0}  # one element held
    assert cases > 0  # the shortcut is taken where it can be


def test_non_finite_weights_are_computed() -> None:
    w = np.array([np.inf, 1.0, np.nan], np.float32)
    assert not A.scaling_rounds_cleanly(w, np.ones(3), np.float32)
    assert not A.scaling_rounds_cleanly(np.ones(3, np.float32), np.array([np.inf, 1.0, 1.0]), np.float32)
    assert A.scaling_rounds_cleanly(np.ones(3, np.float32), np.array([0.0, 1.0, 2.0]), np.float32)


def test_a_later_fold_reads_the_real_value_not_the_stand_in() -> None:
    """RepVGG in float16: each branch BN folds into its conv (a check leaves those weights uncomputed),
    then the merge sums the branches' folded weights, which overflows float16. The check must read the
    real folded weights and refuse the merge as the fold does, not sum the stand-ins' zeros."""
    import onnx
    from onnx import numpy_helper

    from bnfold import check_onnx, fold_onnx
    from tests.onnx.helpers import F16
    from tests.onnx.test_reparam import single

    m = single(np.random.default_rng(0), c=4, dtype=F16)
    for t in m.graph.initializer:
        kind = t.name.split(".")[-1]
        if kind in ("w0", "w1"):  # diagonal kernels of 40000: each fits float16, their sum does not
            a = np.zeros(tuple(t.dims), np.float16)
            at = 1 if kind == "w0" else 0
            for i in range(4):
                a[i, i, at, at] = 40000
        elif (".bn0." in t.name or ".bn1." in t.name) and kind in ("scale", "bias", "mean", "var"):  # ≈ identity maps
            a = np.full(tuple(t.dims), 1.0 if kind in ("scale", "var") else 0.0, np.float16)
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.checker.check_model(m)

    def outcome(report):
        return [(c.target, c.rule, [r.code.value for r in c.reasons]) for c in report.candidates]

    checked, (_, folded) = check_onnx(m), fold_onnx(m)
    assert outcome(checked) == outcome(folded)
    assert [r.code.value for c in folded.candidates for r in c.reasons] == ["overflow"]
    assert folded.folded == checked.foldable == 2
