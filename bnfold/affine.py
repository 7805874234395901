"""The folding math, in one place: numpy only, float64 inside, rounded once to the layer's dtype.

A BatchNorm at inference (and any chain of per-channel Mul/Add/Sub/Div) is a per-channel affine map
``y = s·x + t`` on axis 1. Folding it into a linear layer is exact in real arithmetic:

* into the producer (layer → affine), per *output* channel::

      W' = s ⊙_out W,     b' = s·b + t

* into the consumer (affine → layer), per *input* channel, only where the layer adds no padding::

      W' = W ⊙_in s,      b' = b + Σ_{in,k} W[out, in, k] · t[in]

Every function here takes the stored values, computes in float64 and returns float64; the caller
rounds once with :func:`round_to_dtype`, which refuses fp16/bf16 overflow instead of writing ``inf``.
No onnx or torch import: both front-ends share this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

try:  # ml_dtypes ships with onnx; it is what gives numpy a bfloat16
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - onnx always brings it
    ml_dtypes = None
    BFLOAT16 = None

F64 = np.float64
FRAGILE_SCALE = 1e3
"""A channel whose |s| exceeds this amplifies its input's noise a thousandfold: the model was fragile there."""


class FoldOverflowError(ValueError):
    """A folded value does not fit the layer's dtype (e.g. beyond 65504 in float16)."""


@dataclass
class Affine:
    """A per-channel affine map ``y = scale·x + shift`` on axis 1, in float64."""

    scale: np.ndarray
    shift: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    def then(self, other: "Affine") -> "Affine":
        """The map ``other ∘ self``: apply self first, then other."""
        return Affine(other.scale * self.scale, other.scale * self.shift + other.shift, self.notes + other.notes)


def as_f64(values: np.ndarray) -> np.ndarray:
    """The stored values as a new float64 array (bfloat16 and float16 widen exactly)."""
    return np.array(values, dtype=F64)


def batchnorm_affine(gamma, beta, mean, var, epsilon: float) -> Affine:
    """``s = γ/√(σ²+ε)``, ``t = β − s·μ`` from the stored BatchNorm parameters.

    Also notes the channels a user should know about: a tiny ``σ²+ε`` (huge scale: the original model
    already amplifies noise there) and ``γ = 0`` (a dead channel: its output is the constant β).
    """
    gamma, beta, mean, var = as_f64(gamma).reshape(-1), as_f64(beta).reshape(-1), as_f64(mean).reshape(-1), as_f64(var).reshape(-1)
    with np.errstate(invalid="ignore", divide="ignore"):  # broken channels are reported below, not warned about
        denom = np.sqrt(var + F64(epsilon))
        scale = gamma / denom
    shift = beta - scale * mean
    notes: list[str] = []
    if scale.size and _unremarkable(var, scale, shift):
        return Affine(scale, shift, notes)
    # σ² = 0: the running variance collapsed and ε alone sets the scale.
    fragile = np.flatnonzero((np.abs(scale) > FRAGILE_SCALE) | (var == 0))
    if fragile.size:
        notes.append(
            f"{fragile.size} fragile channel(s) (var = 0 or |scale| > {FRAGILE_SCALE:g}; var+eps as small as "
            f"{float(np.min((var + epsilon)[fragile])):.3g}, |scale| up to {float(np.max(np.abs(scale[fragile]))):.3g}); "
            f"the original model already amplifies noise there: channels {_channel_list(fragile)}"
        )
    # A NaN statistic or σ² + ε < 0 makes the original BatchNorm output NaN in that channel; the fold
    # keeps it so (exact), but a model that computes NaN is broken and the user should hear where.
    broken = np.flatnonzero(~np.isfinite(gamma) | ~np.isfinite(beta) | ~np.isfinite(mean) | ~(var + F64(epsilon) > 0))
    if broken.size:
        notes.append(
            f"{broken.size} channel(s) with NaN/infinite statistics or negative variance (var+eps <= 0) output "
            f"NaN in the original model too: channels {_channel_list(broken)}"
        )
    dead = np.flatnonzero(gamma == 0)
    if dead.size:
        notes.append(f"{dead.size} dead channel(s) with gamma = 0 (constant output): channels {_channel_list(dead)}")
    return Affine(scale, shift, notes)


def _unremarkable(var: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> bool:
    """True when `batchnorm_affine` has nothing to note: four reductions instead of its ~20 array operations.

    Sufficient, never necessary (False just means the full checks run); non-empty arrays only.
    ``max|s| ≤ FRAGILE_SCALE`` (NaN fails it) and ``min σ² > 0`` leave no fragile channel. A finite ``s``
    also means ``σ²+ε > 0`` (``√`` of 0 or less gives ``s = ±inf`` or NaN) and a finite ``γ = s·√(σ²+ε)``
    (an infinite γ gives ``s = ±inf``, or NaN over ``σ² = inf``); a finite sum of ``t = β − s·μ`` (a NaN or
    infinite element makes it NaN or infinite; finite ones that overflow it only make this False) means
    finite β and μ: no broken channel. ``min|s| > 0`` leaves no ``γ = 0``: no dead channel.
    """
    magnitude = np.abs(scale)
    return bool(
        np.maximum.reduce(magnitude) <= FRAGILE_SCALE
        and np.minimum.reduce(magnitude) > 0
        and np.minimum.reduce(var) > 0
        and math.isfinite(float(np.add.reduce(shift)))
    )


def _channel_list(idx: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f", … (+{idx.size - limit})" if idx.size > limit else "")


# ---------------------------------------------------------------------------------------------
# Fold into the producer (layer → affine): scale the output channels.
# ---------------------------------------------------------------------------------------------
def _along(axis: int, ndim: int, v: np.ndarray) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def fold_into_conv(weight, bias, a: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight ``[C_out, C_in/g, k…]``: the output channel is axis 0, whatever the groups."""
    w = as_f64(weight)  # a fresh float64 copy: scaled in place, no third array of the weight's size
    w *= _along(0, w.ndim, a.scale)
    b = np.zeros(w.shape[0], F64) if bias is None else as_f64(bias).reshape(-1)
    return w, a.scale * b + a.shift


BLOCK_ELEMENTS = 1 << 17
"""Elements per block in the blocked folds: float64 temporaries of 1 MiB, about a core's L2 cache."""


class StandIn(np.ndarray):
    """A folded value a dry run did not compute: right shape and dtype, one zero shared by every element.

    Made by `stand_in`; holders of folded values (`bnfold.onnx.fold`) keep it as it is instead of
    copying it into a contiguous array, so a check holds no folded weight. A later fold of the same
    plan may read that value again (a RepVGG merge reads the branch convs' folded weights): it must then
    read the real one, computed on demand by `real` — its zeros would hide an overflow the fold meets.
    """

    compute: Callable[[], np.ndarray] | None = None

    def real(self) -> np.ndarray:
        """The value this stands in for, computed now (what the fold itself computed at once)."""
        if self.compute is None:
            raise AssertionError("a stand-in without the computation it stands for")
        value = self.compute()
        assert value.shape == self.shape and value.dtype == self.dtype
        return value


def stand_in(shape: tuple[int, ...], dtype: np.dtype, compute: Callable[[], np.ndarray] | None = None) -> StandIn:
    """A read-only array of `shape` and `dtype` that costs one element of memory (every stride 0);
    ``compute``: how to get the real value, should anything read it (`StandIn.real`)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    # what `np.broadcast_to(np.zeros((), dtype), shape)` makes (read-only, every stride 0), built directly
    out = StandIn(shape, dtype, buffer=bytes(dtype.itemsize), strides=(0,) * len(shape))
    out.compute = compute
    return out


def scaling_rounds_cleanly(values: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> bool:
    """True when every ``s_i · v_j`` provably rounds to `dtype` without overflow and without a flush.

    Rounding (float64 products included) is monotonic in the magnitude, so the extreme products bound
    every one: if ``max|s|·max|v|`` stays finite and ``min|s|·min|v|`` over non-zero factors stays
    normal, no element can overflow or turn subnormal, and `round_to_dtype` would neither refuse nor
    flush. Costs two passes over `values` in cache-sized blocks, no copy of it. False (so the caller
    computes the real values) whenever the bound is inconclusive: non-finite values, or extremes that
    come close.
    """
    v = np.asarray(values)
    dt = np.dtype(dtype)
    try:
        tiny = float(_finfo_cached(dt).tiny)
    except ValueError:  # not a float type: nothing to prove
        return False
    s = np.abs(np.asarray(scale, F64))
    s_hi = float(np.maximum.reduce(s, axis=None)) if s.size else math.nan
    if v.size == 0 or not math.isfinite(s_hi) or s_hi == 0:  # NaN/inf scale, or all zero: compute
        return False
    s_lo = float(np.minimum.reduce(s, axis=None))  # no NaN here (s_hi is finite); the smallest non-zero |s| matters
    if not s_lo > 0:
        s_lo = float(np.min(s, where=s > 0, initial=np.inf))
    # Python floats from here: IEEE double arithmetic like numpy's float64, without per-call numpy overhead
    flat = v.reshape(-1)
    # a small weight (most of a MobileNet's) in one piece; a large one through one cache-sized buffer, not a copy
    buf = np.empty(flat.size, v.dtype) if flat.size <= BLOCK_ELEMENTS else np.empty(BLOCK_ELEMENTS, v.dtype)
    hi, lo = 0.0, math.inf
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        mag = np.abs(flat[start : start + BLOCK_ELEMENTS], out=buf[: min(BLOCK_ELEMENTS, flat.size - start)])
        top, bottom = float(np.maximum.reduce(mag)), float(np.minimum.reduce(mag))
        if not math.isfinite(top):  # inf or NaN somewhere: let the real computation say what happens
            return False
        if bottom == 0:  # zeros fold to zeros: the smallest non-zero magnitude is what matters
            bottom = float(np.min(mag, where=mag > 0, initial=np.inf))
        hi, lo = max(hi, top), min(lo, bottom)
    top_product, bottom_product = s_hi * hi, (s_lo * lo if math.isfinite(lo) else 1.0)
    if not math.isfinite(top_product) or bottom_product <= 0:  # the float64 product itself over/underflowed
        return False
    # the largest product must stay finite, the smallest normal (one that rounds to 0 or a subnormal is inconclusive)
    if dt in _NATIVE_FLOATS:  # where rounding to float16/32/64 crosses those lines, found once (`_rounding_limits`)
        if dt not in _ROUNDING_LIMITS:
            _ROUNDING_LIMITS[dt] = _rounding_limits(dt)
        limits = _ROUNDING_LIMITS[dt]
        if limits is not None:
            return top_product < limits[0] and bottom_product >= limits[1]
    extremes = np.array([top_product, bottom_product], F64)
    with np.errstate(over="ignore"):  # the rounding `round_to_dtype` does, without its checks: they are the question
        rounded = (_round_to_bfloat16(extremes) if BFLOAT16 is not None and dt == BFLOAT16 else extremes.astype(dt)).astype(F64)
    return bool(math.isfinite(rounded[0]) and abs(rounded[1]) >= tiny)


def _rounding_limits(dtype: np.dtype) -> tuple[float, float] | None:
    """``(overflows_from, normal_from)``: the smallest positive float64 values whose rounding to `dtype`
    (``astype``, as `round_to_dtype` does) is infinite, and is at least the smallest normal.

    Rounding is monotonic, so ``round(x)`` is finite iff ``x < overflows_from`` and normal (or more) iff
    ``x ≥ normal_from``: `scaling_rounds_cleanly` compares two floats instead of rounding an array.
    Round-to-nearest-even puts them halfway: past the largest finite value by half its spacing (the tie
    goes to infinity, the largest value's last bit being odd), and below the smallest normal by half the
    smallest subnormal (the tie goes to the normal). Each is checked with numpy's own cast, together with
    the float64 just below it; None (round the array) should that ever disagree.
    """
    info = _finfo_cached(dtype)
    if dtype == np.dtype(F64):  # rounding is the identity
        return math.inf, float(info.tiny)
    top = info.max  # its spacing, that of its binade: from the value below it (np.spacing would overflow)
    over = float(top) + (float(top) - float(np.nextafter(top, top.dtype.type(0)))) / 2
    normal = float(info.tiny) - float(info.smallest_subnormal) / 2
    probe = np.array([over, np.nextafter(over, 0.0), normal, np.nextafter(normal, 0.0)], F64)
    with np.errstate(over="ignore"):
        r = probe.astype(dtype).astype(F64)
    if math.isinf(r[0]) and math.isfinite(r[1]) and r[2] >= info.tiny and r[3] < info.tiny:
        return over, normal
    return None


_ROUNDING_LIMITS: dict[np.dtype, tuple[float, float] | None] = {}
_NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def fold_into_conv_rounded(
    weight, bias, a: Affine, weight_dtype: np.dtype, bias_dtype: np.dtype, what: str, *, dry_run: bool = False
) -> tuple[np.ndarray, np.ndarray, int]:
    """`fold_into_conv` then `round_to_dtype`, a block of output channels at a time.

    Each element is still its float64 product rounded once, so the result equals the two steps in
    sequence; working in cache-sized blocks avoids a float64 copy of the whole weight, which on a
    ResNet-50 is most of the fold's time.

    ``dry_run``: the caller needs the decision (overflow refused, subnormals flushed), not the weight.
    Where `scaling_rounds_cleanly` proves the weight neither overflows nor flushes, a `stand_in` takes
    its place; the (small) bias is always computed. The refusal and the flush count are what the real
    computation gives, so a check reports exactly what the fold does.
    """
    w = np.asarray(weight)
    b = np.zeros(w.shape[0], F64) if bias is None else as_f64(bias).reshape(-1)
    if dry_run and scaling_rounds_cleanly(w, a.scale, weight_dtype):
        new_bias, n = round_to_dtype(a.scale * b + a.shift, bias_dtype, f"bias of {what}")
        compute = lambda: fold_into_conv_rounded(weight, bias, a, weight_dtype, bias_dtype, what)[0]  # noqa: E731
        return stand_in(w.shape, weight_dtype, compute), new_bias, n
    out = np.empty(w.shape, dtype=np.dtype(weight_dtype))
    per = max(1, BLOCK_ELEMENTS // max(1, int(np.prod(w.shape[1:]))))
    flushed = 0
    for start in range(0, w.shape[0], per):
        block = np.array(w[start : start + per], dtype=F64)
        block *= _along(0, block.ndim, a.scale[start : start + per])
        out[start : start + per], n = round_to_dtype(block, weight_dtype, f"weight of {what}")
        flushed += n
    new_bias, n = round_to_dtype(a.scale * b + a.shift, bias_dtype, f"bias of {what}")
    return out, new_bias, flushed + n


def fold_into_conv_transpose(weight, bias, a: Affine, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose weight ``[C_in, C_out/g, k…]``: output channel ``j·(C_out/g)+k`` of group j.

    Reshape to ``[g, C_in/g, C_out/g, k…]`` and scale axis 2 by ``s`` viewed as ``[g, C_out/g]``.
    """
    w = as_f64(weight)
    c_in, c_out_g = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
    s = a.scale.reshape(groups, 1, c_out_g, *([1] * (w.ndim - 2)))
    c_out = groups * c_out_g
    b = np.zeros(c_out, F64) if bias is None else as_f64(bias).reshape(-1)
    return (grouped * s).reshape(w.shape), a.scale * b + a.shift


def fold_into_gemm(b_matrix, c, a: Affine, *, trans_b: bool, beta: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Gemm ``Y = α·A'·B' + β·C``: scale B's output columns; the bias lives in C *times β*.

    Returns ``(B', C', β')``: ``C' = s·C + t/β``, or ``C' = t`` with ``β' = 1`` where C is absent or β = 0.
    C may be scalar, ``[N]``, ``[1, N]``, ``[M, 1]`` or ``[M, N]``: numpy broadcasting of C against s is
    the Gemm's own broadcasting against ``[M, N]``.
    """
    bm = as_f64(b_matrix)
    folded_b = bm * (a.scale[:, None] if trans_b else a.scale[None, :])
    if c is None or beta == 0.0:
        return folded_b, a.shift.copy(), 1.0
    return folded_b, a.scale * as_f64(c) + a.shift / F64(beta), beta


def fold_into_matmul(b_matrix, bias, a: Affine) -> tuple[np.ndarray, np.ndarray]:
    """MatMul ``A[M,K] · B[K,N]`` (+ bias): scale B's columns; the bias becomes ``s·b + t``."""
    bm = as_f64(b_matrix)
    b = np.zeros(bm.shape[1], F64) if bias is None else as_f64(bias)
    return bm * a.scale[None, :], a.scale * b + a.shift


# ---------------------------------------------------------------------------------------------
# Fold into the consumer (affine → layer): scale the input channels, push the shift into the bias.
# ---------------------------------------------------------------------------------------------
def fold_into_conv_input(weight, bias, a: Affine, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Conv ``[C_out, C_in/g, k…]`` fed by an affine map on its input channels (no padding!).

    Input channel ``c`` of group ``j`` is column ``c − j·C_in/g``; output ``o`` belongs to group
    ``o // (C_out/g)``. With zero padding the border sees raw zeros, not ``t``: the caller refuses that.
    """
    w = as_f64(weight)
    c_out, c_in_g = w.shape[0], w.shape[1]
    s = a.scale.reshape(groups, c_in_g)
    t = a.shift.reshape(groups, c_in_g)
    group_of = np.arange(c_out) // (c_out // groups)
    s_per_out = s[group_of]  # [C_out, C_in/g]
    t_per_out = t[group_of]
    extra = (w * t_per_out.reshape(c_out, c_in_g, *([1] * (w.ndim - 2)))).reshape(c_out, -1).sum(axis=1)
    b = np.zeros(c_out, F64) if bias is None else as_f64(bias).reshape(-1)
    return w * s_per_out.reshape(c_out, c_in_g, *([1] * (w.ndim - 2))), b + extra


def fold_into_gemm_input(
    b_matrix, c, a: Affine, *, trans_b: bool, alpha: float, beta: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Gemm with ``transA = 0`` fed by an affine map on A's columns (the K axis).

    ``A·B' = (X·diag(s) + 1·tᵀ)·B' = X·(diag(s)·B') + 1·(tᵀ·B')``, so ``B'' = diag(s)·B'`` and the bias
    gains ``α·(tᵀ·B')/β``. Returns ``(B'', C', β')``.
    """
    bm = as_f64(b_matrix)
    bt = bm.T if trans_b else bm  # [K, N]
    new_bt = bt * a.scale[:, None]
    extra = F64(alpha) * (a.shift @ bt)  # [N]
    folded_b = new_bt.T if trans_b else new_bt
    if c is None or beta == 0.0:
        return folded_b, extra, 1.0
    return folded_b, as_f64(c) + extra / F64(beta), beta


def fold_into_matmul_input(b_matrix, bias, a: Affine) -> tuple[np.ndarray, np.ndarray]:
    """MatMul ``X[M,K] · B[K,N]`` fed by an affine map on X's columns: ``B' = diag(s)·B``, bias ``+= tᵀ·B``."""
    bm = as_f64(b_matrix)
    extra = a.shift @ bm
    b = extra if bias is None else as_f64(bias) + extra
    return bm * a.scale[:, None], b


def repeat_channels(a: Affine, repeat: int) -> Affine:
    """The map on ``[N, C·r]`` features when each of C channels is flattened with ``r`` positions after it.

    ``[N, C, H, W] → flatten(1) → [N, C·H·W]``: feature ``c·H·W + p`` belongs to channel ``c``, so each
    channel's ``(s, t)`` repeats ``H·W`` times in a row.
    """
    return Affine(np.repeat(a.scale, repeat), np.repeat(a.shift, repeat), list(a.notes))


def channel_slice(a: Affine, start: int, stop: int) -> Affine:
    """Channels ``start:stop`` of the map: the part of a BatchNorm after a concat that one input produced."""
    return Affine(a.scale[start:stop].copy(), a.shift[start:stop].copy(), list(a.notes))


def fold_into_linear_input(weight, bias, a: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Linear ``y = x·Wᵀ + b`` (W ``[out, in]``) fed by an affine map on its input features.

    ``W' = W·diag(s)``, ``b' = b + W·t``: a Linear adds no padding, so this is always exact.
    """
    w = as_f64(weight)
    extra = w @ a.shift
    b = extra if bias is None else as_f64(bias).reshape(-1) + extra
    return w * a.scale[None, :], b


# ---------------------------------------------------------------------------------------------
# Rounding back, once.
# ---------------------------------------------------------------------------------------------
def finfo(dtype: np.dtype):
    """finfo that also knows bfloat16."""
    dtype = np.dtype(dtype)
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


_FINFO: dict[np.dtype, object] = {}


def _finfo_cached(dtype: np.dtype):
    """`finfo` of a float dtype, looked up once (it runs for every folded tensor); a ValueError for any other."""
    info = _FINFO.get(dtype)
    if info is None:
        info = _FINFO[dtype] = finfo(dtype)
    return info


def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float64 → bfloat16 rounded once to nearest, ties to even.

    ``astype(bfloat16)`` goes through float32 and can round twice (1 + 2⁻⁸ + 2⁻³⁰ → 1.0 instead of
    1 + 2⁻⁷); here the two bfloat16 neighbours of the float32 truncation are compared in float64.
    """
    x = np.asarray(x, F64)
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = x.astype(np.float32)
    bits = f32.view(np.uint32) & np.uint32(0xFFFF0000)
    with np.errstate(invalid="ignore", over="ignore"):
        best = bits
        best_err = np.abs(bits.view(np.float32).astype(F64) - x)
        for cb in (bits - np.uint32(0x10000), bits + np.uint32(0x10000)):
            val = cb.view(np.float32).astype(F64)
            err = np.abs(val - x)
            even = (cb & np.uint32(0x10000)) == 0
            better = np.isfinite(val) & ((err < best_err) | ((err == best_err) & even))
            best = np.where(better, cb, best)
            best_err = np.where(better, err, best_err)
    out = best.astype(np.uint32).view(np.float32)
    # inf/nan and values beyond the largest finite bfloat16 keep float32 semantics.
    special = ~np.isfinite(x) | (np.abs(x) >= float(ml_dtypes.finfo(BFLOAT16).max) * (1 + 2**-9))
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range is inf, as asked
        out = np.where(special, x.astype(np.float32), out)
    return out.astype(BFLOAT16)


def round_to_dtype(values: np.ndarray, dtype: np.dtype, what: str) -> tuple[np.ndarray, int]:
    """Round float64 ``values`` once to ``dtype``; flush results that land subnormal to zero.

    Returns ``(array, flushed)``. Raises :class:`FoldOverflowError` when a finite value would become
    infinite (``what`` names the tensor in the message). Subnormal results are flushed because many
    runtimes flush them anyway and they are slow where they do not; the count goes in the report.
    """
    dtype = np.dtype(dtype)
    v = np.asarray(values, F64)
    if BFLOAT16 is not None and dtype == BFLOAT16:
        out = _round_to_bfloat16(v)
    else:
        with np.errstate(over="ignore"):
            out = v.astype(dtype)
    if dtype.kind != "f" and np.issubdtype(dtype, np.integer):
        return out, 0
    magnitude = np.abs(out)
    if out.size and not math.isfinite(float(magnitude.max())):  # rare: find out whether a finite value overflowed
        overflow = np.isfinite(v) & ~np.isfinite(out.astype(F64))
        if overflow.any():
            worst = float(np.max(np.abs(v[overflow])))
            raise FoldOverflowError(
                f"folded {what} reaches {worst:.6g}, beyond the largest {dtype.name} ({float(finfo(dtype).max):.6g})"
            )
    tiny = out.dtype.type(_finfo_cached(dtype).tiny)
    if dtype.kind == "f" and (not out.size or not np.fmin.reduce(magnitude, axis=None) < tiny):
        return out, 0  # the common case, in one reduction (fmin skips NaN, which is never subnormal)
    with np.errstate(invalid="ignore"):  # NaN compares false: never counted as subnormal
        small = magnitude < tiny
        if not small.any():  # the common case: one pass, nothing to flush
            return out, 0
        sub = small & (magnitude > 0)
    flushed = int(np.count_nonzero(sub))
    if flushed:
        out = np.where(sub, np.zeros((), dtype), out).astype(dtype)
    return out, flushed


# ---------------------------------------------------------------------------------------------
# Structural re-parameterisation (RepVGG / MobileOne / RepConv): branches on one input merged.
# ---------------------------------------------------------------------------------------------
def embed_kernel(weight, kernel: tuple[int, ...]) -> np.ndarray:
    """Conv weight ``[C_out, C_in/g, k…]`` zero-padded, centred, to ``kernel`` (odd sizes), in float64.

    With stride 1, dilation d and pads ``d·(k−1)/2``, output position p of a centred odd kernel reads
    ``x[p + (j − (k−1)/2)·d]`` at tap j: the same offsets as taps ``j + (K−k)/2`` of a centred K-kernel
    with the same dilation. So a 1x1 becomes a 3x3 with its value at the centre ``[1, 1]``, not at the
    corner ``[0, 0]`` (that would read ``x[p − 1]``).
    """
    w = as_f64(weight)
    pad = [(0, 0), (0, 0)] + [((big - k) // 2, (big - k) // 2) for k, big in zip(w.shape[2:], kernel)]
    return np.pad(w, pad)


def identity_kernel(scale: np.ndarray, in_per_group: int, kernel: tuple[int, ...]) -> np.ndarray:
    """The conv weight of ``y = s·x`` (C_in = C_out = C): ``W[o, o mod (C/g), centre] = s[o]``, in float64.

    With g groups, output o belongs to group ``o // (C/g)``, whose inputs are channels
    ``[j·C/g, (j+1)·C/g)``; channel o is column ``o − j·C/g = o mod (C/g)`` of that slice. Dense (g = 1):
    the diagonal; depthwise (C/g = 1): column 0. The centre tap reads ``x[p]`` (see `embed_kernel`).
    """
    s = as_f64(scale).reshape(-1)
    w = np.zeros((s.shape[0], in_per_group, *kernel), F64)
    centre = tuple(k // 2 for k in kernel)
    o = np.arange(s.shape[0])
    w[(o, o % in_per_group, *centre)] = s
    return w


def merge_branches(weights: list, biases: list, kernel: tuple[int, ...], a: Affine | None) -> tuple[np.ndarray, np.ndarray]:
    """``Σ_i Conv_i(x) + (s·x + t)`` as one conv: ``W = Σ_i embed(W_i) + identity(s)``, ``b = Σ_i b_i + t``.

    Every conv reads the same x with stride 1, the same groups and dilation, and centred pads, so all
    produce the same output grid and the sum of convs is the conv of the summed (embedded) kernels. The
    identity branch ``a`` (None: no identity branch) is the kernel of `identity_kernel`. Float64 throughout;
    the caller rounds once.
    """
    c_out, in_per_group = np.asarray(weights[0]).shape[:2]
    w = np.zeros((c_out, in_per_group, *kernel), F64)
    b = np.zeros(c_out, F64)
    for weight, bias in zip(weights, biases):
        w += embed_kernel(weight, kernel)
        if bias is not None:
            b += as_f64(bias).reshape(-1)
    if a is not None:
        w += identity_kernel(a.scale, in_per_group, kernel)
        b += a.shift
    return w, b
