"""Where `fold_file` and `check_onnx` spend their time, phase by phase, on the `fold_time.py` models.

    python benchmarks/fold_phases.py [--models shufflenet_v2,mobilenet_v2] [--runs 30] [--seed 0]

`fold_time.py` says how the whole compares with `onnx.load` + `onnx.save`; this says what the whole is
made of. Each phase is one function of the pass, wrapped for the run with a timer that charges the time
to the innermost phase running (so the checker inside the postcondition counts as checker, not twice):

* parse: `io._parse` (reading the file and protobuf's parse)
* load safety checks: `io.model_tensors`, `io.check_tensor_sizes`, `io.external_data_files`
* checker: `io.check_model` (the precondition's basic check and the postcondition's full one, on skeletons)
* counts: `api._counts` (nodes and parameters for the report)
* graph import: `api.import_model` (`bnfold/onnx/graph_import.py`)
* planning: `api.plan_model` (the rules; in a fold, the plan is applied as it is made)
* write-back: `api.write_back` (the folds into the loaded ModelProto)
* writing: `storage.TensorStore.save` (serialising, the file, the rename), less its fsyncs
* fsync: `io._fsync` (the output before its rename, its folder after)
* other: the rest of the call

Medians over ``--runs`` runs after one warm-up, `gc.collect()` before each (as `fold_time.py`). The
wrappers cost about a microsecond a call, a few dozen calls a run. A script, not a test.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `sample_models` lives at the repo root
    sys.path.insert(0, str(ROOT))

from sample_models.sizes import SIZES  # noqa: E402

PHASES = [
    ("parse", "io", "_parse"),
    ("load safety checks", "io", "model_tensors"),
    ("load safety checks", "io", "check_tensor_sizes"),
    ("load safety checks", "io", "external_data_files"),
    ("checker", "io", "check_model"),
    ("counts", "api", "_counts"),
    ("graph import", "api", "import_model"),
    ("planning", "api", "plan_model"),
    ("write-back", "api", "write_back"),
    ("writing", "TensorStore", "save"),
    ("fsync", "io", "_fsync"),
]


class PhaseTimer:
    """Charges wall time to the innermost wrapped phase running; what no phase covers is "other"."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [phase, start, time charged to phases inside it]

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._stack.append([phase, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, start, inner = self._stack.pop()
                took = time.perf_counter() - start
                self.spent[phase] += took - inner
                if self._stack:
                    self._stack[-1][2] += took
        return timed


def _instrument(timer: PhaseTimer) -> None:
    from bnfold.onnx import api, io
    from bnfold.onnx.storage import TensorStore

    owners = {"io": io, "api": api, "TensorStore": TensorStore}
    for phase, owner, name in PHASES:
        setattr(owners[owner], name, timer.wrap(phase, getattr(owners[owner], name)))


def _runs(fn: Callable[[], object], timer: PhaseTimer, runs: int) -> dict[str, float]:
    """Median seconds per phase (and "total", "other") over `runs` calls of `fn`."""
    fn()
    per_run: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        gc.collect()
        timer.spent.clear()
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
        for phase in {p for p, _, _ in PHASES}:
            per_run[phase].append(timer.spent.get(phase, 0.0))
        per_run["other"].append(total - sum(timer.spent.values()))
        per_run["total"].append(total)
    return {phase: statistics.median(ts) for phase, ts in per_run.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shufflenet_v2,mobilenet_v2", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per call, after one warm-up (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SIZES]
    if unknown or not keys:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(SIZES)}")

    timer = PhaseTimer()
    _instrument(timer)
    from bnfold.onnx.api import check_onnx, fold_file

    columns: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-phases-") as tmp:
        for key in keys:
            src, out = Path(tmp) / f"{key}.onnx", Path(tmp) / f"{key}.out.onnx"
            onnx.save(SIZES[key](seed=args.seed), src)
            columns.append((f"{key} check", _runs(lambda: check_onnx(src), timer, args.runs)))
            columns.append((f"{key} fold", _runs(lambda: fold_file(src, out), timer, args.runs)))
    rows = list(dict.fromkeys(p for p, _, _ in PHASES)) + ["other", "total"]
    print("| phase | " + " | ".join(name for name, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for phase in rows:
        print(f"| {phase} | " + " | ".join(f"{1e3 * col.get(phase, 0.0):.2f} ms" for _, col in columns) + " |")
    print(f"\nMedians of {args.runs} runs after 1 warm-up, gc.collect() before each; seed {args.seed}. "
          f"Command: `python benchmarks/fold_phases.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
