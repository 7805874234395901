"""How much faster is the folded model? onnxruntime latency of both models, measured honestly.

Timing only: nothing on the fold path imports this module.

Method, per provider and per optimisation level:

* Sessions: each model's session is created ``creations`` times, interleaved (A B A B …); the reported
  session-creation time is the median (the first creation in a process also pays onnxruntime's one-time
  start-up, which interleaving spreads over both models instead of charging it to one).
* Inputs: one seeded input set from the original's signature (standard normal; integer inputs in
  [-8, 8]), the same arrays for both models.
* Runs: ``warmup`` untimed then ``repeats`` timed runs of each model, interleaved in pairs whose order
  alternates (A B, B A, A B, …) so that drift — clock, temperature, other processes — and any
  after-the-other effect (caches) hit both models alike. The garbage collector is off while timing.
* Threads: a fixed intra-op thread count (default ``min(4, os.cpu_count())``), inter-op 1; always
  reported. Intra-op spinning is off (``session.intra_op.allow_spinning = 0``): with two sessions in one
  process, one session's idle workers busy-wait on the cores the other needs. Measured here (2 CPUs,
  2 threads, the same model as A and B): spinning on gave 0.096 ms vs 0.170 ms — a 1.8x "speedup" of a
  model over itself; spinning off gave 0.184 vs 0.184. Absolute latencies of very small models are
  therefore somewhat higher than a one-model process with spinning would see; the ratio is fair.
* Figures: median, p10, p90 (ms), throughput (items per second at the median, items = the first
  dimension of the first input), and the speedup ``median(original) / median(folded)`` with a 95%
  percentile-bootstrap interval over the paired runs (pairs resampled together, seeded).
* Levels, labelled plainly: ``ORT_DISABLE_ALL`` is the raw effect of folding; ``ORT_ENABLE_ALL`` is what a
  deployment sees — onnxruntime fuses Conv+BatchNorm itself there, so expect a ratio near 1 for plain
  Conv+BN networks.

CPU runs use plain ``session.run``: the inputs already live in host memory, and ``run`` is what a CPU
deployment calls, so its (small, equal-for-both) per-call overhead belongs in the figure. CUDA runs use
I/O binding: inputs are copied to the device once before timing, outputs are bound to the device, and
each timed run is ``synchronize_inputs → run_with_iobinding → synchronize_outputs`` so the time is the
device's work, not host↔device copies.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bnfold import files
from bnfold.errors import UsageError

LEVEL_LABELS = {
    "disable_all": "ORT_DISABLE_ALL (raw effect of folding)",
    "enable_all": "ORT_ENABLE_ALL (what a deployment sees)",
}
LEVEL_NAMES = {"disable_all": "ORT_DISABLE_ALL", "enable_all": "ORT_ENABLE_ALL"}
BOOTSTRAP_RESAMPLES = 2000
DEFAULT_CREATIONS = 3


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class ModelTiming:
    """One model at one level on one provider."""

    label: str
    session_s: float  # median of the creations
    session_runs_s: list[float]
    times_ms: list[float]
    items: int

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p10_ms(self) -> float:
        return float(np.percentile(self.times_ms, 10))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.times_ms, 90))

    @property
    def throughput(self) -> float:
        """Items per second at the median latency."""
        return self.items / (self.median_ms / 1e3) if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "session_creation_s": self.session_s,
            "session_creation_runs_s": list(self.session_runs_s),
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "throughput_items_per_s": self.throughput,
            "times_ms": list(self.times_ms),
        }


@dataclass
class LevelResult:
    """Both models at one optimisation level on one provider, and their ratio."""

    provider: str
    level: str
    original: ModelTiming
    folded: ModelTiming
    ratio: float
    ci95: tuple[float, float]

    @property
    def ort_level(self) -> str:
        return LEVEL_NAMES[self.level]

    @property
    def title(self) -> str:
        return LEVEL_LABELS[self.level]

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "level": self.level,
            "ort_level": self.ort_level,
            "label": self.title,
            "original": self.original.to_dict(),
            "folded": self.folded.to_dict(),
            "speedup": {
                "ratio": self.ratio,
                "ci95": list(self.ci95),
                "definition": "median(original) / median(folded); > 1 means the folded model is faster",
                "method": f"percentile bootstrap over {len(self.original.times_ms)} paired runs, "
                f"{BOOTSTRAP_RESAMPLES} resamples",
            },
        }


@dataclass
class BenchResult:
    original: str
    folded: str
    providers: list[str]
    levels: list[str]
    threads: int
    batch: int  # items per run (first dim of the first input)
    repeats: int
    warmup: int
    creations: int
    seed: int
    inputs: dict[str, str]  # name -> "1x3x32x32 float32"
    fold: dict[str, Any] | None = None  # when folded in memory: seconds and BatchNorms folded
    runs: list[LevelResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    onnxruntime: str = ""
    cpu_count: int = 0
    machine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "folded": self.folded,
            "fold": self.fold,
            "config": {
                "providers": list(self.providers),
                "levels": list(self.levels),
                "threads": self.threads,
                "inter_op_threads": 1,
                "spinning": False,
                "batch": self.batch,
                "repeats": self.repeats,
                "warmup": self.warmup,
                "session_creations": self.creations,
                "seed": self.seed,
                "inputs": dict(self.inputs),
                "order": "interleaved pairs, order alternating (A B, B A, …)",
                "onnxruntime": self.onnxruntime,
                "cpu_count": self.cpu_count,
                "machine": self.machine,
            },
            "results": [r.to_dict() for r in self.runs],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        if self.fold is not None:
            how = f"folded in memory ({self.fold['batchnorms_folded']} BatchNorm(s) folded in {self.fold['seconds']:.3f} s)"
        else:
            how = self.folded
        inputs = ", ".join(f"{k} {v}" for k, v in self.inputs.items()) or "none"
        lines = [
            f"bnfold bench: {self.original} vs {how}",
            f"  provider {', '.join(self.providers)}; {self.threads} intra-op thread(s), inter-op 1, spinning off; batch {self.batch}; "
            f"{self.repeats} timed runs after {self.warmup} warm-up, interleaved (order alternates per pair); "
            f"session creation: median of {self.creations}",
            f"  inputs: {inputs} (seed {self.seed}); onnxruntime {self.onnxruntime}; {self.cpu_count} CPU(s), {self.machine}",
        ]
        for r in self.runs:
            lines.append("")
            lines.append(f"{r.title} — {r.provider}")
            lines.append(
                f"  {'model':9} {'session ms':>10} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'items/s':>10}"
            )
            for name, t in (("original", r.original), ("folded", r.folded)):
                lines.append(
                    f"  {name:9} {t.session_s * 1e3:10.1f} {t.median_ms:10.3f} {t.p10_ms:9.3f} {t.p90_ms:9.3f} {t.throughput:10.1f}"
                )
            lines.append(
                f"  speedup original/folded (median): {r.ratio:.3f}x, 95% CI [{r.ci95[0]:.3f}, {r.ci95[1]:.3f}] "
                f"(bootstrap over {len(r.original.times_ms)} paired runs)"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def planned_runs(n_providers: int, n_levels: int, repeats: int, warmup: int) -> int:
    """How many model runs `bench_onnx` will report to `progress` (for a progress bar's length)."""
    return n_providers * n_levels * 2 * (repeats + warmup)


def bootstrap_ratio_ci(
    a_ms: list[float] | np.ndarray, b_ms: list[float] | np.ndarray, seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(a)/median(b); pairs (a_i, b_i) are resampled together."""
    a = np.asarray(a_ms, dtype=np.float64)
    b = np.asarray(b_ms, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired runs of equal, non-zero length are needed")
    rng = np.random.default_rng([seed, 0xB007])
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


@files.removing_temps_on_signals()  # its temporary models (bnfold-ort-, bnfold-bench-) go on a kill too
def bench_onnx(
    original: Any,
    folded: Any = None,
    *,
    provider: str = "cpu",
    levels: tuple[str, ...] | list[str] = ("disable_all", "enable_all"),
    threads: int | None = None,
    batch: int | None = None,
    repeats: int = 50,
    warmup: int = 5,
    shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    creations: int = DEFAULT_CREATIONS,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Time ORIGINAL against FOLDED (folded in memory by `fold_onnx` when not given); see the module doc.

    `original` / `folded`: a path or an `onnx.ModelProto`. `progress(n)` is called after every model run
    (warm-up included) with the number of runs just done; `planned_runs` gives the total.
    """
    import onnxruntime as ort

    from bnfold.feeds import input_specs, random_feeds
    from bnfold.providers import choose
    from bnfold.sessions import model_source

    levels = list(levels)
    bad = [lv for lv in levels if lv not in LEVEL_LABELS]
    if bad or not levels:
        raise UsageError(f"unknown level(s) {bad or levels}: use {', '.join(LEVEL_LABELS)}")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("creations", creations, 1)):
        if value < low:
            raise UsageError(f"--{name} must be at least {low} (got {value})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads})")
    if batch is not None and batch < 1:
        raise UsageError(f"--batch must be at least 1 (got {batch})")
    threads = threads or default_threads()
    choice = choose(provider)

    fold_info = None
    src_a = model_source(original, _label(original, "original"))
    src_b = None
    try:
        if folded is None:
            from bnfold.onnx.api import fold_onnx

            t0 = time.perf_counter()
            folded_model, report = fold_onnx(original)
            fold_info = {"seconds": time.perf_counter() - t0, "batchnorms_folded": report.folded}
            src_b = _like_original(folded_model, original)
            del folded_model
        else:
            src_b = model_source(folded, _label(folded, "folded"))
        result = BenchResult(
            original=src_a.label, folded=src_b.label, providers=list(choice.selected), levels=levels,
            threads=threads, batch=0, repeats=repeats, warmup=warmup, creations=creations, seed=seed, inputs={},
            fold=fold_info, onnxruntime=ort.__version__, cpu_count=os.cpu_count() or 0,
            machine=f"{platform.system()} {platform.machine()}, python {platform.python_version()}",
        )
        result.notes.extend(choice.notes)
        if fold_info is not None and fold_info["batchnorms_folded"] == 0:
            result.notes.append("nothing was folded: both models are the same graph")
        if threads > (os.cpu_count() or threads):
            result.notes.append(f"{threads} threads on {os.cpu_count()} CPU(s): oversubscribed, timings are pessimistic")
        for prov in choice.selected:
            for level in levels:
                result.runs.append(
                    _bench_level(src_a, src_b, prov, level, threads, batch, shapes, seed, repeats, warmup,
                                 creations, progress, result, input_specs, random_feeds)
                )
    finally:
        src_a.close()
        if src_b is not None:
            src_b.close()
    return result


def _like_original(folded_model: Any, original: Any):
    """The in-memory fold, handed to onnxruntime the way the original is: as a file when the original is
    one (from bytes, session creation of a ResNet-50-size model took twice as long as from a file), as
    bytes otherwise — so that session-creation times compare like for like."""
    import tempfile

    from bnfold.onnx.storage import save_model
    from bnfold.sessions import ModelSource, model_source

    if not isinstance(original, (str, os.PathLike)):
        return model_source(folded_model, "folded in memory")
    tmp = tempfile.TemporaryDirectory(prefix="bnfold-bench-")
    try:
        path = os.path.join(tmp.name, "folded.onnx")
        save_model(folded_model, path)
    except BaseException:
        tmp.cleanup()
        raise
    return ModelSource("folded in memory", path, tmp)


def _label(model: Any, default: str) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else default


def make_bench_session(source, provider: str, level: str, threads: int):
    """`bnfold.sessions.make_session` with intra-op spinning off (see the module docstring)."""
    from bnfold.sessions import make_session

    return make_session(source, provider, level, threads, spinning=False)


def _bench_level(src_a, src_b, prov, level, threads, batch, shapes, seed, repeats, warmup, creations,
                 progress, result, input_specs, random_feeds) -> LevelResult:
    created: dict[str, list[float]] = {"a": [], "b": []}
    sessions: dict[str, Any] = {}
    for _ in range(creations):  # interleaved; the last pair is kept
        for key, src in (("a", src_a), ("b", src_b)):
            sessions.pop(key, None)
            gc.collect()
            t0 = time.perf_counter()
            sessions[key] = make_bench_session(src, prov, level, threads)
            created[key].append(time.perf_counter() - t0)
    sa, sb = sessions["a"], sessions["b"]

    specs = input_specs(sa, shapes, batch)
    if batch is not None and specs and specs[0].shape and specs[0].shape[0] != batch:
        raise UsageError(
            f"input '{specs[0].name}' has a fixed first dimension {specs[0].shape[0]}: --batch {batch} cannot apply"
        )
    _, feeds = random_feeds(specs, 0, seed)
    items = int(specs[0].shape[0]) if specs and specs[0].shape else 1
    result.batch = items
    result.inputs = {s.name: f"{'x'.join(map(str, s.shape)) or 'scalar'} {s.dtype.name}" for s in specs}

    run_a = _runner(sa, feeds, prov)
    run_b = _runner(sb, feeds, prov)
    tick = progress or (lambda n: None)
    times = {"a": [], "b": []}
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for i in range(warmup + repeats):
            order = (("a", run_a), ("b", run_b)) if i % 2 == 0 else (("b", run_b), ("a", run_a))
            for key, fn in order:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[key].append(dt * 1e3)
                tick(1)
    except Exception as exc:  # onnxruntime's own failure at run time: one line, not a traceback
        from bnfold.errors import InputError

        if isinstance(exc, InputError):
            raise
        label = src_a.label if key == "a" else src_b.label
        text = " ".join(str(exc).split())
        raise InputError(f"{label}: onnxruntime failed on the benchmark inputs ({text[:300]})") from None
    finally:
        if gc_was_on:
            gc.enable()
    ta = ModelTiming(src_a.label, statistics.median(created["a"]), created["a"], times["a"], items)
    tb = ModelTiming(src_b.label, statistics.median(created["b"]), created["b"], times["b"], items)
    ratio = ta.median_ms / tb.median_ms
    ci = bootstrap_ratio_ci(times["a"], times["b"], seed=seed)
    del sa, sb, sessions
    return LevelResult(prov, level, ta, tb, ratio, ci)


def _runner(session, feeds: dict[str, np.ndarray], prov: str) -> Callable[[], None]:
    """One run of the model, as it will be timed (see the module docstring for CPU vs CUDA)."""
    if prov != "cuda":
        names = [o.name for o in session.get_outputs()]

        def run_cpu() -> None:
            session.run(names, feeds)

        return run_cpu

    import onnxruntime as ort

    binding = session.io_binding()
    device_inputs = []  # keep the device copies alive as long as the binding
    for name, x in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0)
        device_inputs.append(value)
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run_cuda() -> None:
        binding.synchronize_inputs()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run_cuda.device_inputs = device_inputs  # type: ignore[attr-defined]
    return run_cuda
