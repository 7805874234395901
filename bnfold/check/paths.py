"""From the command's PATH arguments to model files: files, folders, globs — and what names nothing.

A gate must never pass because its input was not there, so every argument that yields no model comes
back in its place as a `PathError` (the gate turns it into an input error, exit 2): a missing path, a
folder or glob without a model, a broken symbolic link, a FIFO/device/socket (reading one would block
or never end). Folders are walked with their symlinked sub-folders followed once each (a link back up
the tree is a cycle, not an endless walk); bnfold's own temporary files (``.bnfold-*``, left by a fold
that is still running or was killed) are never taken for models.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

GLOB_CHARS = frozenset("*?[")
TEMP_PREFIX = ".bnfold-"
"""Names bnfold gives its temporary files and folders (atomic writes, spills): never models."""
MODEL_SUFFIX = ".onnx"


@dataclass(frozen=True)
class PathError:
    """An argument (or an entry found under it) that cannot be a model, and why, in one line."""

    path: str
    error: str


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str | PathError]:
    """Turn the command's arguments into model files, in order, each once.

    A file named explicitly is taken whatever its suffix; a folder is searched recursively for
    ``*.onnx``; an argument that does not exist but holds ``*``, ``?`` or ``[`` is a glob (``**``
    recurses; symlinked folders are not descended by ``**``). Returns model paths (str) and, in place,
    a `PathError` for each argument that names no model and each entry that cannot be read as one.
    """
    entries: list[str | PathError] = []
    seen: set[str] = set()

    def add(found: Iterable[str | PathError]) -> int:
        n = 0
        for item in found:
            n += 1
            if isinstance(item, PathError):
                entries.append(item)
                continue
            key = os.path.normcase(os.path.realpath(item))
            if key not in seen:
                seen.add(key)
                entries.append(item)
        return n

    for arg in paths:
        raw = os.fspath(arg)
        kind = _kind(raw)
        if kind == "dir":
            if not add(_walk(raw)):
                entries.append(PathError(raw, f"{raw}: no *.onnx file in this directory"))
        elif kind is not None or not (GLOB_CHARS & set(raw)):
            add([_named(raw, kind)])
        elif not add(_glob(raw)):
            entries.append(PathError(raw, f"{raw}: the pattern matches no model"))
    return entries


def _kind(path: str) -> str | None:
    """'dir', 'file', 'broken-link', or a non-regular file's kind; None when nothing is there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken-link" if os.path.islink(path) else None
    except OSError:
        return "unreadable"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(st.st_mode):
            return name
    return "not a regular file"


def _named(path: str, kind: str | None) -> str | PathError:
    """A path that is not a folder: the model itself, or why it cannot be one."""
    if kind == "file":
        return path
    if kind is None:
        return PathError(path, f"{path}: no such file or directory")
    if kind == "broken-link":
        return PathError(path, f"{path}: broken symbolic link (its target {os.readlink(path)!r} does not exist)")
    if kind == "unreadable":
        return PathError(path, f"{path}: cannot be read (permission denied or a symlink loop)")
    return PathError(path, f"{path}: not a regular file ({kind}); a model must be a regular file")


def _walk(root: str) -> Iterator[str | PathError]:
    """Every ``*.onnx`` under ``root``, sorted, symlinked folders followed once each (cycles cut)."""
    visited: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:  # reached again through a symlink: a cycle or a duplicate
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(TEMP_PREFIX))
        for name in sorted(files):
            if name.startswith(TEMP_PREFIX) or not name.endswith(MODEL_SUFFIX):
                continue
            path = os.path.join(folder, name)
            yield _named(path, _kind(path))
        # os.walk lists a broken link to a folder as a file, and a link to a folder as a folder: both handled.


def _glob(pattern: str) -> Iterator[str | PathError]:
    """Matches of a glob; a folder that matches is searched like a folder argument.

    pathlib's ``**`` does not descend symlinked folders, so a link cycle cannot make it endless; hidden
    names (``.x``) match only where the pattern spells the dot, as with the shell.
    """
    parts = Path(pattern).parts
    first = next(i for i, p in enumerate(parts) if GLOB_CHARS & set(p))
    root = Path(*parts[:first]) if first else Path(".")
    rest = parts[first:]
    explicit_dot = any(p.startswith(".") for p in rest)
    try:
        matches = sorted(root.glob(str(Path(*rest))))
    except (OSError, ValueError):
        matches = []
    for match in matches:
        rel = match.relative_to(root).parts
        if any(p.startswith(TEMP_PREFIX) for p in rel) or (not explicit_dot and any(p.startswith(".") for p in rel)):
            continue
        path = str(match)
        kind = _kind(path)
        if kind == "dir":
            yield from _walk(path)
        else:
            yield _named(path, kind)
