"""Fold and check time of bnfold on four real-size topologies, next to a plain `onnx.load` + `onnx.save`.

    python benchmarks/fold_time.py [--models mobilenet_v2,shufflenet_v2,resnet50,inception_v3] [--runs 7] [--seed 0]

Builds each model locally (`sample_models.sizes`: the MobileNetV2, ShuffleNetV2 x1.0, ResNet-50 and
Inception-v3 topologies, random weights, non-default BatchNorm statistics, no downloads), saves it
into a temporary folder, then times, in this one process, interleaved (A B C A B C …), after one
warm-up run of each:

* baseline: ``onnx.load(path)`` + ``onnx.save(model, out)``
* fold:     ``bnfold.onnx.api.fold_file(path, out)`` — file to file, what `bnfold fold --no-verify` runs
* check:    ``bnfold.onnx.api.check_onnx(path)`` — the plan only, what the `bnfold check` gate runs per model
* check of the folded model: the same on `fold_file`'s output — the gate's everyday case once a model
  is folded (shown beside the targets, which are for the unfolded file)

and prints one Markdown table: medians, and each as a ratio of the baseline's median, with the
machine and the command under it. Targets (issue 14): fold ≤ 1.5×, check ≤ 0.6×; the exit status is
1 when a ratio is over. A script, not a test: it takes a minute or two and ~1 GB of memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `sample_models` lives at the repo root
    sys.path.insert(0, str(ROOT))

from sample_models.sizes import SIZES  # noqa: E402

FOLD_LIMIT = 1.5
CHECK_LIMIT = 0.6
NAMES = {"mobilenet_v2": "MobileNetV2", "shufflenet_v2": "ShuffleNetV2 x1.0", "resnet50": "ResNet-50", "inception_v3": "Inception-v3"}


def _time_interleaved(fns: list[Callable[[], object]], runs: int) -> list[list[float]]:
    """A B C A B C …: drift (page cache, allocator, a busy neighbour) hits all alike."""
    for fn in fns:  # warm-up (page cache, imports, allocator)
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def _measure(key: str, seed: int, runs: int, tmp: Path) -> dict[str, object]:
    """Build one model, save it, time the three measurements interleaved; the row of the table."""
    from bnfold.onnx.api import check_onnx, fold_file
    from bnfold.report import Status

    model = SIZES[key](seed=seed)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    src, out = tmp / f"{key}.onnx", tmp / f"{key}.out.onnx"
    onnx.save(model, src)
    del model
    folded: list[int] = []
    foldable: list[int] = []

    def load_save() -> None:
        onnx.save(onnx.load(str(src)), str(out))

    def fold() -> None:
        report = fold_file(src, out)
        folded.append(sum(c.status is Status.FOLDED for c in report.candidates))

    def check() -> None:
        foldable.append(check_onnx(src).foldable)

    fold()  # the folded model: what the gate reads on every commit once the model is folded
    gated, left = tmp / f"{key}.folded.onnx", []
    os.replace(out, gated)

    def check_folded() -> None:
        left.append(check_onnx(gated).foldable)

    base, fold_t, check_t, gate_t = _time_interleaved([load_save, fold, check, check_folded], runs)
    assert folded[-1] == foldable[-1], f"{key}: fold folded {folded[-1]}, check said {foldable[-1]} foldable"
    assert left[-1] == 0, f"{key}: check found {left[-1]} foldable in the folded model"
    b, f, c, g = (statistics.median(ts) for ts in (base, fold_t, check_t, gate_t))
    return {
        "key": key, "params": params, "bn": n_bn, "folded": folded[-1], "mb": src.stat().st_size / 1e6,
        "base": b, "fold": f, "check": c, "gate": g, "fold_ratio": f / b, "check_ratio": c / b, "gate_ratio": g / b,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)} (default: all)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement, after one warm-up (default 7, at least 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SIZES]
    if unknown or not keys:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(SIZES)}")

    import onnxruntime

    import bnfold

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/fold_time.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        rows = [_measure(k, args.seed, args.runs, Path(tmp)) for k in keys]
    total = time.perf_counter() - t0

    ok = all(r["fold_ratio"] <= FOLD_LIMIT and r["check_ratio"] <= CHECK_LIMIT for r in rows)  # type: ignore[operator]
    print(
        f"| model | params | BN (folded) | file | `onnx.load` + `onnx.save` | `fold_file` | fold ratio (≤ {FOLD_LIMIT:g}×) "
        f"| `check_onnx` | check ratio (≤ {CHECK_LIMIT:g}×) | `check_onnx`, folded model | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fr, cr = r["fold_ratio"], r["check_ratio"]
        print(
            f"| {NAMES[r['key']]} | {r['params'] / 1e6:.1f} M | {r['bn']} ({r['folded']}) | {r['mb']:.1f} MB | {r['base'] * 1e3:.1f} ms "
            f"| {r['fold'] * 1e3:.1f} ms | **{fr:.2f}×**{'' if fr <= FOLD_LIMIT else ' over'} "
            f"| {r['check'] * 1e3:.1f} ms | **{cr:.2f}×**{'' if cr <= CHECK_LIMIT else ' over'} "
            f"| {r['gate'] * 1e3:.1f} ms | {r['gate_ratio']:.2f}× |"
        )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"\nMedians of {args.runs} interleaved runs after 1 warm-up each, one process; seed {args.seed}; whole run {total:.0f} s. "
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, {platform.system()}, load average {load} at the end; "
        f"python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {np.__version__}, bnfold {bnfold.__version__}. Command: `{command}`"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
