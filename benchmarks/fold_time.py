"""Fold time of bnfold on a ResNet-50-size model, next to a plain `onnx.load` + `onnx.save`.

    python benchmarks/fold_time.py [--runs 7] [--seed 0]

Builds the ResNet-50 topology locally (`sample_models.zoo.resnet50_size`: ~25.6 M random parameters,
53 BatchNorms, no downloads), saves it into a temporary folder, then times, after one warm-up run each:

* baseline: ``onnx.load(path)`` + ``onnx.save(model, out)``
* bnfold:   ``bnfold.onnx.api.fold_file(path, out)`` — file to file, what `bnfold fold --no-verify` runs
* and, for reference, the in-memory API: ``bnfold.fold_onnx(path)`` + ``onnx.save(folded, out)``

and prints a Markdown table with the medians, the ratio of the first two and the machine. Acceptance:
that ratio is at most 2. A script, not a test: it takes tens of seconds and ~1 GB of memory.
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

from sample_models import zoo  # noqa: E402

LIMIT = 2.0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement, after one warm-up (default 7, at least 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")

    import onnxruntime

    import bnfold
    from bnfold.onnx.api import fold_file as fold_file_api
    from bnfold.report import Status

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/fold_time.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    model = zoo.resnet50_size(seed=args.seed)
    build_s = time.perf_counter() - t0
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)

    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        src = Path(tmp) / "resnet50_size.onnx"
        out = Path(tmp) / "out.onnx"
        onnx.save(model, src)
        size_mb = src.stat().st_size / 1e6
        del model

        def load_save() -> None:
            onnx.save(onnx.load(str(src)), str(out))

        folded_counts: list[int] = []

        def fold_file() -> None:
            report = fold_file_api(src, out)
            folded_counts.append(sum(c.status is Status.FOLDED for c in report.candidates))

        def fold_save() -> None:
            folded, _ = bnfold.fold_onnx(src)
            onnx.save(folded, str(out))

        base, fold, in_memory = _time_interleaved([load_save, fold_file, fold_save], args.runs)
        out_mb = out.stat().st_size / 1e6

    base_med, fold_med, mem_med = statistics.median(base), statistics.median(fold), statistics.median(in_memory)
    ratio = fold_med / base_med
    ok = ratio <= LIMIT
    versions = (
        f"python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {np.__version__}, bnfold {bnfold.__version__}"
    )
    rows = [
        ("model", f"ResNet-50 topology, random weights (seed {args.seed}), built in {build_s:.1f} s"),
        ("parameters", f"{params:,}"),
        ("BatchNormalization nodes", f"{n_bn} ({folded_counts[-1]} folded)"),
        ("file size", f"{size_mb:.1f} MB in, {out_mb:.1f} MB out"),
        ("`onnx.load` + `onnx.save` (median)", f"{base_med:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in base)})"),
        ("`fold_file(path, out)` = `bnfold fold --no-verify` (median)", f"{fold_med:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in fold)})"),
        ("ratio fold / (load+save)", f"{ratio:.2f}× ({'within' if ok else 'OVER'} the {LIMIT:g}× budget)"),
        ("in-memory API: `fold_onnx(path)` + `onnx.save` (median)", f"{mem_med:.3f} s ({mem_med / base_med:.2f}×)"),
        ("runs", f"{args.runs} timed after 1 warm-up, each measurement, interleaved"),
        ("machine", f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.system()}; {versions}"),
        ("command", f"`{command}`"),
    ]
    print("| | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
