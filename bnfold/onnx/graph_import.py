"""The model as an onnx-graphsurgeon graph: `gs.import_onnx`'s result, built in a third of its time.

Why not simply `gs.import_onnx`: on a MobileNetV2- or ShuffleNetV2-size model (230 nodes, 330
initializers) it takes about 7 ms — half of an `onnx.load` + `onnx.save` of the same file, and more
than the whole budget issue 14 gives `bnfold check` — and nearly all of it is spent in the object
constructors: every `Tensor` attribute assignment goes through `Tensor.__setattr__`, whose
`getattr`-then-`AttributeError` path runs for `inputs`/`outputs` on every new tensor, and every
`SynchronizedList` is filled element by element. The graph that comes out is the point of using
onnx-graphsurgeon, so this module builds *the same objects* (`gs.Variable`, `gs.Constant` with
`LazyValues`, `gs.Node`, `gs.Graph`) with their fields set directly, following `OnnxImporter.import_graph`
step by step, and uses the library itself for everything else (attributes: `OnnxImporter.import_attributes`;
dtypes and shapes: its `get_onnx_tensor_*` helpers; the `gs.Graph` constructor).

Only the common case is built here — one graph, no local functions, no subgraphs (If/Loop/Scan), no
sparse initializers: every other model goes to `gs.import_onnx` unchanged. Setting fields directly
depends on the library's internals, so before the first use the result is compared, object by object,
with `gs.import_onnx` on a small model exercising every path (`fast_path_available`); if an
onnx-graphsurgeon release changes what its objects hold, the comparison fails and every model goes
to `gs.import_onnx` (slower, never wrong). `tests/onnx/test_graph_import.py` compares both on every
sample and test model, and fails if the fast path stops being used.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import (
    OnnxImporter,
    get_onnx_tensor_dtype,
    get_onnx_tensor_shape,
    get_onnx_tensor_type,
    get_itemsize,
)
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.util.misc import SynchronizedList, volume

_GRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """`gs.import_onnx(model)`, faster where the model allows it (see the module docstring)."""
    if fast_path_available() and _is_flat(model):
        return _import_flat(model)
    return gs.import_onnx(model)


def _is_flat(model: onnx.ModelProto) -> bool:
    """One graph: no local functions, no sparse initializers, no graph-valued attribute, no reference to
    a function's attribute (those only occur inside functions, which fall back already)."""
    g = model.graph
    if len(model.functions) or len(g.sparse_initializer):
        return False
    for node in g.node:
        for attr in node.attribute:
            if attr.type in _GRAPH_ATTRS or attr.ref_attr_name:
                return False
    return True


# ---------------------------------------------------------------------------------------------
# the objects, with their fields set as their constructors set them
# ---------------------------------------------------------------------------------------------
_new = object.__new__
_append = list.append


def _synced(parent: object, field: str, items: list | tuple = ()) -> SynchronizedList:
    """`SynchronizedList(parent, field, items)`: `items` listed, and `parent` added to each item's `field`."""
    lst = list.__new__(SynchronizedList)
    lst.parent_obj = parent
    lst.field_name = field
    if items:
        list.extend(lst, items)
        for item in items:
            _append(item.__dict__[field], parent)
    return lst


def _variable(name: str, dtype: Any = None, shape: Any = None, type: str = "tensor_type") -> gs.Variable:
    t = _new(gs.Variable)
    fields = t.__dict__
    fields["name"] = name
    fields["inputs"] = _synced(t, "outputs")
    fields["outputs"] = _synced(t, "inputs")
    fields["dtype"] = dtype
    fields["shape"] = shape
    fields["type"] = type
    return t


_DTYPES: dict[int, tuple[Any, int]] = {}


def _constant(tensor: onnx.TensorProto) -> gs.Constant:
    known = _DTYPES.get(tensor.data_type)
    if known is None:
        dtype = get_onnx_tensor_dtype(tensor)
        known = _DTYPES[tensor.data_type] = (dtype, get_itemsize(dtype))
    values = _new(LazyValues)
    values.tensor = tensor
    values.shape = get_onnx_tensor_shape(tensor)
    values.dtype = known[0]
    values.nbytes = volume(values.shape) * known[1]
    t = _new(gs.Constant)
    fields = t.__dict__
    fields["name"] = tensor.name
    fields["inputs"] = _synced(t, "outputs")
    fields["outputs"] = _synced(t, "inputs")
    fields["_values"] = values
    fields["data_location"] = int(tensor.data_location) if tensor.HasField("data_location") else None
    fields["_export_dtype"] = None
    return t


def _node(proto: onnx.NodeProto, attrs: "OrderedDict[str, Any]", inputs: list, outputs: list) -> gs.Node:
    n = _new(gs.Node)
    fields = n.__dict__
    fields["op"] = proto.op_type
    fields["name"] = proto.name
    fields["attrs"] = attrs
    fields["inputs"] = _synced(n, "outputs", inputs)
    fields["outputs"] = _synced(n, "inputs", outputs)
    fields["domain"] = proto.domain if proto.HasField("domain") else None
    return n


def _typed_variable(info: onnx.ValueInfoProto) -> gs.Variable:
    """`OnnxImporter.import_tensor` of a ValueInfoProto."""
    if info.type.ByteSize() > 0:
        return _variable(info.name, get_onnx_tensor_dtype(info), get_onnx_tensor_shape(info), get_onnx_tensor_type(info))
    return _variable(info.name)


# ---------------------------------------------------------------------------------------------
# `OnnxImporter.import_graph`, for one flat graph
# ---------------------------------------------------------------------------------------------
def _import_flat(model: onnx.ModelProto) -> gs.Graph:
    g = model.graph
    opset = OnnxImporter.get_opset(model)
    domains = OnnxImporter.get_import_domains(model)
    tensors: dict[str, gs.Tensor] = {}
    for init in g.initializer:  # the first of a name wins, as in the library
        if init.name not in tensors:
            tensors[init.name] = _constant(init)
    for info in g.value_info:  # a repeated name fills in what the first lacked (Variables only)
        known = tensors.get(info.name)
        if known is None:
            tensors[info.name] = _typed_variable(info)
        elif isinstance(known, gs.Variable):
            again = _typed_variable(info)
            known.__dict__["dtype"] = known.dtype or again.dtype
            known.__dict__["shape"] = known.shape or again.shape
    initializer_names = {t.name for t in g.initializer}
    inputs = [_tensor_of(tensors, info) for info in g.input if info.name not in initializer_names]
    outputs = [_tensor_of(tensors, info) for info in g.output]
    nodes = []
    for proto in g.node:
        attrs = (
            OnnxImporter.import_attributes(proto.attribute, OrderedDict(), tensors, opset, domains)
            if len(proto.attribute)
            else OrderedDict()
        )
        node_inputs = [_by_name(tensors, name) for name in proto.input]
        node_outputs = [_by_name(tensors, name) for name in proto.output]
        nodes.append(_node(proto, attrs, node_inputs, node_outputs))
    return gs.Graph(
        nodes=nodes,
        inputs=inputs,
        outputs=outputs,
        name=g.name,
        doc_string=g.doc_string,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        opset=opset,
        import_domains=domains,
        functions=[],
        ir_version=model.ir_version,
    )


def _tensor_of(tensors: dict[str, gs.Tensor], info: onnx.ValueInfoProto) -> gs.Tensor:
    known = tensors.get(info.name)
    if known is None:
        known = tensors[info.name] = _typed_variable(info)
    return known


def _by_name(tensors: dict[str, gs.Tensor], name: str) -> gs.Tensor:
    known = tensors.get(name)
    if known is None:
        if not name:  # an omitted optional input or output: a fresh empty Variable each time, not tracked
            return _variable("")
        known = tensors[name] = _variable(name)
    return known


# ---------------------------------------------------------------------------------------------
# the guard: the fast path must build what the library builds
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def fast_path_available() -> bool:
    """Whether `_import_flat` builds exactly what `gs.import_onnx` does with the installed onnx-graphsurgeon."""
    try:
        model = _probe_model()
        return describe(_import_flat(model)) == describe(gs.import_onnx(model))
    except Exception:
        return False


def describe(graph: gs.Graph) -> list:
    """Every object of `graph` as plain data — its class, and every field the library keeps — with tensors
    and nodes referred to by position: equal descriptions mean interchangeable graphs."""
    tensor_ids: dict[int, int] = {}
    node_ids = {id(n): i for i, n in enumerate(graph.nodes)}

    def tensor_ref(t: gs.Tensor) -> int:
        return tensor_ids.setdefault(id(t), len(tensor_ids))

    def value(v: Any) -> Any:
        if isinstance(v, gs.Tensor):
            return ("tensor", tensor_ref(v))
        if isinstance(v, LazyValues):
            return ("lazy", v.tensor.SerializeToString(), tuple(v.shape), str(v.dtype), sorted(vars(v)))
        if isinstance(v, np.ndarray):
            return ("array", v.dtype.str, v.shape, v.tobytes())
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, [value(x) for x in v])
        if isinstance(v, dict):
            return (type(v).__name__, [(k, value(x)) for k, x in v.items()])
        return (type(v).__name__, repr(v))

    out: list = [("graph", [tensor_ref(t) for t in graph.inputs], [tensor_ref(t) for t in graph.outputs])]
    for attr in ("name", "doc_string", "producer_name", "producer_version", "opset", "import_domains", "ir_version"):
        out.append((attr, value(getattr(graph, attr, None))))
    for node in graph.nodes:
        fields = {k: v for k, v in vars(node).items() if k not in ("inputs", "outputs", "attrs")}
        out.append((
            type(node).__name__, [tensor_ref(t) for t in node.inputs], [tensor_ref(t) for t in node.outputs],
            value(node.attrs), value(fields), _synced_fields(node),
        ))
    for tensor in list(graph.tensors().values()) + [t for n in graph.nodes for t in (*n.inputs, *n.outputs) if not t.name]:
        fields = {k: v for k, v in vars(tensor).items() if k not in ("inputs", "outputs")}
        out.append((
            type(tensor).__name__, tensor_ref(tensor), value(fields),
            [node_ids.get(id(n)) for n in tensor.inputs], [node_ids.get(id(n)) for n in tensor.outputs],
            _synced_fields(tensor),
        ))
    return out


def _synced_fields(obj: gs.Node | gs.Tensor) -> tuple:
    """The class and fields of an object's two synchronised lists (their parent by identity)."""
    return tuple(
        (type(lst).__name__, sorted(k for k in vars(lst) if k not in ("parent_obj", "field_name")),
         lst.field_name, lst.parent_obj is obj)
        for lst in (obj.inputs, obj.outputs)
    )


def _probe_model() -> onnx.ModelProto:
    """A small model that takes every path of `_import_flat`: initializers (one repeated), value_info
    (one repeated, one untyped), a graph input and output, a Constant node with a tensor attribute, an
    omitted optional input and output, string/int/float/list attributes, a node domain, a doc string."""
    h = onnx.helper
    f32 = onnx.TensorProto.FLOAT
    w = onnx.numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [
        h.make_node("Constant", [], ["c"], name="const", value=onnx.numpy_helper.from_array(np.ones(2, np.float32))),
        h.make_node("Conv", ["x", "w", "c"], ["y"], name="conv", pads=[0, 0, 0, 0], auto_pad="NOTSET", domain=""),
        h.make_node("Dropout", ["y", ""], ["z", ""], name="drop"),
        h.make_node("LeakyRelu", ["z"], ["out"], alpha=0.5),
    ]
    graph = h.make_graph(
        nodes, "probe", [h.make_tensor_value_info("x", f32, [1, 2, "h", 3])], [h.make_tensor_value_info("out", f32, None)],
        [w, onnx.numpy_helper.from_array(np.zeros((2, 2, 1, 1), np.float32), "w")], doc_string="probe",
        value_info=[h.make_tensor_value_info("y", f32, None), h.make_tensor_value_info("y", f32, [1, 2, 4, 3]), onnx.ValueInfoProto(name="z")],
    )
    return h.make_model(graph, producer_name="bnfold", producer_version="0", opset_imports=[h.make_opsetid("", 17)])
