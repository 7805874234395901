"""Checking many models in parallel processes, so that ``-j N`` is faster than ``-j 1``.

A small model is checked in ~10 ms, while importing onnx, onnx-graphsurgeon and numpy takes ~0.4 s: a
pool that imports per task, or starts a process per model, is slower than no pool (measured: ``-j 2``
1.06x *slower* than ``-j 1`` on 42 small models). So:

- the pool is started once per run, with at most one worker per model, and not at all for a few MB
  of models in all (`BYTES_PER_WORKER`), where one process is as fast;
- the engine is imported once: in the parent before the pool forks (the workers inherit it for free),
  or once per worker by the initializer where processes are spawned;
- models go to the workers in chunks (about four per worker: few round trips, still balanced when one
  model is much larger than the rest); results come back in the order given.

A worker that dies (killed, out of memory) costs an error entry for each model it had not finished,
never the run.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from typing import Callable, Iterator, Sequence, TypeVar

R = TypeVar("R")

CHUNKS_PER_WORKER = 4
BYTES_PER_WORKER = 1 << 20
"""A worker process is worth starting for about this much model data: below it (a folder of tiny test
models), the check itself takes milliseconds and one process is at least as fast."""


def workers_for(jobs: int, files: Sequence[str]) -> int:
    """``jobs`` (0: one per CPU), never more than there are models, nor than `BYTES_PER_WORKER` warrants."""
    wanted = (os.cpu_count() or 1) if jobs <= 0 else jobs
    total = 0
    for f in files:
        try:
            total += os.path.getsize(f)
        except OSError:
            pass
    return max(1, min(wanted, len(files), total // BYTES_PER_WORKER))


def run_pool(
    fn: Callable[[str], R],
    files: Sequence[str],
    *,
    jobs: int,
    on_error: Callable[[str, str], R],
    on_progress: Callable[[str], None] | None = None,
    warm_up: Callable[[], None] | None = None,
) -> Iterator[R]:
    """``fn(file)`` for every file, in order; in ``jobs`` processes when that is more than one.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one). ``warm_up``
    imports what every call needs, once per process. ``on_error(file, message)`` stands in for a
    result a dead worker never delivered.
    """
    workers = workers_for(jobs, files)
    if warm_up is not None and files:
        warm_up()  # serial: needed anyway; forked workers: inherited, not repeated
    if workers <= 1:
        for f in files:
            yield fn(f)
            if on_progress:
                on_progress(f)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    chunk = max(1, math.ceil(len(files) / (workers * CHUNKS_PER_WORKER)))
    done = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=warm_up if method != "fork" else None) as pool:
        try:
            for result in pool.map(fn, files, chunksize=chunk):
                yield result
                if on_progress:
                    on_progress(files[done])
                done += 1
        except BrokenProcessPool as exc:
            for f in files[done:]:
                yield on_error(f, f"{f}: check failed in a worker process: {exc or 'the process died'}")
                if on_progress:
                    on_progress(f)
