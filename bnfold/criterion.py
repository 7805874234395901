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

``NOISE_FACTOR = 4``, measured (``benchmarks/verify_noise.py``: 8 deep networks with trained-like
statistics, seeds 0-3, 3 input kinds each): a correct float32 fold's error is 0.2-0.5× the noise
measured as the larger of onnxruntime's own optimised graph and ±1 ulp on every arithmetic parameter,
at most 1.06× on normal and uniform inputs and 2.3× on large-magnitude ones, where both are a few
ulps of the output (6e-7); it never came above 0.58 of what it was allowed. 4 keeps that margin for
networks we have not seen, and stays well below 10, so that a change whose effect is ≥ 10× the noise
fails: a ×1.001 error in one output channel of one conv weight is caught wherever it shows that much.

The floors only matter where the noise is near zero (one or two layers, a few parameters): there a
correct fold measured up to 16× its noise, but never more than 5e-7 (float32), 8.4e-4 (float16) and
4.8e-16 (float64) of the output's scale over the zoo. Each floor is about twice that, i.e. 8-16 unit
roundoffs of the format: a fold wrong by 1e-5 of scale in float32 still fails on a shallow model, which
the former fixed ``rtol`` (1e-5 float32, 1e-2 float16, 5e-2 bfloat16) let through.

This module is numpy-free arithmetic on numbers both front-ends measure; the ONNX side (`bnfold.verify`)
and the PyTorch side (`bnfold.torch`) judge with the same `judge`.
"""

from __future__ import annotations

from dataclasses import dataclass

NOISE_FACTOR = 4.0

# Relative to the output's scale: below this an output always passes (8-16 unit roundoffs; see above).
FLOOR: dict[str, float] = {"float64": 2e-15, "float32": 1e-6, "float16": 4e-3, "bfloat16": 3e-2}


@dataclass(frozen=True)
class Judgement:
    """One output's verdict, with the numbers it came from (all relative to `scale`)."""

    fold_error: float
    noise: float
    scale: float
    allowed: float
    factor: float
    source: str = ""  # what the noise was measured as ("±1 ulp on the parameters", "a float64 copy", ...)

    @property
    def passed(self) -> bool:
        return self.fold_error <= self.allowed

    def words(self) -> str:
        """'fold error 2.1e-05 of scale, onnxruntime's own optimisation 2.4e-05, allowed 4× = 9.6e-05:
        equivalent' — or '..., floor 1e-06: equivalent' where the noise is too small to decide."""
        verdict = "equivalent" if self.passed else "DIFFERENT"
        noise = f"{self.source} {self.noise:.2g}" if self.source and self.noise > 0 else f"float noise {self.noise:.2g}"
        bound = f"floor {self.allowed:.2g}" if self.allowed > self.factor * self.noise else f"allowed {self.factor:g}× = {self.allowed:.2g}"
        return f"fold error {self.fold_error:.2g} of scale, {noise}, {bound}: {verdict}"


def judge(
    fold_error: float,
    noise: float,
    dtype: str,
    *,
    scale: float = 1.0,
    factor: float = NOISE_FACTOR,
    floor: float | None = None,
    source: str = "",
) -> Judgement:
    """Judge one output. ``fold_error`` and ``noise`` are relative to ``scale`` already.

    ``floor`` overrides the dtype's floor (a user's ``--rtol``); an unknown dtype gets no floor, so
    only the measured noise can excuse a difference. ``source`` names what the noise was measured as.
    """
    base = FLOOR.get(dtype, 0.0) if floor is None else floor
    allowed = max(factor * noise, base)
    return Judgement(fold_error=fold_error, noise=noise, scale=scale, allowed=allowed, factor=factor, source=source)
