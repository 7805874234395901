"""One progress line on stderr for long work: on a terminal only (quiet in CI logs), never on stdout.

Why not ``click.progressbar``: its ETA divides the time since the bar was *created* by the steps done,
so set-up before the first step (loading models, creating sessions, starting a pool) is charged to the
first steps and the ETA is wrong by minutes (``bnfold bench`` showed 00:16:54 for a 3 s run). Here the
rate is measured from the first step on. The line also appears only after `DELAY_S`, so quick runs
print nothing, and it is redrawn from a thread, so a single long step (folding a 400 MB model) still
shows that time passes.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

DELAY_S = 0.5
"""Nothing is drawn for work that ends sooner."""
REDRAW_S = 0.2


def stderr() -> TextIO:
    """Where progress goes (a function, so tests can stand in a terminal)."""
    return sys.stderr


def wanted(progress: bool | None, quiet: bool = False, stream: TextIO | None = None) -> bool:
    """``--progress`` forces it, ``--no-progress`` and ``-q`` turn it off; by default: on a terminal only."""
    if quiet or progress is False:
        return False
    if progress:
        return True
    stream = stream if stream is not None else stderr()
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``with Progress("checking", total=40, enabled=...) as p: ... p.advance()``; ``p.phase("verifying")``.

    ``total`` None: no count, only the phase and the time spent in it so far.
    """

    def __init__(self, label: str, total: int | None = None, *, enabled: bool, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, delay: float | None = None) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else stderr()
        self.clock = clock
        self.delay = DELAY_S if delay is None else delay
        self.done = 0
        self.started = clock()
        self.phase_started = self.started
        self._first: tuple[float, int] | None = None  # (time, done) at the first step: the rate starts there
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False

    # -- what the work reports -------------------------------------------------------------------
    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._first is None:  # the rate is measured from the end of the first step
                self._first = (self.clock(), self.done)

    def phase(self, label: str) -> None:
        with self._lock:
            self.label = label
            self.phase_started = self.clock()

    # -- what is shown -----------------------------------------------------------------------------
    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the rate measured since the first step; None until there is a rate."""
        now = self.clock() if now is None else now
        if self.total is None or self._first is None:
            return None
        t0, d0 = self._first
        steps = self.done - d0
        if steps <= 0 or now <= t0:
            return None
        return (now - t0) / steps * max(0, self.total - self.done)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        if self.total is None:
            return f"{self.label} … {_clock(now - self.phase_started)}"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta(now)
        left = f"ETA {_clock(eta)}" if eta is not None else "ETA --:--"
        return f"{self.label} {self.done}/{self.total} ({pct:.0f}%) {_clock(now - self.started)} elapsed, {left}"

    def _draw(self) -> None:
        with self._lock:
            text = self.line()
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        while True:
            self._draw()
            if self._stop.wait(REDRAW_S):
                return

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="bnfold-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._drawn:
                self.stream.write("\r\x1b[K")  # leave the terminal as it was: the result follows on stdout
                self.stream.flush()
