"""Fold time, verification and onnxruntime latency over the sample models and a ResNet-50-size model.

    python benchmarks/report.py [--repeats 200] [--warmup 5] [--large-repeats 50] [--threads N]
                                [--fold-runs 3] [--seed 0] [--skip-large] [--out FILE]

For every `sample_models/*.onnx`, and for the ResNet-50 topology built locally
(`sample_models.zoo.resnet50_size`, ~25.6 M random parameters, saved to a temporary folder; no
downloads), it measures:

* fold time: `bnfold.fold_onnx(path)` (load + find + fold, in memory), median of `--fold-runs` after one
  warm-up (a timer of its own);
* verification: `bnfold.verify_onnx` (both models at ORT_DISABLE_ALL, 3 seeded trials), the worst
  max-error-over-output-scale and the verdict;
* latency: `bnfold.bench.bench_onnx` at ORT_DISABLE_ALL (raw effect of folding) and ORT_ENABLE_ALL (what
  a deployment sees): both models interleaved, batch as in the model (symbolic → 1), fixed threads,
  medians, speedup median(original)/median(folded) with a 95% bootstrap interval.

It prints a Markdown table, then the machine, versions, settings, load average and the exact command;
`--out FILE` writes the same text to FILE. A script, not a test: about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `sample_models` lives at the repo root
    sys.path.insert(0, str(ROOT))

from sample_models import zoo  # noqa: E402


def _time(fn, runs: int) -> list[float]:
    """Seconds of ``runs`` calls after one warm-up (page cache, imports, allocator); gc between calls.

    Kept here rather than imported from another script's private helper, so that this report does not
    break when that script changes.
    """
    import gc

    fn()
    times = []
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _finite_fraction(path: Path, seed: int) -> float:
    """Share of finite values over all float outputs of the original (inputs as verify's first trial)."""
    import numpy as np

    from bnfold.feeds import input_specs, random_feeds
    from bnfold.sessions import make_session, model_source

    src = model_source(path)
    try:
        session = make_session(src)
        _, feeds = random_feeds(input_specs(session), 0, seed)
        outs = [np.asarray(o) for o in session.run(None, feeds)]
    finally:
        src.close()
    floats = [o for o in outs if np.issubdtype(o.dtype, np.floating)]
    total = sum(o.size for o in floats)
    return sum(int(np.isfinite(o).sum()) for o in floats) / total if total else 1.0


def measure(path: Path, name: str, args: argparse.Namespace, repeats: int) -> list[str]:
    """One table row for one model file."""
    import onnx

    import bnfold
    from bnfold.bench import bench_onnx

    folded: list = []

    def fold() -> None:
        folded[:] = [bnfold.fold_onnx(path)]

    fold_s = statistics.median(_time(fold, args.fold_runs))
    model, report = folded[0]
    verdict = bnfold.verify_onnx(path, model, trials=3, seed=args.seed)
    worst = max((o.max_rel_to_scale for outs in verdict.outputs.values() for o in outs), default=0.0)
    verify = f"{'pass' if verdict.passed else 'FAIL'} {worst:.1e}"
    finite = _finite_fraction(path, args.seed)
    if finite < 1.0:  # verify counts equal inf/NaN as equal: a pass on such outputs proves little
        verify += f" (⚠ only {finite:.0%} of output values finite: vacuous)"
    with tempfile.TemporaryDirectory(prefix="bnfold-report-") as tmp:  # both sessions from a file, alike
        folded_path = Path(tmp) / "folded.onnx"
        onnx.save(model, folded_path)
        del model
        result = bench_onnx(path, folded_path, threads=args.threads, repeats=repeats, warmup=args.warmup, seed=args.seed)
    cells = [name, f"{report.folded}/{report.found}", f"{fold_s * 1e3:.1f}", verify]
    for r in result.runs:
        cells += [
            f"{_ms(r.original.median_ms)} → {_ms(r.folded.median_ms)}",
            f"**{r.ratio:.2f}×** [{r.ci95[0]:.2f}, {r.ci95[1]:.2f}]",
        ]
    enable = next(r for r in result.runs if r.level == "enable_all")
    cells.append(f"{enable.original.session_s * 1e3:.1f} → {enable.folded.session_s * 1e3:.1f}")
    cells.append(result.inputs and next(iter(result.inputs.values())).split()[0] or "-")
    return cells


def main(argv: list[str] | None = None) -> int:
    from bnfold.bench import default_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per model and level, sample models (default 200)")
    parser.add_argument("--large-repeats", type=int, default=50, help="timed runs per model and level, ResNet-50 size (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each model first (default 5)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="intra-op threads (default min(4, CPUs))")
    parser.add_argument("--fold-runs", type=int, default=3, help="timed fold runs after one warm-up (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs, bootstrap and the large model's weights")
    parser.add_argument("--skip-large", action="store_true", help="sample models only")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    import numpy as np
    import onnx
    import onnxruntime

    import bnfold

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/report.py", *(argv if argv is not None else sys.argv[1:])])
    load_before = _load()
    t_start = time.perf_counter()
    rows = []
    for path in sorted((ROOT / "sample_models").glob("*.onnx")):
        rows.append(measure(path, f"`{path.name}`", args, args.repeats))
        print(f"done {path.name}", file=sys.stderr)
    if not args.skip_large:
        with tempfile.TemporaryDirectory(prefix="bnfold-report-") as tmp:
            src = Path(tmp) / "resnet50_size.onnx"
            onnx.save(zoo.resnet50_size(seed=args.seed), src)
            rows.append(measure(src, "ResNet-50 size (25.6 M params, built locally)", args, args.large_repeats))
            print("done resnet50_size", file=sys.stderr)
    total_s = time.perf_counter() - t_start

    header = [
        "model", "BN folded", "fold ms", "verify (max err/scale)",
        "ORT_DISABLE_ALL median ms orig → folded", "speedup [95% CI]",
        "ORT_ENABLE_ALL median ms orig → folded", "speedup [95% CI]",
        "session ms (ENABLE_ALL) orig → folded", "input",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "ORT_DISABLE_ALL: onnxruntime rewrites nothing — the raw effect of folding. ORT_ENABLE_ALL: onnxruntime's "
        "default, what a deployment sees; it fuses Conv+BatchNorm itself, so expect about 1× there. "
        "Speedup = median(original) / median(folded); > 1 means the folded model is faster. "
        "The interval is a bootstrap over the paired runs of this one process: for models that run in "
        "microseconds the ratio also moves from process to process (buffer placement, per-call overhead) by "
        "more than that interval — read those rows as ≈ 1×; the ResNet rows are the meaningful ones.",
        "",
        f"- machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}; "
        f"load average (1/5/15 min) {load_before} before, {_load()} after",
        f"- versions: python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__} "
        f"(CPUExecutionProvider), numpy {np.__version__}, bnfold {bnfold.__version__}",
        f"- settings: {args.threads} intra-op thread(s), inter-op 1, spinning off; batch as in the model; "
        f"{args.repeats} timed runs ({args.large_repeats} for ResNet-50 size) after {args.warmup} warm-up per model and level, "
        f"interleaved with alternating order; session creation median of 3; fold: median of {args.fold_runs} after 1 warm-up; "
        f"verify: 3 trials at ORT_DISABLE_ALL; seed {args.seed}; whole run {total_s:.0f} s",
        f"- command: `{command}`",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all("FAIL" not in r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
