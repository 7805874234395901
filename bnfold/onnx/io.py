"""Reading and writing models without ever losing the user's files.

Loading turns every way a file can be wrong into one `InputError` line. Saving writes into a
temporary folder beside the target and renames into place, so a failure leaves nothing half-written
and the input is never overwritten unless the caller asked for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import InputError, OutputError

PROTOBUF_LIMIT = 2**31 - 1
"""A ModelProto above this size cannot be serialised in one piece: its tensors must go external."""


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data; raise `InputError` with one line on any problem."""
    return load_model_and_layout(path, check=check)[0]


def load_model_and_layout(
    path: str | os.PathLike[str], *, check: bool = True, load_data: bool = True
) -> tuple[onnx.ModelProto, bool]:
    """The model, and whether its file kept tensors in external data (so the output can do the same).

    ``load_data=False`` leaves external tensors where they are — in memory only a reference with an
    absolute location — so a model of any size costs next to no memory until a tensor is read
    (`read_tensor`); `save_model` streams such tensors into the output's data file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an .onnx file")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"{p}: not a readable ONNX model ({_short(exc)})") from None
    except Exception as exc:  # protobuf raises assorted types on random bytes
        raise InputError(f"{p}: not a readable ONNX model ({_short(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InputError(f"{p}: not an ONNX model (no graph; is it truncated or another format?)")
    external = has_external_data(model)
    try:
        if load_data:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        else:
            _absolute_locations(model, p.parent)
    except (FileNotFoundError, OSError) as exc:
        missing = getattr(exc, "filename", None) or _short(exc)
        raise InputError(f"{p}: external data file missing or unreadable: {missing}") from None
    except Exception as exc:
        raise InputError(f"{p}: cannot read external data ({_short(exc)})") from None
    if check and external:  # by path: the checker sees the external files as they are, at any size
        try:
            onnx.checker.check_model(str(p))
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{p}: fails the ONNX checker: {_short(exc)}") from None
    elif check:  # the weights are plain bytes here; checking the structure needs no copy of them
        check_model(model, what=str(p))
    return model, external


def check_model(model: onnx.ModelProto, *, what: str = "model", full: bool = False) -> None:
    """`onnx.checker` as a precondition/postcondition, turned into one `InputError` line.

    The checker runs on the model's skeleton (weights replaced by typed inputs): what can go wrong in
    a graph is in its structure and types, the weights were already parsed by protobuf, and the
    skeleton checks in milliseconds at any size (over 2 GB protobuf would not even serialise the model
    for the checker). Files are also checked whole, by path, when read with external data and when
    written with it.
    """
    model = skeleton(model)
    try:
        onnx.checker.check_model(model, full_check=full)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{what}: fails the ONNX checker: {_short(exc)}") from None
    except onnx.shape_inference.InferenceError as exc:
        raise InputError(f"{what}: fails ONNX shape inference: {_short(exc)}") from None


def model_size(model: onnx.ModelProto) -> int:
    """Serialised size, or an upper-bound estimate where that is cheaper.

    ``ByteSize()`` is a full encode in protobuf's upb backend; the tensors' raw bytes dominate any model
    large enough to matter, so they are summed first and the exact size is asked for only near 2 GB.
    Protobuf refuses to count past 2 GB at all: that case answers "over the limit".
    """
    raw = sum(len(t.raw_data) for t in onnx.external_data_helper._get_all_tensors(model))
    if raw < PROTOBUF_LIMIT // 2:
        return raw
    try:
        return model.ByteSize()
    except Exception:
        return PROTOBUF_LIMIT + 1


def copy_fields(src, dst, skip: tuple[str, ...] = (), where: Callable[[object], bool] | None = None) -> None:
    """Copy every set field of one protobuf message into another, but those named in `skip` (or not `where`)."""
    for field, value in src.ListFields():
        if field.name in skip or (where is not None and not where(field)):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _has_inline_data(t: onnx.TensorProto, n: int) -> bool:
    """False for external references and for the data-less stand-ins of `api.fold_file`."""
    if onnx.external_data_helper.uses_external_data(t):
        return False
    fields = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
    return n == 0 or any(len(getattr(t, f)) for f in fields)


def skeleton(model: onnx.ModelProto, keep_elements: int = 64) -> onnx.ModelProto:
    """The model with every larger main-graph initializer replaced by a typed graph input.

    Shape inference and the full checker need the graph, the types and the small constants (shapes,
    axes), not the weights: on the skeleton they run in milliseconds and at any model size.
    """
    out = onnx.ModelProto()
    copy_fields(model, out, skip=("graph",))
    src, g = model.graph, out.graph
    copy_fields(src, g, skip=("initializer",))
    listed = {i.name for i in src.input}
    for t in src.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= keep_elements and _has_inline_data(t, n):
            g.initializer.append(t)
        elif t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when the file the model came from kept tensors outside the .onnx file."""
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL or t.external_data
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def _absolute_locations(model: onnx.ModelProto, base: Path) -> None:
    """Point every external reference at its file by absolute path (and check that the file is there)."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                full = (base / entry.value).resolve()
                if not full.is_file():
                    raise FileNotFoundError(2, "No such file", str(full))
                entry.value = str(full)


def read_tensor(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, read from its external file if it has one (absolute location)."""
    if not onnx.external_data_helper.uses_external_data(tensor):
        return onnx.numpy_helper.to_array(tensor)
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    with open(info.location, "rb") as fh:
        fh.seek(info.offset or 0)
        data = fh.read(info.length) if info.length else fh.read()
    inline = onnx.TensorProto()
    inline.name, inline.data_type = tensor.name, tensor.data_type
    inline.dims.extend(tensor.dims)
    inline.raw_data = data
    return onnx.numpy_helper.to_array(inline)


def check_writable(path: str | os.PathLike[str], *, overwrite_ok: bool = True) -> Path:
    """Fail early, before any work, when the output cannot be written where asked."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory; give a file name for the output")
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output folder is not writable")
    if target.exists() and not overwrite_ok:
        raise OutputError(f"{target}: exists; refusing to overwrite")
    return target


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    overwrite_ok: bool = True,
    keep_data: bool = True,
    before_commit: Callable[[str], None] | None = None,
    pending: dict[str, np.ndarray] | None = None,
) -> list[Path]:
    """Write atomically: into a temporary folder next to `path`, then rename into place.

    ``external_data=None`` keeps tensors inline unless the model is over 2 GB; ``True`` writes them to
    ``<name>.data`` beside the model. Writing external data empties the tensors of `model`; with
    ``keep_data`` (the default) they are read back so the caller's model stays whole. Tensors that are
    references to another file (`load_model_and_layout(load_data=False)`) are streamed into the new data
    file. ``pending`` holds the values of data-less stand-in initializers (see `api.fold_file`), written
    straight from numpy. ``before_commit(tmp_path)`` runs on the written files before they are renamed into place (the
    fold command verifies there): if it raises, nothing is written. Returns the paths written (model last).
    """
    target = check_writable(path, overwrite_ok=overwrite_ok)
    parent = target.parent
    pending = pending or {}
    too_big = model_size(model) + sum(a.nbytes for a in pending.values()) > PROTOBUF_LIMIT
    if external_data is None:
        external_data = too_big
    elif not external_data and too_big:
        raise OutputError(f"{target}: the model is over 2 GB and cannot be written inline; use external data")
    data_name = target.name + ".data"
    try:
        tmpdir = tempfile.mkdtemp(prefix=".bnfold-", dir=parent)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot write there ({_short(exc)})") from None
    written: list[Path] = []
    try:
        tmp_model = os.path.join(tmpdir, target.name)
        try:
            if external_data:
                _write_with_external_data(model, tmp_model, data_name, keep_data=keep_data, before=before_commit, pending=pending)
            else:
                _materialize(model)
                if pending:
                    _write_streaming(model, tmp_model, pending)
                else:
                    _write_serialized(model, tmp_model)
                if before_commit is not None:
                    before_commit(tmp_model)
        except (OSError, ValueError) as exc:
            raise OutputError(f"{target}: cannot write ({_short(exc)})") from None
        tmp_data = os.path.join(tmpdir, data_name)
        if os.path.exists(tmp_data):
            os.replace(tmp_data, parent / data_name)
            written.append(parent / data_name)
        os.replace(tmp_model, target)
        written.append(target)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


COPY_CHUNK = 64 << 20


def _write_with_external_data(
    model: onnx.ModelProto,
    tmp_model: str,
    data_name: str,
    *,
    keep_data: bool,
    before: Callable[[str], None] | None,
    pending: dict[str, np.ndarray] | None = None,
) -> None:
    """Tensors of 1 KiB or more go to `data_name` beside `tmp_model`; the model itself is left as it was.

    In-memory tensors are written and emptied; referenced ones are copied over in chunks, so peak memory
    stays at one chunk whatever the model's size. Afterwards every tensor gets its old content back.
    """
    ext = onnx.external_data_helper
    restore: list[tuple[onnx.TensorProto, list[tuple[str, str]] | None, int, int, bool]] = []
    data_path = os.path.join(os.path.dirname(tmp_model), data_name)
    with open(data_path, "wb") as out:
        for tensor in ext._get_all_tensors(model):
            if pending and _is_stand_in(tensor, pending):
                offset = _align(out)
                out.write(memoryview(np.ascontiguousarray(pending[tensor.name])).cast("B"))
                _point_to(tensor, data_name, offset, out.tell() - offset)
                restore.append((tensor, None, offset, out.tell() - offset, False))
            elif ext.uses_external_data(tensor):
                info = ext.ExternalDataInfo(tensor)
                offset = _align(out)
                with open(info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    remaining = info.length if info.length else os.path.getsize(info.location) - (info.offset or 0)
                    while remaining > 0:
                        chunk = src.read(min(COPY_CHUNK, remaining))
                        if not chunk:
                            raise OSError(f"{info.location}: shorter than its tensors say")
                        out.write(chunk)
                        remaining -= len(chunk)
                old = [(e.key, e.value) for e in tensor.external_data]
                _point_to(tensor, data_name, offset, out.tell() - offset)
                restore.append((tensor, old, offset, out.tell() - offset, True))
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                had_location = tensor.HasField("data_location")
                offset = _align(out)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
                _point_to(tensor, data_name, offset, out.tell() - offset)
                restore.append((tensor, None, offset, out.tell() - offset, had_location))
    try:
        _write_serialized(model, tmp_model)
        try:  # postcondition, by path: works at any size
            onnx.checker.check_model(tmp_model)
        except onnx.checker.ValidationError as exc:
            raise OutputError(f"the written model fails the ONNX checker: {_short(exc)}") from None
        if before is not None:
            before(tmp_model)
    finally:
        with open(data_path, "rb") as data:
            for tensor, old, offset, length, had_location in restore:
                if old is not None:  # a reference to another file: point it there again
                    del tensor.external_data[:]
                    for key, value in old:
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                elif keep_data:  # an in-memory tensor: read it back
                    del tensor.external_data[:]
                    tensor.ClearField("data_location")
                    if had_location:
                        tensor.data_location = onnx.TensorProto.DEFAULT
                    data.seek(offset)
                    tensor.raw_data = data.read(length)


def _materialize(model: onnx.ModelProto) -> None:
    """Read every tensor that refers to another file into the model, for an inline write."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            data = read_tensor(tensor)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = np.ascontiguousarray(data).tobytes()


def _is_stand_in(tensor: onnx.TensorProto, pending: dict[str, np.ndarray]) -> bool:
    """A data-less initializer whose value waits in `pending`."""
    return (
        tensor.name in pending
        and not tensor.HasField("raw_data")
        and not onnx.external_data_helper.uses_external_data(tensor)
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _split_fields(message, number: int, cls):
    """Two new messages of type `cls`: the fields of `message` numbered below and above `number`."""
    low, high = cls(), cls()
    copy_fields(message, low, where=lambda f: f.number < number)
    copy_fields(message, high, where=lambda f: f.number > number)
    return low, high


# Protobuf tags (field number << 3 | length-delimited) of the fields the streaming writer emits itself.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _tag(number: int) -> bytes:
    return _varint(number << 3 | 2)


def _write_streaming(model: onnx.ModelProto, path: str, pending: dict[str, np.ndarray]) -> None:
    """Serialise `model` with its stand-ins' values written straight from numpy.

    Emits the same bytes as `SerializeToString` would for the model with those values filled in
    (fields in field-number order, the graph and each pending tensor's raw data spliced in at their
    place), without ever holding a second copy of the weights. A test compares the two byte for byte.
    """
    pre, post = _split_fields(model, _MODEL_GRAPH, onnx.ModelProto)
    gpre, gpost = _split_fields(model.graph, _GRAPH_INITIALIZER, onnx.GraphProto)
    pieces: list[bytes | memoryview] = []
    for tensor in model.graph.initializer:
        if _is_stand_in(tensor, pending):
            head, tail = _split_fields(tensor, _TENSOR_RAW_DATA, onnx.TensorProto)
            data = memoryview(np.ascontiguousarray(pending[tensor.name])).cast("B")
            head_b, tail_b = head.SerializeToString(), tail.SerializeToString()
            raw = _tag(_TENSOR_RAW_DATA) + _varint(len(data))
            body = len(head_b) + len(raw) + len(data) + len(tail_b)
            pieces += [_tag(_GRAPH_INITIALIZER) + _varint(body), head_b, raw, data, tail_b]
        else:
            tb = tensor.SerializeToString()
            pieces += [_tag(_GRAPH_INITIALIZER) + _varint(len(tb)), tb]
    gpre_b, gpost_b = gpre.SerializeToString(), gpost.SerializeToString()
    graph_len = len(gpre_b) + sum(len(p) for p in pieces) + len(gpost_b)
    with open(path, "wb") as fh:
        fh.write(pre.SerializeToString())
        fh.write(_tag(_MODEL_GRAPH) + _varint(graph_len))
        fh.write(gpre_b)
        for piece in pieces:
            fh.write(piece)
        fh.write(gpost_b)
        fh.write(post.SerializeToString())


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _align(fh, to: int = 4096) -> int:
    """Start each tensor on a page boundary (onnxruntime can then map it)."""
    pos = fh.tell()
    pad = (-pos) % to
    if pad:
        fh.write(b"\0" * pad)
    return pos + pad


def _write_serialized(model: onnx.ModelProto, path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
