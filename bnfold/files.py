"""What bnfold will read and write on a file system it does not trust.

`bnfold check` runs in CI on model files anyone can propose, so every path bnfold opens is one an
attacker may have chosen: a symlink to ``/dev/zero``, a FIFO, a 3 GB file named ``model.onnx``, an output
path that is a device node. This module holds the one policy for all of it, so the commands and the
library cannot disagree:

- input models are read only from regular files of at most `MAX_MODEL_BYTES` (`read_model_bytes`);
- outputs go only to regular files or new paths, through a symlink only in place (`output_target`),
  with the input's permission bits kept or the umask-derived ones for a new file (`output_mode`);
- temporary files carry one prefix (`TEMP_PREFIX`), are recognised by `is_bnfold_temp` (folder scans
  skip them), and are removed on SIGTERM/SIGHUP/SIGINT (`removing_temps_on_signals`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from pathlib import Path
from typing import Iterator

from bnfold.errors import InputError, OutputError

TEMP_PREFIX = ".bnfold-tmp-"
"""Every temporary file or folder bnfold creates beside a user's files starts with this."""

MAX_MODEL_BYTES = 2**31 - 1
"""The largest .onnx file bnfold reads: protobuf cannot parse a larger message, so a larger file is
not a model (weights beyond 2 GB live in external data, which is read tensor by tensor)."""


def is_bnfold_temp(path: str | os.PathLike[str]) -> bool:
    """True for a bnfold temporary file or anything inside a bnfold temporary folder.

    Folder scans (`bnfold check DIR`) must skip these: they are debris of a killed run (SIGKILL cannot
    be caught), not models anyone proposed.
    """
    return any(part.startswith(TEMP_PREFIX) for part in Path(path).parts)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def regular_model_file(path: str | os.PathLike[str], max_bytes: int = MAX_MODEL_BYTES) -> Path:
    """`path` if it names a regular file (a symlink to one counts) of at most `max_bytes`; else `InputError`.

    Checks by `stat` only, opening nothing (a FIFO would block an open). `read_model_bytes` repeats the
    check on the opened file, so a file swapped in between is still caught. This is what folder scans
    should call on every path they find.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read it ({exc.strerror})") from None
    _require_regular(p, st, max_bytes)
    return p


def _require_regular(p: Path, st: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p}: is a directory, not an .onnx file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{p}: is {_kind(st.st_mode)}; bnfold reads models only from regular files")
    if st.st_size > max_bytes:
        raise InputError(
            f"{p}: {st.st_size} bytes, over the {max_bytes}-byte limit for an .onnx file "
            "(protobuf cannot parse more; larger weights belong in external data)"
        )


def read_model_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_MODEL_BYTES) -> bytes:
    """The whole file, read only if it is a regular file of at most `max_bytes` (checked on the open file).

    Opened non-blocking so that a FIFO put in place of the file cannot hang the reader, and checked with
    `fstat` on the descriptor actually read: no window between the check and the read.
    """
    p = regular_model_file(path, max_bytes)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{p}: cannot read it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        _require_regular(p, st, max_bytes)
        # Asked for by the size fstat gave: `read(max_bytes + 1)` allocates a 2 GB buffer first, which
        # cost four times the read itself on a 10 MB model. One byte more tells whether the file grew.
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:  # it grew since fstat: read on, to the limit
            data += fh.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:  # it grew while being read
        raise InputError(f"{p}: over the {max_bytes}-byte limit for an .onnx file")
    return data


def output_target(path: str | os.PathLike[str], *, follow_symlink: bool = False) -> Path:
    """Where an output named `path` is really written, or `OutputError` if bnfold must not write there.

    What exists there must be a regular file: a device node, FIFO, socket or directory is refused, never
    replaced (as root, a rename over ``/dev/null`` replaced the device node). A symlink is followed to
    the file it names only with ``follow_symlink`` — ``--in-place`` on a link, whose target the input
    was read from, folds that file and keeps the link. Otherwise a symlink is refused: in a checkout
    anyone can propose, ``out.onnx -> /etc/...`` must not make a root CI job write through it.
    """
    p = Path(path)
    if p.is_symlink():
        if not follow_symlink:
            raise OutputError(
                f"{p}: is a symlink; bnfold writes only regular files (--in-place folds the file a link points to)"
            )
        p = Path(os.path.realpath(p))
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return p
    except OSError as exc:
        raise OutputError(f"{p}: cannot write there ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{p}: is a directory; give a file name for the output")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{p}: is {_kind(st.st_mode)}; bnfold writes only regular files (or a new path)")
    return p


def current_umask() -> int:
    """The process umask: from /proc where Linux shows it, else by setting and restoring it (POSIX has
    no getter; the set-and-restore is briefly visible to other threads, hence /proc first)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(target: str | os.PathLike[str]) -> int:
    """Permission bits for an output at `target`: the existing file's (in place), else 0666 & ~umask.

    `tempfile.mkstemp` creates 0600 files; renamed into place they would silently make a shared model
    private, or reset 0640 to something else on an in-place fold.
    """
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


class SignalExit(BaseException):
    """Raised in the main thread by a termination signal while bnfold writes, so `finally` blocks
    remove the temporary files; `removing_temps_on_signals` turns it back into the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


CLEANUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))


_deferred: list[int] | None = None
"""While `signals_deferred` runs: the signals that arrived, to be acted on after it."""


def _raise_signal_exit(signum: int, frame: object) -> None:
    if _deferred is not None:
        _deferred.append(signum)
        return
    raise SignalExit(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back the `SignalExit` of a signal arriving during a few renames that must happen together;
    it is raised when they are done. (A signal mask would not do: the kernel may hand the signal to any
    other thread — onnxruntime's pools — and Python then runs the handler in the main thread anyway.)"""
    global _deferred
    outer, _deferred = _deferred, []
    try:
        yield
    except BaseException:
        arrived, _deferred = _deferred, outer
        if arrived:
            raise SignalExit(arrived[0])  # noqa: B904 — the signal wins; the error is chained
        raise
    arrived, _deferred = _deferred, outer
    if arrived:
        raise SignalExit(arrived[0])


@contextlib.contextmanager
def removing_temps_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP/SIGINT into `SignalExit` for the duration, then restore the old handlers.

    The exception unwinds through the writers' ``finally`` blocks, which delete their temporary files;
    the outermost use then re-delivers the signal under the previous handler, so the process ends the
    way it would have (killed by SIGTERM, KeyboardInterrupt for SIGINT). Only default handlers are
    replaced: a signal that was ignored (``nohup``) stays ignored, a program's own handler stays in
    charge (if it raises, the same ``finally`` blocks clean up). Outside the main thread nothing is
    installed (Python allows handlers only there). SIGKILL cannot be caught: its debris keeps the
    `TEMP_PREFIX` name that folder scans skip (`is_bnfold_temp`).
    """
    previous: dict[int, object] = {}
    try:
        for sig in CLEANUP_SIGNALS:
            old = signal.getsignal(sig)
            if old not in (signal.SIG_DFL, signal.default_int_handler, _raise_signal_exit):
                continue  # ignored (nohup), or the program's own handler: it decides, bnfold does not
            signal.signal(sig, _raise_signal_exit)
            previous[sig] = old
    except ValueError:  # not the main thread
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        previous = {}
    try:
        yield
    except SignalExit as exc:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        outer = previous.get(exc.signum)
        if outer is _raise_signal_exit or exc.signum not in previous:
            raise  # an enclosing use re-delivers it
        signal.raise_signal(exc.signum)
        raise  # the previous handler returned (a custom one): stop here all the same
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
