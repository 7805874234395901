"""Where folded tensors live until the model is written, and how they are written: one place for both.

The pass makes one `TensorStore` per run that rewrites a model (`api.fold_onnx`, `api.fold_file`; a
check makes none, it writes nothing). `GraphEdit.write_params` hands it each folded value (`hold`),
the write-back of the folds into the model (`writeback.py`) has it write each folded constant there
(`write`), and `fold_file` asks it to write that model (`save`). A value is held one of three ways:

* in memory, as a numpy array (the default);
* in a spill file (`Spill`), when the input keeps its weights in external data: large folded values
  leave memory as soon as they are computed, so a model of any size folds in bounded memory;
* pending: after the write-back the model holds data-less stand-ins and the arrays wait in
  `TensorStore.pending`, to go from numpy straight into the output file, never copied into a protobuf.

and written one of three ways by `save_model` (which `io.commit` then renames into place):

* inline, by one ``SerializeToString``, when nothing is pending (the in-memory API's models);
* inline, streamed (`_write_streaming`): the bytes ``SerializeToString`` would give with the pending
  arrays filled in, each spliced in at its place by a hand-written protobuf wire encoder, so no second
  copy of the weights is ever made. Measured on MobileNetV2 (14 MB), it is also faster than filling the
  stand-ins and serialising once (that copies each weight three times: ``tobytes``, into the message,
  into the encoded string), so it is used at every size;
* with external data (`_write_with_external_data`): tensors go to a page-aligned data file, those
  that already live in another file (input data, the spill) copied over in bounded chunks.

Why not onnx-ir (1.1.0 tried): its lazy tensors and ``onnx_ir.save(model, path, external_data=...)``
would replace `Spill`, the pending arrays and both streaming writers — it writes each tensor from
wherever it lives. Rejected for now because (1) the pass rewrites an onnx-graphsurgeon graph, so
onnx-ir would be a second in-memory IR with a conversion each way on every run: per-node work, the
kind that already dominates small models; (2) its output is not byte-identical to ``onnx.save`` of
the same model (``onnx_ir.load`` + ``onnx_ir.save`` of MobileNetV2 differs), while bnfold writes
exactly ``SerializeToString``'s bytes (a test compares them) and a second fold of the same file is
byte-identical; (3) it writes to the final path, while every write here goes to a temporary folder
and is committed in two renames (`io.commit`) under data-file names bnfold owns
(`io.data_file_name`); (4) its loader refuses a ``..`` location (tried), but bnfold's own checks on
reading (`io.external_data_files`: symlinked folders, FIFOs, dims against byte ranges, tested in
tests/test_hostile.py) would still have to run first. Worth revisiting if the pass itself moves from
onnx-graphsurgeon to onnx-ir.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx as _dtype_to_onnx

from bnfold import files
from bnfold.affine import StandIn
from bnfold.errors import OutputError
from bnfold.onnx import io
from bnfold.onnx.io import _short

PENDING_BYTES = 1 << 12
"""Folded arrays from this size up wait in `TensorStore.pending` (`fold_file`) instead of being copied
into the model (``tobytes`` and again into the message). Where exactly does not matter: pending from 0,
4 KiB or 64 KiB up timed the same within noise on MobileNetV2, ShuffleNetV2 and ResNet-50 `fold_file`,
while pending nothing cost +6, +7 and +190 ms (61, 58 and 250 ms runs)."""

COPY_CHUNK = 64 << 20
"""How much of another file's tensor is copied at a time into a new data file (bounds peak memory)."""


class Spill:
    """An append-only file of folded weights, so a model of any size folds in bounded memory.

    Each weight is written as soon as it is folded and kept in the graph as a reference (absolute path,
    offset, length); `save_model` streams it into the output's data file.
    """

    MIN_BYTES = 1 << 16

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh = open(path, "wb")

    def add(self, values: np.ndarray, name: str) -> onnx.TensorProto:
        proto = onnx.numpy_helper.from_array(values[:0].reshape(0), name)  # dtype only
        del proto.dims[:]
        proto.dims.extend(values.shape)
        offset = self._fh.tell()
        self._fh.write(np.ascontiguousarray(values).tobytes())
        self._fh.flush()
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path), ("offset", str(offset)), ("length", str(values.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        proto.ClearField("raw_data")
        return proto

    def close(self) -> None:
        self._fh.close()


class TensorStore:
    """The folded values of one run of the pass: how they are held, and the writing of the model.

    ``spill_dir``: a folder for a spill file (`Spill`): large folded values go there as they are
    computed (the caller keeps the folder until the model is saved). ``pending``: `write` leaves large
    numpy values of main-graph initializers in `self.pending` behind data-less stand-ins, for `save` to
    stream; without it they are written into the model (what `fold_onnx` returns must be whole).
    """

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None, *, pending: bool = False) -> None:
        self.pending: dict[str, np.ndarray] | None = {} if pending else None
        self._spill = None
        if spill_dir is not None:
            self._spill = Spill(os.path.join(os.fspath(spill_dir), "bnfold-folded-weights.bin"))

    def hold(self, values: np.ndarray | gs.ir.tensor.LazyValues | StandIn, name: str):
        """A folded value as the graph should hold it: in memory, or — with a spill file — on disk.

        A value already held is returned as it is, so a second run of the same edit (the real apply
        after the planning rehearsal) holds the same object, spilled once.
        """
        values = in_memory(values)
        if self._spill is not None and not isinstance(values, (gs.ir.tensor.LazyValues, StandIn)) and values.nbytes >= Spill.MIN_BYTES:
            return gs.ir.tensor.LazyValues(self._spill.add(values, name))
        return values  # large ones are written straight into the output (`write`)

    def close(self) -> None:
        """No more values to hold: close the spill file (its references stay valid until the folder goes)."""
        if self._spill is not None:
            self._spill.close()

    def write(self, constant: gs.Constant, into: onnx.TensorProto, *, may_pend: bool = False) -> None:
        """Write a folded constant into `into` (an initializer of the model being written).

        ``may_pend``: `into` is a main-graph initializer (the only ones `_write_streaming` fills), so a
        large array may wait in `pending` behind a data-less stand-in, when this store keeps pending
        arrays; otherwise the value is written into `into` (`write_value`).
        """
        values = constant._values
        if may_pend and self.pending is not None and isinstance(values, np.ndarray) and values.nbytes >= PENDING_BYTES:
            array = np.ascontiguousarray(values)
            into.Clear()
            into.name = constant.name
            into.data_type = _onnx_type(array.dtype)
            into.dims.extend(array.shape)
            self.pending[constant.name] = array
            return
        write_value(constant, into)

    def save(self, model: onnx.ModelProto, path: str | os.PathLike[str], **options) -> list[Path]:
        """`save_model` with this store's pending values."""
        return save_model(model, path, pending=self.pending, **options)


def in_memory(values):
    """A folded value held in memory (without a store, as a check's plan holds it); one already held stays."""
    if isinstance(values, (gs.ir.tensor.LazyValues, StandIn)):  # a stand-in (check) stays one element
        return values
    return np.ascontiguousarray(values)


_ONNX_TYPES: dict[np.dtype, int] = {}


def _onnx_type(dtype: np.dtype) -> int:
    """onnx-graphsurgeon's dtype → ONNX element type (bfloat16 and float8 included), memoised: it builds
    a table on every call (~5 µs, once per folded tensor)."""
    found = _ONNX_TYPES.get(dtype)
    if found is None:
        found = _ONNX_TYPES[dtype] = _dtype_to_onnx(dtype)
    return found


def write_value(constant: gs.Constant, into: onnx.TensorProto) -> None:
    """A constant's value as a TensorProto, written into `into`: a spilled value (a `LazyValues`) as its
    reference, an array as its raw bytes (one copy). Never writes the tensor the value came from."""
    values = constant._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        into.CopyFrom(values.tensor)
    else:
        array = np.ascontiguousarray(values)
        into.Clear()
        into.data_type = _onnx_type(array.dtype)
        into.dims.extend(array.shape)
        into.raw_data = array.tobytes()  # little-endian, as ONNX stores raw data
    into.name = constant.name


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    overwrite_ok: bool = True,
    keep_data: bool = True,
    before_commit: Callable[[str], None] | None = None,
    pending: dict[str, np.ndarray] | None = None,
    protect: Collection[str] = (),
    force: bool = False,
) -> list[Path]:
    """Write atomically: into a temporary folder next to `path`, then rename into place (`io.commit`).

    ``external_data=None`` keeps tensors inline unless the model is over 2 GB; ``True`` writes them to a
    data file beside the model (`io.data_file_name`). Writing external data empties the tensors of `model`;
    with ``keep_data`` (the default) they are read back so the caller's model stays whole. Tensors that
    are references to another file (`io.load_model_and_layout(load_data=False)`) are streamed into the new
    data file. ``pending`` holds the values of data-less stand-in initializers (`TensorStore`),
    written straight from numpy. ``before_commit(tmp_path)`` runs on the written files before they are
    renamed into place (the fold command verifies there): if it raises, nothing is written.
    ``protect``: resolved paths of files the input model reads, never overwritten without ``force``.
    The temporary folder (`files.TEMP_PREFIX`) is removed on SIGTERM/SIGHUP/SIGINT too.
    Returns the paths written (model last).
    """
    target = io.check_writable(path, overwrite_ok=overwrite_ok)
    parent = target.parent
    pending = pending or {}
    too_big = io.model_size(model) + sum(a.nbytes for a in pending.values()) > io.PROTOBUF_LIMIT
    if external_data is None:
        external_data = too_big
    elif not external_data and too_big:
        raise OutputError(f"{target}: the model is over 2 GB and cannot be written inline; use external data")
    old_refs = io.referenced_data(target)
    data_name = io.data_file_name(target, protect=protect, force=force, old_refs=old_refs) if external_data else None
    mode = files.output_mode(target)
    with files.removing_temps_on_signals():
        try:
            tmpdir = tempfile.mkdtemp(prefix=files.TEMP_PREFIX, dir=parent)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot write there ({_short(exc)})") from None
        try:
            tmp_model = os.path.join(tmpdir, target.name)
            try:
                if data_name is not None:
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
            tmp_data = os.path.join(tmpdir, data_name) if data_name is not None else None
            return io.commit(tmp_model, tmp_data, target, mode, old_refs, protect)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


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
        out.write(io.DATA_MAGIC)  # tensors are page-aligned, so they start at 4096 all the same
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
                    remaining = (info.length if info.length is not None  # 0 is a length (an empty tensor)
                                 else os.path.getsize(info.location) - (info.offset or 0))
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
            data = io.read_tensor(tensor)
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


# The streaming writer encodes by hand the few protobuf wire pieces it splices in (a length-delimited
# field's tag and length): protobuf's Python API can only serialise a whole message, so writing a
# pending array into the file without first copying it into a TensorProto needs these.


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
    io.copy_fields(message, low, where=lambda f: f.number < number)
    io.copy_fields(message, high, where=lambda f: f.number > number)
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
