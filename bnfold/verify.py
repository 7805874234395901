"""Does the folded model compute what the original computes, up to float rounding? Ask onnxruntime.

A correct fold still changes rounding, and how much that moves an output depends on the network (a
correct float32 fold of a 50-layer network with trained statistics differs by 1e-5..3e-4 of the
output's scale), so a fixed tolerance either fails correct folds of deep networks or passes wrong folds
of shallow ones. Instead every run measures the model's own float noise, on the same inputs and the
same provider, and holds the fold error to it (`bnfold.criterion`):

- **fold error**: max |folded − original| over the output's finite values, relative to the output's
  scale (max |original|), both sessions at ``ORT_DISABLE_ALL`` (onnxruntime fuses Conv+BN itself at
  its basic level: an optimised reference would compare the fold with itself);
- **noise**: the larger of two legitimate re-roundings of the *original*, measured the same way:
  (a) onnxruntime's own optimised graph of it (``ORT_ENABLE_ALL``: it fuses Conv+BN in float32 and
  reorders arithmetic), and (b) the original with every float parameter moved by ±1 ulp at random
  signs (seeded) — a fold rounds ``s·W`` once, a perturbation of the same kind and at least the same
  size. (b) is what makes the measure work where (a) measures nothing: onnxruntime leaves the
  dynamo exporter's Conv+BN unfused, so (a) is exactly 0 there;
- the output passes when ``fold error ≤ max(NOISE_FACTOR · noise, floor[dtype])``, judged **per trial**
  against that trial's own noise: the large-magnitude inputs on an unbounded output (a detection
  head) move both the fold error and the noise, so they cannot dominate the verdict by themselves.

Inputs are seeded normal, uniform[-1, 1] and large-magnitude (×100) values cycling over the trials, or
the user's ``.npz``. Integer, bool and string outputs must be equal. Non-finite values in the original
must be matched exactly (inf by the same inf, NaN by NaN) and are left out of the figures; the report
says how many there were. ``rtol`` replaces the dtype's floor (the noise can still excuse more),
``atol`` adds an absolute allowance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from bnfold import files
from bnfold.criterion import FLOOR, NOISE_FACTOR, Judgement, judge
from bnfold.errors import InputError, VerificationError
from bnfold.feeds import DISTRIBUTIONS, input_specs, load_npz, random_feeds
from bnfold.providers import choose
from bnfold.sessions import make_session, model_source

ULP_NOISE = "±1 ulp on the parameters"
ORT_NOISE = "onnxruntime's own optimisation"


@dataclass
class VerifyOptions:
    """How to verify (the options `bnfold verify` and `bnfold fold` share); see `verify_onnx`."""

    provider: str = "cpu"
    trials: int = 3
    seed: int = 0
    shapes: dict[str, list[int]] | None = None
    inputs: str | os.PathLike[str] | None = None
    rtol: float | None = None
    atol: float | None = None


@dataclass
class TrialFigures:
    """One output on one trial's inputs; errors relative to ``scale`` (max |original| of that trial)."""

    trial: str
    fold_error: float
    noise: float
    noise_source: str
    scale: float
    allowed: float
    passed: bool
    noise_by_source: dict[str, float] = field(default_factory=dict)  # each re-rounding's own figure

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class OutputComparison:
    """One output on one provider: every trial's figures, and the worst trial's as the verdict's."""

    name: str
    dtype: str
    shape: list[int]
    fold_error: float = 0.0  # worst trial's (the one closest to or furthest past what it was allowed)
    noise: float = 0.0
    noise_source: str = ""
    allowed: float = 0.0
    factor: float = NOISE_FACTOR
    floor: float = 0.0
    scale: float = 0.0
    max_abs: float = 0.0  # largest absolute fold error over all trials
    atol: float = 0.0
    passed: bool = True
    worst_trial: str = ""
    finite: int = 0  # original's values that were finite and so could be compared
    total: int = 0
    mismatches: int = 0  # elements beyond what was allowed (integer outputs: elements that differ)
    trials: list[TrialFigures] = field(default_factory=list)
    problem: str = ""  # why it failed other than by size (shapes, non-finite values that differ)

    @property
    def max_rel_to_scale(self) -> float:
        """The largest fold error relative to its trial's scale, over all trials."""
        return max((t.fold_error for t in self.trials), default=self.fold_error)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    def words(self) -> str:
        """The verdict in words, as `bnfold.criterion.Judgement.words` says it: 'fold error 2.1e-05 of
        scale, onnxruntime's own optimisation 2.4e-05, allowed 4× = 9.6e-05: equivalent'."""
        if self.problem:
            return f"{self.problem}: DIFFERENT"
        if not self.is_float:
            if self.mismatches:
                return f"{self.mismatches} element(s) differ (an {self.dtype} output must be equal): DIFFERENT"
            return f"equal ({self.dtype}): equivalent"
        text = Judgement(self.fold_error, self.noise, self.scale, self.allowed, self.factor, self.noise_source).words()
        return text.replace(":", f" + atol {self.atol:.2g}:", 1) if self.atol else text

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "trials"}
        d["max_rel_to_scale"] = self.max_rel_to_scale
        d["verdict"] = self.words()
        d["trials"] = [t.to_dict() for t in self.trials]
        return d


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
    noise: str = f"max of {ORT_NOISE} (ORT_ENABLE_ALL) and {ULP_NOISE}"

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
            "noise": self.noise,
            "factor": NOISE_FACTOR,
            "outputs": {p: [o.to_dict() for o in outs] for p, outs in self.outputs.items()},
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"verify {verdict}: {self.folded} vs {self.original} — onnxruntime on {' and '.join(self.providers)} at ORT_DISABLE_ALL, "
            f"{self.trials} trial(s), inputs: {self.inputs}, seed {self.seed}"
        ]
        several = len(self.outputs) > 1
        for provider, outs in self.outputs.items():
            for o in outs:
                where = f"{provider}: " if several else ""
                lines.append(f"  {where}{o.name} ({o.dtype}): {o.words()}")
        lines.append(
            f"  (relative to each output's largest |value|; noise: how far {ORT_NOISE} or {ULP_NOISE} moves the "
            f"original, per trial; equivalent = within {NOISE_FACTOR:g}× the noise, or the dtype's floor)"
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


class NotEquivalent(VerificationError):
    """The folded file failed verification; carries the verification and the fold's report."""

    def __init__(self, verification: VerifyResult, report: Any = None) -> None:
        failed = [o.name for outs in verification.outputs.values() for o in outs if not o.passed]
        super().__init__(f"verification failed on output(s) {', '.join(dict.fromkeys(failed))}")
        self.verification = verification
        self.report = report


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
    """Run both models on the same inputs and judge every output against the original's own float
    noise (see the module docstring)."""
    choice = choose(provider)
    src_a = model_source(original, _label(original, "original"))
    src_b = model_source(folded, _label(folded, "folded"))
    src_p = model_source(perturbed(original, seed), "original ±1 ulp")
    result = VerifyResult(
        src_a.label, src_b.label, choice.selected, trials if inputs is None else 1, seed,
        f"random ({', '.join(DISTRIBUTIONS[: max(1, min(trials, len(DISTRIBUTIONS)))])})" if inputs is None else str(inputs),
    )
    result.notes.extend(choice.notes)
    try:
        for prov in choice.selected:
            sa = make_session(src_a, prov)
            sb = make_session(src_b, prov)
            noise_sessions = _noise_sessions(src_a, src_p, prov, result.notes)
            names_a = [o.name for o in sa.get_outputs()]
            names_b = [o.name for o in sb.get_outputs()]
            if names_a != names_b:
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
                noise_runs = _noise_runs(noise_sessions, feeds, dist, prov, result.notes)
                for k, (name, a, b) in enumerate(zip(names_a, ra, rb)):
                    others = [(what, np.asarray(r[k])) for what, r in noise_runs]
                    _accumulate(comps, name, np.asarray(a), np.asarray(b), others, rtol, atol, dist)
            for c in comps.values():
                _note_non_finite(c, prov, result.notes)
            result.outputs[prov] = list(comps.values())
    finally:
        src_a.close()
        src_b.close()
        src_p.close()
    return result


def _noise_sessions(src_a: Any, src_p: Any, provider: str, notes: list[str]) -> list[tuple[str, Any]]:
    """The original re-rounded two ways. One that onnxruntime cannot build (an optimiser that fails on
    this graph) is left out with a note, not taken for a problem of the fold: the other still measures."""
    sessions = []
    for what, src, level in ((ORT_NOISE, src_a, "enable_all"), (ULP_NOISE, src_p, "disable_all")):
        try:
            sessions.append((what, make_session(src, provider, level=level)))
        except InputError as exc:
            notes.append(f"noise: {what} left out ({provider}): {exc}")
    return sessions


def _noise_runs(sessions: list[tuple[str, Any]], feeds: dict[str, np.ndarray], dist: str, provider: str,
                notes: list[str]) -> list[tuple[str, list[Any]]]:
    runs = []
    for what, session in list(sessions):
        try:
            runs.append((what, _run(session, feeds, what, dist)))
        except InputError as exc:
            sessions.remove((what, session))
            notes.append(f"noise: {what} left out ({provider}): {exc}")
    return runs


def verify_file(original: str | os.PathLike[str], folded: str | os.PathLike[str], options: VerifyOptions | None = None) -> VerifyResult:
    """`verify_onnx` with a `VerifyOptions` (what `fold_file(..., verify=...)`, so `bnfold fold`, runs)."""
    o = options or VerifyOptions()
    return verify_onnx(original, folded, provider=o.provider, trials=o.trials, seed=o.seed, shapes=o.shapes,
                       inputs=o.inputs, rtol=o.rtol, atol=o.atol)


def before_writing(
    source: str | os.PathLike[str], target: str | os.PathLike[str], verify: bool | VerifyOptions | None
) -> Callable[[str, Any], None] | None:
    """`fold_file`'s verify-before-writing step, or None when not asked for: ``check(written, report)``
    verifies the written temporary file against ``source``, puts the result in ``report.verification``
    (named for ``target``, the name it is about to get) and raises `NotEquivalent` on a failure, so
    that nothing is written. A file in which nothing folded is the input itself: nothing to verify."""
    if verify is False or verify is None:
        return None
    options = verify if isinstance(verify, VerifyOptions) else VerifyOptions()

    def check(written: str, report: Any) -> None:
        if not report.folded:
            return
        result = report.verification = verify_file(source, written, options)
        result.folded = str(target)
        if not result.passed:
            raise NotEquivalent(result, report)

    return check


def perturbed(model: onnx.ModelProto | str | os.PathLike[str], seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` with every finite float parameter of its arithmetic (initializers and
    Constants feeding only `ARITHMETIC` ops) moved by one ulp, up or down at random (seeded): a
    legitimate re-rounding of the same function, at least as large as a fold's own (which rounds each
    folded weight once, to nearest)."""
    if isinstance(model, (str, os.PathLike)):
        from bnfold.onnx.io import load_model  # external data read only from inside the model's folder

        proto = load_model(model, check=False)
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    rng = np.random.default_rng([seed, 0x1F])
    consumers: dict[str, set[str]] = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, set()).add(n.op_type)
    tensors = list(proto.graph.initializer)
    tensors += [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t, out in zip(tensors, [t.name for t in proto.graph.initializer] + [
        n.output[0] for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]):
        if consumers.get(out) and consumers[out] <= ARITHMETIC:
            _nudge(t, rng)
    return proto


ARITHMETIC = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add", "Sub", "Mul", "Div", "PRelu",
    "LayerNormalization", "InstanceNormalization", "GroupNormalization",
})
"""Ops whose float inputs are values (weights, biases, statistics, operands): a ±1 ulp nudge there is a
re-rounding of the same function. A float tensor that feeds anything else stays: Resize's scales, say,
where 1 − 1 ulp turns 64 channels into 63."""


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _nudge(t: onnx.TensorProto, rng: np.random.Generator) -> None:
    """Move every finite value of ``t`` by one ulp of its own dtype, up or down in magnitude at random.

    On the integer view of an IEEE number, ±1 is one ulp in magnitude for either sign (the sign bit is
    apart), the same for float16, bfloat16, float32 and float64; zero only goes up (down would be NaN)
    and the largest finite value only down (up would be inf). No float64 temporaries: cheap on 100 MB."""
    if t.data_type not in _FLOAT_TYPES:
        return
    a = np.ascontiguousarray(onnx.numpy_helper.to_array(t))
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    bits = a.view(ints)
    magnitude = bits & np.iinfo(ints).max
    finite_limit = np.array(np.inf, dtype=a.dtype).view(ints) - 1  # the largest finite magnitude
    step = (rng.integers(0, 2, size=a.shape, dtype=np.int8) * 2 - 1).astype(ints)
    step[magnitude == 0] = 1
    step[magnitude == finite_limit] = -1
    step[magnitude > finite_limit] = 0  # inf and NaN stay
    t.CopyFrom(onnx.numpy_helper.from_array((bits + step).view(a.dtype), t.name))


def _run(session: Any, feeds: dict[str, np.ndarray], label: str, dist: str) -> list[Any]:
    """One run; onnxruntime's own failure (an index out of range, a shape it rejects) becomes a
    one-line `InputError` naming the model and the inputs, not a traceback."""
    try:
        return session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        text = " ".join(str(exc).split())
        raise InputError(f"{label}: onnxruntime failed on the {dist} inputs ({text[:300]})") from None


def _label(model: Any, default: str) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else default


def _note_non_finite(c: OutputComparison, provider: str, notes: list[str]) -> None:
    """Say plainly when the original itself gives inf/NaN: those values were compared for equality only."""
    if not (c.total and c.is_float):
        return
    if c.finite == 0:
        c.passed = False
        c.problem = c.problem or "no finite values to compare"
        notes.append(
            f"output '{c.name}' is non-finite everywhere in the original ({provider}): nothing was compared; "
            "give realistic inputs (--inputs) or shapes"
        )
    elif c.finite < c.total:
        notes.append(
            f"output '{c.name}': the original gives inf/NaN for {100 * (1 - c.finite / c.total):.2g}% of its values "
            f"({provider}); the folded model had to give the same there, the figures cover the rest"
        )


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    noise: Sequence[tuple[str, Sequence[np.ndarray]]],
    *,
    dtypes: Sequence[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    trial: str = "example inputs",
) -> list[OutputComparison]:
    """The same judgement as `verify_onnx`, on outputs another front-end computed (one trial).

    ``noise``: (what it is, outputs) pairs, legitimate re-roundings of ``reference``. ``dtypes``: the
    model's output dtypes where ``reference`` is held in a wider one (a float64 copy), so that the floor
    is the model's."""
    comps: dict[str, OutputComparison] = {}
    for k, (name, a, b) in enumerate(zip(names, reference, candidate)):
        others = [(what, np.asarray(outs[k])) for what, outs in noise]
        _accumulate(comps, name, np.asarray(a), np.asarray(b), others, rtol, atol, trial, dtype=None if dtypes is None else dtypes[k])
    return list(comps.values())


def _accumulate(
    comps: dict[str, OutputComparison], name: str, a: np.ndarray, b: np.ndarray,
    others: Sequence[tuple[str, np.ndarray]], rtol: float | None, atol: float | None, dist: str,
    dtype: str | None = None,
) -> None:
    """Judge one output on one trial: ``a`` the original's, ``b`` the folded model's, ``others`` the
    original's re-rounded runs (what, values) whose distance from ``a`` is the noise."""
    dtype = dtype or a.dtype.name
    c = comps.get(name)
    if c is None:
        c = comps[name] = OutputComparison(name, dtype, list(a.shape))
        c.floor = FLOOR.get(dtype, 0.0) if rtol is None else rtol
        c.atol = 0.0 if atol is None else atol
    if a.shape != b.shape:
        c.passed = False
        c.problem = f"shapes {list(a.shape)} vs {list(b.shape)} ({dist} inputs)"
        return
    if not np.issubdtype(a.dtype, np.floating) or not np.issubdtype(b.dtype, np.floating):  # equal or not
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
    fin_a = np.isfinite(a64)
    c.finite += int(np.count_nonzero(fin_a))
    c.total += a64.size
    same_special = (~fin_a) & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    compared = fin_a & np.isfinite(b64)
    bad_special = ~(compared | same_special)
    if bad_special.any():
        c.passed = False
        c.mismatches += int(np.count_nonzero(bad_special))
        c.problem = c.problem or f"non-finite values differ ({dist} inputs): {int(np.count_nonzero(bad_special))} element(s)"
    if not compared.any():
        return
    scale = float(np.max(np.abs(a64[compared])))
    err = np.abs(a64[compared] - b64[compared])
    max_abs = float(err.max())
    noise_abs, source, by_source = 0.0, "", {}
    for what, o in others:
        o64 = o.astype(np.float64)
        both = compared & np.isfinite(o64)
        n = float(np.max(np.abs(a64[both] - o64[both]))) if both.any() else 0.0
        by_source[what] = n / scale if scale > 0 else 0.0
        if n > noise_abs:
            noise_abs, source = n, what
    rel = (lambda x: x / scale) if scale > 0 else (lambda x: 0.0 if x == 0 else float("inf"))
    judged_error = max(max_abs - c.atol, 0.0)
    j: Judgement = judge(rel(judged_error), rel(noise_abs), dtype, scale=scale, floor=rtol, source=source)
    figures = TrialFigures(dist, rel(max_abs), rel(noise_abs), source, scale, j.allowed, j.passed, by_source)
    c.trials.append(figures)
    c.mismatches += int(np.count_nonzero(err > c.atol + j.allowed * scale))
    c.max_abs = max(c.max_abs, max_abs)
    if not j.passed:
        c.passed = False
    # the verdict's figures: the trial that came closest to (or went furthest past) what it was allowed
    worst = max(c.trials, key=lambda t: (t.fold_error / t.allowed) if t.allowed > 0 else (float("inf") if t.fold_error > 0 else 0.0))
    c.fold_error, c.noise, c.noise_source, c.allowed, c.scale, c.worst_trial = (
        worst.fold_error, worst.noise, worst.noise_source, worst.allowed, worst.scale, worst.trial,
    )
