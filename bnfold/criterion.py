"""When is a difference in outputs float noise, and when is it a different function? One rule for all.

A correct fold still changes rounding: ``s·W`` is rounded once where the original rounded the conv
output and then the BatchNorm's, and the difference is carried through every later layer. How large
that difference gets depends on the network (depth, conditioning, tiny variances), not only on the
dtype: on 50-layer networks with trained-like statistics a correct float32 fold differs by 1e-5..3e-4
of the output's scale. No constant separates right from wrong there, so the tolerance is measured: the
*noise* is how far a legitimate re-rounding of the same model moves the same output on the same inputs
(onnxruntime's own optimised graph of the original, the original with ±1 ulp on its parameters, or the
float32 model against a float64 copy of itself). A fold passes when

    fold_error ≤ max(NOISE_FACTOR · noise, floor[dtype])          (both relative to the output's scale)

``NOISE_FACTOR`` leaves room for a second, independent re-rounding of the same size (the fold's own)
while failing any change whose effect is clearly above the noise (≥ 10×). The floor keeps tiny,
well-conditioned models, whose noise can be near zero, from failing on an ulp.

This module is numpy-free arithmetic on numbers both front-ends measure; the ONNX side (`bnfold.verify`)
and the PyTorch side (`bnfold.torch`) judge with the same `judge`.
"""

from __future__ import annotations

from dataclasses import dataclass

NOISE_FACTOR = 4.0

# Relative to the output's scale: below this an output always passes (unit roundoff times a few layers).
FLOOR: dict[str, float] = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class Judgement:
    """One output's verdict, with the numbers it came from (all relative to `scale`)."""

    fold_error: float
    noise: float
    scale: float
    allowed: float
    factor: float

    @property
    def passed(self) -> bool:
        return self.fold_error <= self.allowed

    def words(self) -> str:
        """'fold error 2.1e-05 of scale, model's own float noise 2.4e-05: equivalent'."""
        verdict = "equivalent" if self.passed else "DIFFERENT"
        times = f" ({self.fold_error / self.noise:.1f}× the noise)" if self.noise > 0 else ""
        return f"fold error {self.fold_error:.2g} of scale{times}, float noise {self.noise:.2g}, allowed {self.allowed:.2g}: {verdict}"


def judge(
    fold_error: float,
    noise: float,
    dtype: str,
    *,
    scale: float = 1.0,
    factor: float = NOISE_FACTOR,
    floor: float | None = None,
) -> Judgement:
    """Judge one output. ``fold_error`` and ``noise`` are relative to ``scale`` already.

    ``floor`` overrides the dtype's floor (a user's ``--rtol``); an unknown dtype gets no floor, so
    only the measured noise can excuse a difference.
    """
    base = FLOOR.get(dtype, 0.0) if floor is None else floor
    allowed = max(factor * noise, base)
    return Judgement(fold_error=fold_error, noise=noise, scale=scale, allowed=allowed, factor=factor)
