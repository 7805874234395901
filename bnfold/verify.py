"""Does the folded model compute what the original computes? Ask onnxruntime, honestly.

Both sessions run at `ORT_DISABLE_ALL` on the same provider with the same inputs (onnxruntime fuses
Conv+BN itself at its basic level: an optimised reference would compare the fold with itself). Inputs
come from the model's signature in several distributions over N trials, or from the user's `.npz`.

Per output: max absolute error, max error relative to the output's scale (max |reference|), the 99th
percentile of the absolute error, and the max distance in ulps. An output passes when
``max_abs ≤ atol + rtol · scale``. The defaults follow the dtype — a fold changes rounding, and the
error it may add grows with the format's epsilon and the depth of the network:

======== ======== =======
dtype    rtol     atol
======== ======== =======
float64  1e-10    0
float32  1e-5     0
float16  1e-2     0        (ε = 9.8e-4; a few roundings per layer accumulate to ~1e-3..1e-2)
bfloat16 5e-2     0        (ε = 7.8e-3)
other    exact
======== ======== =======

Why float16 gets 1e-2: its unit roundoff is 2^-11 ≈ 4.9e-4. The original rounds each Conv output and
again each BatchNorm output to float16; the fold rounds ``W' = s·W`` once — different roundings, each
worth ~1 ulp per layer, carried through every later layer. Measured on float16 chains of 3x3 Conv(32) →
BN → Relu with tame statistics (seeded normal/uniform/large inputs, 6 trials), a *correct* fold's max
error over the output's scale was 5.6e-4 at 1 layer, 1.0e-3 at 8, 1.7e-3 at 16 and 5.1e-3 at 32 layers:
1e-2 passes those with room, yet fails a weight off by a few percent. The flip side: a 1e-3 relative
error in one float16 weight is below what float16 can tell from rounding noise; such a fold is caught
in float32 (1e-5 of scale), not in float16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bnfold import files
from bnfold.feeds import DISTRIBUTIONS, input_specs, load_npz, random_feeds
from bnfold.providers import choose
from bnfold.sessions import make_session, model_source

DEFAULT_RTOL: dict[str, float] = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class OutputComparison:
    """One output's worst case over all trials on one provider."""

    name: str
    dtype: str
    shape: list[int]
    max_abs: float = 0.0
    max_rel_to_scale: float = 0.0
    p99_abs: float = 0.0
    max_ulp: int | None = None
    scale: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    passed: bool = True
    worst_trial: str = ""
    finite: int = 0  # reference values that were finite and so could be compared
    total: int = 0
    mismatches: int = 0  # elements beyond atol + rtol·scale (integer outputs: elements that differ), all trials

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyResult:
    """Every output of every provider; `passed` only if all of them are."""

    original: str
    folded: str
    providers: list[str]
    trials: int
    seed: int
    inputs: str  # "random (normal, uniform, large)" or the .npz path
    outputs: dict[str, list[OutputComparison]] = field(default_factory=dict)  # per provider
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for outs in self.outputs.values() for o in outs)

    @property
    def return_code(self) -> int:
        from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK

        return EXIT_OK if self.passed else EXIT_CHECK_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "folded": self.folded,
            "passed": self.passed,
            "providers": self.providers,
            "trials": self.trials,
            "seed": self.seed,
            "inputs": self.inputs,
            "outputs": {p: [o.to_dict() for o in outs] for p, outs in self.outputs.items()},
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"verify {verdict}: {self.folded} vs {self.original} — onnxruntime at ORT_DISABLE_ALL, "
            f"{self.trials} trial(s), inputs: {self.inputs}, seed {self.seed}"
        ]
        header = f"  {'provider':8} {'output':24} {'dtype':8} {'max abs':>10} {'max/scale':>10} {'p99 abs':>10} {'max ulp':>8} {'tol/scale':>10}  result"
        lines.append(header)
        for provider, outs in self.outputs.items():
            for o in outs:
                ulp = "-" if o.max_ulp is None else str(o.max_ulp)
                tol = o.rtol + (o.atol / o.scale if o.scale else 0.0)
                lines.append(
                    f"  {provider:8} {o.name[:24]:24} {o.dtype:8} {o.max_abs:10.3g} {o.max_rel_to_scale:10.3g} "
                    f"{o.p99_abs:10.3g} {ulp:>8} {tol:10.3g}  {'ok' if o.passed else 'MISMATCH'}"
                )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@files.removing_temps_on_signals()  # its temporary models (bnfold-ort-, bnfold-bench-) go on a kill too
def verify_onnx(
    original: onnx.ModelProto | str | os.PathLike[str],
    folded: onnx.ModelProto | str | os.PathLike[str],
    *,
    provider: str = "cpu",
    trials: int = 3,
    seed: int = 0,
    shapes: dict[str, list[int]] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output (see the module docstring)."""
    choice = choose(provider)
    src_a = model_source(original, _label(original, "original"))
    src_b = model_source(folded, _label(folded, "folded"))
    result = VerifyResult(
        src_a.label, src_b.label, choice.selected, trials if inputs is None else 1, seed,
        f"random ({', '.join(DISTRIBUTIONS[: max(1, min(trials, len(DISTRIBUTIONS)))])})" if inputs is None else str(inputs),
    )
    result.notes.extend(choice.notes)
    try:
        for prov in choice.selected:
            sa = make_session(src_a, prov)
            sb = make_session(src_b, prov)
            names_a = [o.name for o in sa.get_outputs()]
            names_b = [o.name for o in sb.get_outputs()]
            if names_a != names_b:
                from bnfold.errors import InputError

                raise InputError(f"the models' outputs differ: {names_a} vs {names_b}")
            specs = input_specs(sa, shapes)
            comps: dict[str, OutputComparison] = {}
            for trial in range(result.trials):
                if inputs is None:
                    dist, feeds = random_feeds(specs, trial, seed)
                else:
                    dist, feeds = "npz", load_npz(inputs, specs)
                ra = _run(sa, feeds, src_a.label, dist)
                rb = _run(sb, feeds, src_b.label, dist)
                for name, a, b in zip(names_a, ra, rb):
                    _accumulate(comps, name, np.asarray(a), np.asarray(b), rtol, atol, dist)
            for c in comps.values():
                if c.total and c.finite == 0 and c.dtype.startswith(("float", "bfloat")):
                    c.passed = False
                    c.worst_trial = "no finite values to compare"
                    result.notes.append(
                        f"output '{c.name}' is non-finite everywhere ({prov}): nothing was compared; "
                        "give realistic inputs (--inputs) or shapes"
                    )
                elif c.total and c.finite < c.total:
                    result.notes.append(
                        f"output '{c.name}': {100 * c.finite / c.total:.1f}% of values finite ({prov}); "
                        "non-finite ones were required to match exactly"
                    )
            result.outputs[prov] = list(comps.values())
    finally:
        src_a.close()
        src_b.close()
    return result


def _run(session: Any, feeds: dict[str, np.ndarray], label: str, dist: str) -> list[Any]:
    """One run; onnxruntime's own failure (an index out of range, a shape it rejects) becomes a
    one-line `InputError` naming the model and the inputs, not a traceback."""
    try:
        return session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        from bnfold.errors import InputError

        text = " ".join(str(exc).split())
        raise InputError(f"{label}: onnxruntime failed on the {dist} inputs ({text[:300]})") from None


def _label(model: Any, default: str) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else default


def _accumulate(
    comps: dict[str, OutputComparison], name: str, a: np.ndarray, b: np.ndarray,
    rtol: float | None, atol: float | None, dist: str,
) -> None:
    dtype = a.dtype.name
    c = comps.get(name)
    if c is None:
        c = comps[name] = OutputComparison(name, dtype, list(a.shape))
        c.rtol = DEFAULT_RTOL.get(dtype, 0.0) if rtol is None else rtol
        c.atol = 0.0 if atol is None else atol
    if a.shape != b.shape:
        c.passed = False
        c.worst_trial = f"{dist}: shapes {a.shape} vs {b.shape}"
        return
    if not np.issubdtype(a.dtype, np.floating):  # integers, bool, strings: equal or not
        differ = a != b
        c.mismatches += int(np.count_nonzero(differ))
        if differ.any():
            c.passed = False
            c.worst_trial = c.worst_trial or dist
            if np.issubdtype(a.dtype, np.number):
                c.max_abs = max(c.max_abs, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
            else:
                c.max_abs = max(c.max_abs, 1.0)
        return
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    c.finite += int(np.count_nonzero(np.isfinite(a64)))
    c.total += a64.size
    same_special = (~np.isfinite(a64)) & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    if not np.all(finite | same_special):
        c.passed = False
        c.worst_trial = f"{dist}: non-finite values differ"
    err = np.abs(a64[finite] - b64[finite]) if finite.any() else np.zeros(1)
    scale = float(np.max(np.abs(a64[finite]))) if finite.any() else 0.0
    max_abs = float(err.max()) if err.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    c.mismatches += int(np.count_nonzero(err > c.atol + c.rtol * scale)) if finite.any() else 0
    c.mismatches += int(np.count_nonzero(~(finite | same_special)))
    if max_abs > c.atol + c.rtol * scale:
        c.passed = False
        c.worst_trial = c.worst_trial or dist
    if rel >= c.max_rel_to_scale:
        c.max_rel_to_scale, c.scale = rel, scale
    c.max_abs = max(c.max_abs, max_abs)
    c.p99_abs = max(c.p99_abs, float(np.percentile(err, 99)) if err.size else 0.0)
    ulp = _max_ulp(a[finite], b[finite])
    if ulp is not None:
        c.max_ulp = max(c.max_ulp or 0, ulp)


def _max_ulp(a: np.ndarray, b: np.ndarray) -> int | None:
    """Largest distance in units in the last place (integer views, ordered across zero)."""
    ints = {2: np.int16, 4: np.int32, 8: np.int64}.get(a.dtype.itemsize)
    if ints is None or a.size == 0:
        return None if ints is None else 0

    def ordered(x: np.ndarray) -> np.ndarray:
        i = x.view(ints).astype(np.int64)
        return np.where(i < 0, np.iinfo(ints).min - i, i)

    oa, ob = ordered(np.ascontiguousarray(a)), ordered(np.ascontiguousarray(b))
    # |oa - ob| overflows int64 for float64 values of opposite sign: count each side's ulps from zero
    same_sign = (oa < 0) == (ob < 0)
    dist = np.where(same_sign, np.abs(oa - np.where(same_sign, ob, oa)), 0).astype(np.uint64)
    dist = np.maximum(dist, np.where(same_sign, 0, np.abs(oa).astype(np.uint64) + np.abs(ob).astype(np.uint64)))
    return int(dist.max())
