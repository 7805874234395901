"""Seeded inputs built from a model's signature, or the user's own from an .npz file.

A symbolic dimension takes 1 unless `--shape name:1x3x224x224` (or `batch`) says otherwise. Inputs come
in several distributions — standard normal, uniform in [-1, 1], and one of large magnitude — because a
fold that is only wrong for negative or large inputs must still be caught.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.errors import InputError, UsageError

DISTRIBUTIONS = ("normal", "uniform", "large")

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


@dataclass
class InputSpec:
    """One input to feed: the concrete shape to generate, and the shape the model declares (an int is a
    fixed dimension, a str or None a free one) so that user-given arrays can be checked against it."""

    name: str
    shape: list[int]
    dtype: np.dtype
    declared: tuple[int | str | None, ...] | None = None


def parse_shapes(specs: tuple[str, ...] | list[str] | None) -> dict[str, list[int]]:
    """`["input:1x3x224x224", "mask:1x224"]` → {name: [dims]}; a one-line `UsageError` when malformed."""
    out: dict[str, list[int]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            if not dims.isascii() or not all(d.isdigit() for d in dims.lower().split("x")):
                raise ValueError
            out[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise UsageError(f"--shape {spec!r}: expected NAME:D1xD2x… (e.g. input:1x3x224x224)") from None
    return out


def input_specs(session, shapes: dict[str, list[int]] | None = None, batch: int | None = None) -> list[InputSpec]:
    """The inputs an onnxruntime session expects, with every dimension made concrete."""
    shapes = shapes or {}
    specs = []
    for arg in session.get_inputs():
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise UsageError(f"input '{arg.name}' has type {arg.type}, which bnfold cannot generate; pass --inputs")
        declared = tuple(d if isinstance(d, int) and d >= 0 else (d or None) for d in (arg.shape or []))
        if arg.name in shapes:
            dims = shapes[arg.name]
            if arg.shape and len(dims) != len(arg.shape):
                raise UsageError(f"--shape {arg.name}: {len(dims)} dims given, the model expects {len(arg.shape)}")
            for i, (want, have) in enumerate(zip(dims, declared)):
                if isinstance(have, int) and want != have:
                    raise UsageError(
                        f"--shape {arg.name}: dimension {i} is {want}, but the model fixes it at {have} "
                        f"({_fmt(declared)})"
                    )
        else:
            dims = []
            for i, d in enumerate(arg.shape or []):
                if isinstance(d, int) and d >= 0:
                    dims.append(d)  # a fixed dimension stays, batch included
                else:
                    dims.append(batch if (i == 0 and batch is not None) else 1)
        specs.append(InputSpec(arg.name, dims, np.dtype(dtype), declared))
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise UsageError(f"--shape names no input of the model: {', '.join(sorted(unknown))}")
    return specs


def random_feeds(specs: list[InputSpec], trial: int, seed: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    """Trial `trial`'s inputs: the distribution cycles through DISTRIBUTIONS, the seed fixes the values."""
    dist = DISTRIBUTIONS[trial % len(DISTRIBUTIONS)]
    rng = np.random.default_rng([seed, trial])
    feeds = {}
    for spec in specs:
        shape = tuple(spec.shape)
        _check_allocatable(spec)
        if spec.dtype == np.bool_:
            feeds[spec.name] = rng.random(shape) < 0.5
        elif spec.dtype == np.object_:  # string tensors: a few words, the empty string among them
            words = np.array(["", "a", "bn", "fold"], dtype=object)
            feeds[spec.name] = words[rng.integers(0, len(words), size=shape)]
        elif np.issubdtype(spec.dtype, np.integer):
            info = np.iinfo(spec.dtype)
            lo, hi = max(info.min, -8), min(info.max, 8)
            feeds[spec.name] = rng.integers(lo, hi, size=shape, endpoint=True).astype(spec.dtype)
        else:
            if dist == "normal":
                x = rng.standard_normal(shape)
            elif dist == "uniform":
                x = rng.uniform(-1.0, 1.0, shape)
            else:
                scale = 30.0 if spec.dtype == np.float16 else 100.0  # large, yet far from fp16's 65504 ceiling
                x = rng.standard_normal(shape) * scale
            feeds[spec.name] = x.astype(spec.dtype)
    return dist, feeds


def _check_allocatable(spec: InputSpec) -> None:
    """A fixed dimension of 10^12 (a broken export, or a model meant for other inputs) must be a one-line
    error, not a MemoryError traceback or a machine swapping: refuse an input that would take more than
    half of this machine's memory (generated in float64 first, then cast)."""
    count = 1
    for d in spec.shape:
        count *= int(d)
    need = count * max(8, spec.dtype.itemsize)
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform says
        avail = 1 << 40
    if need > avail // 2:
        raise InputError(
            f"input '{spec.name}' of shape {_fmt(spec.shape)} would need {need / 2**30:,.0f} GiB to generate "
            f"(this machine has {avail / 2**30:,.0f} GiB); give smaller dimensions with --shape, or --inputs"
        )


def load_npz(path: str | os.PathLike[str], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """The user's inputs (``np.savez(path, input=x, ...)``), checked against the model's signature.

    Every input must be there and nothing else (an unknown name is most likely a typo), with the
    declared rank and fixed dimensions, and a dtype of the same kind: a float64 array for a float32
    input is cast once (both models get the same cast values), an int64 array for it is refused.
    Caught here, a mismatch is a one-line error instead of an onnxruntime traceback.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npz file ({exc})") from None
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"{p}: lacks the model input(s) {', '.join(missing)} (has {', '.join(arrays) or 'nothing'})")
    extra = sorted(set(arrays) - {s.name for s in specs})
    if extra:
        raise InputError(
            f"{p}: {', '.join(extra)} is not an input of the model (inputs: {', '.join(s.name for s in specs)})"
        )
    out = {}
    for s in specs:
        a = np.asarray(arrays[s.name])
        declared = s.declared if s.declared is not None else tuple(s.shape)
        if len(a.shape) != len(declared) or any(isinstance(d, int) and d != n for d, n in zip(declared, a.shape)):
            raise InputError(f"{p}: '{s.name}' has shape {_fmt(a.shape)}, the model expects {_fmt(declared)}")
        if _kind(a.dtype) != _kind(s.dtype):
            raise InputError(f"{p}: '{s.name}' is {a.dtype}, the model expects {_type_name(s.dtype)}")
        out[s.name] = a.astype(s.dtype, copy=False)
    return out


def _kind(dt: np.dtype) -> str:
    """Families a cast may stay within: float, integer, bool, string."""
    return {"f": "float", "i": "int", "u": "int", "b": "bool", "U": "str", "S": "str", "O": "str"}.get(dt.kind, dt.kind)


def _type_name(dt: np.dtype) -> str:
    return "string" if dt == np.object_ else dt.name


def _fmt(shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"
