"""Reading models safely, and committing written ones without ever losing the user's files.

Loading turns every way a file can be wrong into one `InputError` line. Writing (`bnfold.onnx.storage`)
goes into a temporary folder beside the target; `commit` renames it into place, so a failure leaves
nothing half-written, and the names settled here (`check_writable`, `data_file_name`) keep the input
from being overwritten unless the caller asked for it.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, NamedTuple

import numpy as np
import onnx

from bnfold import files
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
    (`read_tensor`); `storage.save_model` streams such tensors into the output's data file.

    The file may be hostile (`bnfold check` runs in CI on proposed models): it is read only if it is a
    regular file within protobuf's size limit (`files.read_model_bytes`); every tensor's data must match
    its dims; external data is read only from regular files inside the model's folder
    (`external_data_files`), all of it checked before any byte of it is read.
    """
    loaded = load_checked(path, check=check, load_data=load_data)
    return loaded.model, loaded.external


class Loaded(NamedTuple):
    """A model file as `load_checked` read it."""

    model: onnx.ModelProto
    external: bool  # its file kept tensors in external data
    skeleton: onnx.ModelProto | None  # what the checker ran on (None where it checked by path)
    data_files: set[str]  # the resolved external data files it reads (`external_data_files`)


def load_checked(path: str | os.PathLike[str], *, check: bool = True, load_data: bool = True) -> Loaded:
    """`load_model_and_layout`, plus the skeleton the checker ran on and the data files the model reads.

    The pass hands that skeleton on to shape inference (`api.infer_shapes`): building it walks every
    node, which on a 10 MB model costs as much as a tenth of reading the file. `fold_file` protects the
    data files from being overwritten.
    """
    p = Path(path)
    model = _parse(p)
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InputError(f"{p}: not an ONNX model (no graph; is it truncated or another format?)")
    tensors = model_tensors(model)
    external = tensors.external
    check_tensor_sizes(model, what=str(p), tensors=tensors)
    data_files = external_data_files(model, p, absolute=True, tensors=tensors)
    if load_data:
        _load_external(model)
    if check and external:  # by path: the checker sees the external files as they are, at any size
        try:
            onnx.checker.check_model(str(p))
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{p}: fails the ONNX checker: {_short(exc)}") from None
        except Exception as exc:  # the checker's own loader on a file it dislikes
            raise InputError(f"{p}: fails the ONNX checker: {_short(exc)}") from None
    elif check:  # the weights are plain bytes here; checking the structure needs no copy of them
        return Loaded(model, external, check_model(model, what=str(p)), data_files)
    return Loaded(model, external, None, data_files)


def check_external_data(path: str | os.PathLike[str]) -> None:
    """Refuse a model file whose external data lies outside its folder, before another reader opens it.

    onnxruntime reads external data by itself; `bnfold.sessions` calls this before handing it a path,
    so `verify` and `bench` apply the same rule as `fold` and `check`.
    """
    p = Path(path)
    model = _parse(p)
    tensors = model_tensors(model)
    check_tensor_sizes(model, what=str(p), tensors=tensors)
    external_data_files(model, p, absolute=False, tensors=tensors)


def _parse(p: Path) -> onnx.ModelProto:
    """The ModelProto in file `p` (a regular file within the size limit), without external data."""
    data = files.read_model_bytes(p)
    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises assorted types (DecodeError, RuntimeError...) on random bytes
        raise InputError(f"{p}: not a readable ONNX model ({_short(exc)})") from None


def check_model(model: onnx.ModelProto, *, what: str = "model", full: bool = False) -> onnx.ModelProto:
    """`onnx.checker` as a precondition/postcondition, turned into one `InputError` line.

    The checker runs on the model's skeleton (weights replaced by typed inputs): what can go wrong in
    a graph is in its structure and types, the weights were already parsed by protobuf, and the
    skeleton checks in milliseconds at any size (over 2 GB protobuf would not even serialise the model
    for the checker). Files are also checked whole, by path, when read with external data and when
    written with it. Returns the skeleton (the checker does not change it), for reuse.
    """
    model = skeleton(model)
    try:
        onnx.checker.check_model(model, full_check=full)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{what}: fails the ONNX checker: {_short(exc)}") from None
    except onnx.shape_inference.InferenceError as exc:
        raise InputError(f"{what}: fails ONNX shape inference: {_short(exc)}") from None
    return model


DATA_PROP_MAX_ELEMENTS = 1 << 16
"""The longest 1-D input a data-propagating op may have for `infer_shapes(data_prop=True)` to run."""
DATA_PROP_OPS = {"Add", "Sub", "Mul", "Cast", "Concat", "Gather", "Slice", "Squeeze", "Unsqueeze", "Size"}
"""The ops whose data propagation materialises a 1-D input as a list of dims (measured on onnx 1.23:
with a [10^8] input each of these ran out of a 3 GB address space; Identity, Reshape, Expand, Tile,
Neg, Div, Where and the like did not). Rank ≥ 2 inputs are never materialised."""


def data_prop_is_bounded(inferred: onnx.ModelProto) -> bool:
    """Whether shape inference with ``data_prop=True`` is safe on this model (given the result without it).

    Data propagation turns the 1-D inputs of some ops (`DATA_PROP_OPS`) into lists of dims in memory, at
    whatever length the graph declares: Slice of ConstantOfShape([10^12]) — a 463-byte model — exhausted
    memory, and so does a Slice of a graph input declared ``[10^9]``. Safe when every 1-D input of those
    ops has a known length of at most `DATA_PROP_MAX_ELEMENTS`. An unknown length counts as unsafe (data
    propagation could find it to be huge: Expand(1, Shape(x) * 10^9) → Slice); an input of unknown rank
    stays unknown with data propagation too. Real shape arithmetic has a handful of elements.
    """
    graphs, nodes = [inferred.graph], []
    types: dict[str, onnx.TypeProto] = {}
    while graphs:
        g = graphs.pop()
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            types[vi.name] = vi.type
        for node in g.node:
            nodes.append(node)
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    for node in nodes:
        if node.op_type not in DATA_PROP_OPS:
            continue
        for name in node.input:
            tt = types[name].tensor_type if name in types else None
            if tt is None or not tt.HasField("shape") or len(tt.shape.dim) != 1:
                continue
            dim = tt.shape.dim[0]
            if not dim.HasField("dim_value") or dim.dim_value > DATA_PROP_MAX_ELEMENTS:
                return False
    return True


def model_size(model: onnx.ModelProto) -> int:
    """Serialised size, or an upper-bound estimate where that is cheaper.

    ``ByteSize()`` is a full encode in protobuf's upb backend; the tensors' raw bytes dominate any model
    large enough to matter, so they are summed first and the exact size is asked for only near 2 GB.
    Each tensor's bytes are counted from its dims and type (`tensor_bytes`): ``len(t.raw_data)`` would
    copy every tensor's bytes out of protobuf. Protobuf refuses to count past 2 GB at all: that case
    answers "over the limit".
    """
    raw = 0
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.HasField("raw_data"):
            size = tensor_bytes(t)
            raw += size if size is not None else len(t.raw_data)
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
        dims = t.dims
        if math.prod(dims) <= keep_elements and _has_inline_data(t, math.prod(dims)):
            g.initializer.append(t)
        elif t.name not in listed:
            # built field by field: `helper.make_tensor_value_info` validates its arguments, which took
            # twice as long, and these come from a parsed tensor already
            vi = g.input.add()
            vi.name = t.name
            tensor_type = vi.type.tensor_type
            tensor_type.elem_type = t.data_type
            shape = tensor_type.shape.dim
            for d in dims:
                shape.add().dim_value = d
    return out


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when the file the model came from kept tensors outside the .onnx file."""
    return model_tensors(model).external


@dataclass
class ModelTensors:
    """Every tensor of a model, found in one walk: what the safety checks of a load look at.

    ``dense``: initializers of every graph and tensor attributes of every node (subgraphs and local
    functions included) — what onnx's `_get_all_tensors` yields. ``sparse``: the values
    and indices of sparse initializers and sparse attributes, which it leaves out and onnxruntime
    reads all the same. ``external``: some dense tensor keeps its data in another file.
    """

    dense: list[onnx.TensorProto]
    sparse: list[onnx.TensorProto]
    external: bool


def model_tensors(model: onnx.ModelProto) -> ModelTensors:
    """`ModelTensors` of `model`.

    Written as one walk because the load's three checks (layout, sizes, external references) each
    walked every node's attributes through onnx's generators, plus two walks for sparse tensors: on a
    10 MB model those five walks cost a fifth of reading the file. Reading an attribute builds a Python
    object per field, so each attribute is looked at once, by its type.
    """
    A = onnx.AttributeProto
    dense: list[onnx.TensorProto] = []
    sparse: list[onnx.TensorProto] = []
    attr_dense: list[onnx.TensorProto] = []
    graphs: list = [model.graph]
    bodies: list = []  # graphs and functions whose node attributes are walked
    i = 0
    while i < len(graphs):  # initializers first, graph by graph (onnx's order), subgraphs found on the way
        g = graphs[i]
        i += 1
        dense.extend(g.initializer)
        for sp in g.sparse_initializer:
            sparse.extend((sp.values, sp.indices))
        bodies.append(g)
        for node in g.node:
            for attr in node.attribute:
                kind = attr.type
                if kind == A.GRAPH or attr.HasField("g"):
                    graphs.append(attr.g)
                if kind == A.GRAPHS or len(attr.graphs):
                    graphs.extend(attr.graphs)
    bodies.extend(model.functions)
    for body in bodies:
        for node in body.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    attr_dense.append(attr.t)
                if len(attr.tensors):
                    attr_dense.extend(attr.tensors)
                if attr.HasField("sparse_tensor"):
                    sparse.extend((attr.sparse_tensor.values, attr.sparse_tensor.indices))
                for sp in attr.sparse_tensors:
                    sparse.extend((sp.values, sp.indices))
    dense.extend(attr_dense)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in dense)
    return ModelTensors(dense, sparse, external)


# Element sizes of the types whose byte count follows from the dims alone (packed 4-bit types and
# strings are left to onnx's own reader).
_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16,
    **{getattr(onnx.TensorProto, n): 1 for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
       if hasattr(onnx.TensorProto, n)},
}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def tensor_bytes(t: onnx.TensorProto) -> int | None:
    """How many bytes of raw data the tensor's dims and type call for; None where that is not fixed."""
    size = _ITEMSIZE.get(t.data_type)
    if size is None:
        return None
    n = 1
    for d in t.dims:
        n *= d
    return n * size


def check_tensor_sizes(model: onnx.ModelProto, *, what: str = "model", tensors: ModelTensors | None = None) -> None:
    """Every inline tensor holds exactly the data its dims promise; else one `InputError` line.

    Written by hand because neither `onnx.checker` nor protobuf compares them: a 16-byte tensor whose
    dims say 10^9 values passes both and fails deep inside numpy's reshape. Runs before any value is read.
    ``tensors``: `model_tensors(model)` if the caller has it.
    """
    tensors = model_tensors(model) if tensors is None else tensors
    external = onnx.TensorProto.EXTERNAL
    for t in itertools.chain(tensors.dense, tensors.sparse):
        dims = t.dims
        if dims and min(dims) < 0:
            raise InputError(f"{what}: tensor '{t.name}' has negative dims {list(dims)}")
        if t.data_location == external:
            continue  # checked against its file by `external_data_files`
        expected = tensor_bytes(t)
        if expected is None:
            continue
        if t.HasField("raw_data") or not any(len(getattr(t, f)) for f in _TYPED_FIELDS):
            got, unit, want = len(t.raw_data), "bytes", expected
        else:
            got = sum(len(getattr(t, f)) for f in _TYPED_FIELDS)
            per = 2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
            unit, want = "values", expected // _ITEMSIZE[t.data_type] * per
        if got != want:
            raise InputError(
                f"{what}: tensor '{t.name}': dims {list(t.dims)} call for {want} {unit} of data but it holds {got}"
            )


def external_data_files(
    model: onnx.ModelProto, model_path: Path, *, absolute: bool = True, tensors: ModelTensors | None = None
) -> set[str]:
    """Check every external reference before anything reads it; return the files they name.

    A location must resolve — `realpath`, so every component counts, a symlinked folder included —
    to a regular file inside the model's own (resolved) folder, and the tensor's byte range must lie in
    that file and match its dims. `onnx.checker` refuses ``..``, absolute paths and a symlinked *file*
    but not a symlinked *folder* (``sub -> /proc/self``, then ``sub/environ``), which is why this is
    written here. With ``absolute`` each location is rewritten to the resolved path, so later reads
    open exactly the file checked here. Raises `InputError` naming the tensor and the location.
    ``tensors``: `model_tensors(model)` if the caller has it.
    """
    ext = onnx.external_data_helper
    tensors = model_tensors(model) if tensors is None else tensors
    base = os.path.realpath(model_path.parent if str(model_path.parent) else ".")
    found: set[str] = set()
    external = onnx.TensorProto.EXTERNAL
    sparse = [(t, False) for t in tensors.sparse]  # checked, never rewritten: bnfold does not read them
    for tensor, rewrite in itertools.chain(((t, absolute) for t in tensors.dense), sparse):
        if tensor.data_location != external:
            continue
        where = f"{model_path}: tensor '{tensor.name}'"
        try:
            info = ext.ExternalDataInfo(tensor)
        except ValueError as exc:
            raise InputError(f"{where}: bad external data entry ({_short(exc)})") from None
        location = info.location
        if not location:
            raise InputError(f"{where}: external data without a location")
        try:
            full = os.path.realpath(os.path.join(base, location))
        except ValueError:  # a NUL byte in the location
            raise InputError(f"{where}: external data location {location!r} is not a valid path") from None
        if os.path.commonpath([full, base]) != base or full == base:
            raise InputError(
                f"{where}: external data location '{location}' resolves outside the model's folder "
                f"(to {full}); refusing to read it"
            )
        try:
            st = os.stat(full)
        except OSError:
            raise InputError(f"{where}: external data file missing or unreadable: '{location}'") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where}: external data location '{location}' is not a regular file")
        offset = info.offset or 0
        length = info.length if info.length is not None else max(st.st_size - offset, 0)
        if offset + length > st.st_size:
            raise InputError(
                f"{where}: external data '{location}' is truncated: bytes {offset}..{offset + length} "
                f"asked for, the file has {st.st_size}"
            )
        expected = tensor_bytes(tensor)
        if expected is not None and length != expected:
            raise InputError(
                f"{where}: dims {list(tensor.dims)} call for {expected} bytes, external data "
                f"'{location}' gives {length}"
            )
        found.add(full)
        if rewrite:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = full
    return found


def _load_external(model: onnx.ModelProto) -> None:
    """Read every (already checked, absolute) external tensor into the model, as onnx's loader would."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            tensor.raw_data = _read_bytes(tensor)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def _read_bytes(tensor: onnx.TensorProto) -> bytes:
    """The bytes of an external tensor whose location `external_data_files` checked and made absolute.

    Opened non-blocking and checked again on the descriptor (a FIFO swapped in since cannot hang the
    read), and never more than the tensor's own size is read.
    """
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    if not os.path.isabs(info.location):  # an in-memory model from elsewhere: no folder to check it against
        raise InputError(
            f"tensor '{tensor.name}': external data '{info.location}' is relative to a folder bnfold does not "
            "know; pass the model's path, or load it with bnfold.onnx.io.load_model"
        )
    expected = tensor_bytes(tensor)
    want = info.length if info.length is not None else expected
    try:
        fd = os.open(info.location, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError(f"tensor '{tensor.name}': external data '{info.location}' is not a regular file")
            fh.seek(info.offset or 0)
            data = fh.read(want) if want is not None else fh.read()
    except OSError as exc:
        raise InputError(f"tensor '{tensor.name}': cannot read external data '{info.location}' ({exc.strerror})") from None
    if (want is not None and len(data) != want) or (expected is not None and len(data) != expected):
        raise InputError(f"tensor '{tensor.name}': external data '{info.location}' is shorter than its tensor (truncated?)")
    return data


def read_tensor(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, read from its external file if it has one (absolute, checked location)."""
    if not onnx.external_data_helper.uses_external_data(tensor):
        return onnx.numpy_helper.to_array(tensor)
    inline = onnx.TensorProto()
    inline.name, inline.data_type = tensor.name, tensor.data_type
    inline.dims.extend(tensor.dims)
    inline.raw_data = _read_bytes(tensor)
    return onnx.numpy_helper.to_array(inline)


def check_writable(
    path: str | os.PathLike[str],
    *,
    overwrite_ok: bool = True,
    external_data: bool | None = False,
    protect: Collection[str] = (),
    force: bool = False,
    follow_symlink: bool = False,
) -> Path:
    """Fail early, before any work, when the output cannot be written where asked; returns the real target.

    The target is where `files.output_target` says (never a device, FIFO, socket or directory; a
    symlink's target only with ``follow_symlink``, for in-place folds). With ``external_data`` the data
    file's name is settled here too (`data_file_name`), so a refusal to overwrite comes before the fold.
    """
    target = files.output_target(path, follow_symlink=follow_symlink)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output folder is not writable")
    if target.exists() and not overwrite_ok:
        raise OutputError(f"{target}: exists; refusing to overwrite")
    if external_data:
        data_file_name(target, protect=protect, force=force)
    return target


def _own_data_names(target: Path) -> tuple[str, str]:
    """The two names bnfold gives the data file of `target`; consecutive writes alternate between them."""
    return target.name + ".data", target.name + ".1.data"


def referenced_data(model_path: Path) -> set[str]:
    """Resolved paths of bnfold's own data files (`_own_data_names`) that the model now at `model_path`
    reads: the only ones the commit must not overwrite and may clean up. Lenient: empty when there is no
    model or it cannot be parsed; the .onnx file is parsed only when such a data file exists beside it
    (an inline 2 GB output is not read back for nothing)."""
    own = {os.path.realpath(model_path.parent / n) for n in _own_data_names(model_path)}
    if not model_path.is_file() or not any(os.path.lexists(p) for p in own):
        return set()
    try:
        model = _parse(model_path)
    except InputError:
        return set()
    base = os.path.realpath(model_path.parent)
    found = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                try:
                    found.add(os.path.realpath(os.path.join(base, entry.value)))
                except ValueError:
                    pass
    return found & own


def data_file_name(
    target: Path, *, protect: Collection[str] = (), force: bool = False, old_refs: set[str] | None = None
) -> str:
    """The name of the new external data file beside `target`; `OutputError` where bnfold must not write it.

    The two-file commit needs a name the model now at `target` does not read, so that the old pair stays
    whole until the model itself is replaced: ``<name>.data``, or ``<name>.1.data`` when the existing output
    reads the first. A file already there under the chosen name is replaced without ``force`` only when
    bnfold wrote it (it starts with `DATA_MAGIC`: debris of a commit cut short by SIGKILL, say) and the
    input does not read it. Otherwise it is one the input model reads (``protect``: overwriting it would
    break the input) or someone else's file bnfold cannot know to be disposable.
    """
    old = referenced_data(target) if old_refs is None else old_refs
    parent = target.parent
    names = [n for n in _own_data_names(target) if os.path.realpath(parent / n) not in old]
    name = names[0] if names else f"{target.name}.{secrets.token_hex(4)}.data"
    candidate = parent / name
    if not os.path.lexists(candidate):
        return name
    st = os.lstat(candidate)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OutputError(f"{candidate}: exists and is not a regular file; refusing to replace it")
    if force:
        return name
    if os.path.realpath(candidate) in protect:
        raise OutputError(f"{candidate}: is external data the input model reads; refusing to overwrite it (--force overwrites)")
    if stat.S_ISREG(st.st_mode) and _written_by_bnfold(candidate):
        return name  # left by an interrupted commit of bnfold's (or an output since replaced): disposable
    raise OutputError(
        f"{candidate}: exists and no bnfold output at {target.name} reads it; refusing to overwrite it (--force overwrites)"
    )


DATA_MAGIC = b"bnfold external data\n"
"""The first bytes of every data file bnfold writes (its tensors start at 4096, past the padding): how a
later run knows a data file with no model reading it as debris of its own rather than someone's weights."""


def _written_by_bnfold(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(DATA_MAGIC)) == DATA_MAGIC
    except OSError:
        return False


def commit(
    tmp_model: str, tmp_data: str | None, target: Path, mode: int, old_refs: set[str], protect: Collection[str]
) -> list[Path]:
    """Move the new model (and its data file) into place so that a crash at any point leaves a whole pair.

    Order: both files flushed to disk; the data file renamed to its final name, which the old model does
    not read (`data_file_name`), so the old pair still loads; then the model replaced in one rename —
    the switch from the old pair to the new; last, the data file(s) of the old output removed (only
    bnfold's own names for `target`, never a file the input reads). The renames run with termination
    signals deferred (`files.signals_deferred`), so a SIGTERM acts before or after them, never between.
    """
    parent = target.parent
    written: list[Path] = []
    data_ok = tmp_data is not None and os.path.exists(tmp_data)
    owner = os.stat(target) if target.exists() else None
    for f in ([tmp_data] if data_ok else []) + [tmp_model]:
        os.chmod(f, mode)
        if owner is not None:  # in place as root: the file stays its owner's (elsewhere chown is refused)
            try:
                os.chown(f, owner.st_uid, owner.st_gid)
            except OSError:
                pass
        _fsync(f)
    with files.signals_deferred():
        new_data = None
        if data_ok:
            new_data = parent / os.path.basename(tmp_data)  # type: ignore[arg-type]
            os.replace(tmp_data, new_data)  # type: ignore[arg-type]
            written.append(new_data)
            _fsync(parent)
        os.replace(tmp_model, target)
        _fsync(parent)
        written.append(target)
        keep = {os.path.realpath(new_data)} if new_data is not None else set()
        for old in old_refs - keep - set(protect):  # bnfold's own names only (`referenced_data`)
            try:
                os.unlink(old)
            except OSError:
                pass
    return written


def _fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file or a folder to disk (best effort: some file systems refuse it on folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
