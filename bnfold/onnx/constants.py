"""Which tensors are constants, and their values.

Exporters hand over constants in many shapes: plain initializers, `Constant` nodes, an `Identity` of a
de-duplicated initializer, weights built by `ConstantOfShape`, a `Transpose` of an initializer, and —
`torch.onnx.export(dynamo=True, optimize=False)` — every conv bias as
`Expand(CastLike(0, <input>), Shape(weight)[0])`. A value counts as constant when it is computed only
from constants and from what is fixed by the model itself: a tensor's static shape (`Shape`, `Size`)
or its element type (`CastLike`'s second input). Such subexpressions are evaluated node by node with
onnx's reference implementation, so no operator semantics are re-written here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Collection

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from bnfold.affine import StandIn
from bnfold.onnx.io import read_tensor
from bnfold.report import Reason, SkipReason

NON_DETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
MAX_EVAL_ELEMENTS = 1 << 28
"""Refuse to materialise a computed constant larger than this (elements): it is not a parameter."""
EVAL_BUDGET_ELEMENTS = 1 << 28
"""All computed constants of one model together (elements; 1 GiB of float32): they stay memoised."""
EVAL_BUDGET_WORK = 1 << 32
"""Multiply-adds (MatMul, Gemm, Conv, Einsum) or elements touched (other ops) per model: about a second of
work. Thirty chained 4096² MatMuls built from ConstantOfShape would otherwise take minutes."""

# Ops whose output can be far larger than their inputs: evaluated only when the size is known first.
EXPANDING = {
    "ConstantOfShape", "Expand", "Tile", "Range", "OneHot", "Resize", "Upsample", "Pad", "MatMul", "Gemm",
    "Conv", "ConvTranspose", "Einsum", "Col2Im", "MatMulInteger", "QLinearMatMul", "CenterCropPad", "EyeLike",
    "Gather", "GatherElements", "GatherND", "Mul", "Add", "Sub", "Div", "Pow", "Where", "Concat", "Sum", "Max",
    "Min", "Mean", "And", "Or", "Xor", "Equal", "Less", "Greater", "BitShift", "Mod", "PRelu",
}


class EvalBudget:
    """What constant evaluation may still spend on one model (see `EVAL_BUDGET_ELEMENTS`, `EVAL_BUDGET_WORK`)."""

    def __init__(self, elements: int = EVAL_BUDGET_ELEMENTS, work: int = EVAL_BUDGET_WORK) -> None:
        self.elements = elements
        self.work = work

    def spend(self, elements: int, work: int) -> str | None:
        """Take `elements` and `work` from the budget, or say why not (and take nothing)."""
        if elements > MAX_EVAL_ELEMENTS:
            return f"would hold {elements} elements, over the {MAX_EVAL_ELEMENTS} limit for a constant"
        if elements > self.elements or work > self.work:
            return (
                f"would hold {elements} elements after {work:.3g} operations, beyond what is left of the "
                "per-model budget for computed constants"
            )
        self.elements -= elements
        self.work -= work
        return None


@dataclass
class Resolved:
    """A tensor's constant value, or why it has none."""

    value: np.ndarray | None
    reason: SkipReason | None = None
    overridable: bool = False  # an initializer that is also a graph input (assumed constant)

    @property
    def ok(self) -> bool:
        return self.value is not None


class ConstantResolver:
    """Resolves tensors to constant values for one graph (its subgraphs see the outer constants)."""

    def __init__(
        self,
        overridable: set[str],
        assume_constant: bool,
        shapes: dict[str, tuple[list[int | None], int]],
        opset: int,
        budget: EvalBudget | None = None,
    ) -> None:
        self.budget = budget or EvalBudget()
        self.overridable = overridable
        self.assume_constant = assume_constant
        self.shapes = shapes
        self.opset = opset
        # By identity (graphsurgeon compares tensors by value, which is slow), holding the tensor itself:
        # a tensor that a fold removed would otherwise be freed, and a new one created at the same address
        # (a folded bias, say) would be handed the old one's value.
        self._memo: dict[int, tuple[gs.Tensor, Resolved]] = {}
        # A computed constant's node with small inputs, by everything its evaluation reads (`_evaluation_key`):
        # a dynamo export computes every conv bias as Expand(CastLike(0, x), Shape(W)[0]), the same few
        # nodes over and over, each a one-node model for shape inference and for the reference runtime.
        self._predicted: dict[tuple, list[int] | None] = {}
        self._evaluated: dict[tuple, list[np.ndarray] | _Failed] = {}

    def resolve(self, tensor: gs.Tensor | None) -> Resolved:
        if tensor is None:
            return Resolved(None, SkipReason(Reason.NOT_CONSTANT, "missing input"))
        return self._memoised(tensor, depth=0)

    def plain(self, tensor: gs.Tensor) -> np.ndarray | None:
        """The value `resolve` gives a plain constant (one no caller can override), read directly: no memo,
        nothing evaluated; None for any other tensor. For callers that read many at once."""
        if isinstance(tensor, gs.Constant) and tensor.name not in self.overridable:
            return _values(tensor)
        return None

    def forget(self, tensor: gs.Tensor) -> None:
        """Drop a memoised value after the fold rewrote the tensor."""
        self._memo.pop(id(tensor), None)

    def _memoised(self, tensor: gs.Tensor, depth: int) -> Resolved:
        entry = self._memo.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            entry = self._memo[id(tensor)] = (tensor, self._resolve(tensor, depth))
        return entry[1]

    # ------------------------------------------------------------------------------------------
    def _resolve(self, tensor: gs.Tensor, depth: int) -> Resolved:
        if isinstance(tensor, gs.Constant):
            if tensor.name in self.overridable:
                if not self.assume_constant:
                    return Resolved(
                        None,
                        SkipReason(
                            Reason.OVERRIDABLE_INITIALIZER,
                            f"'{tensor.name}' is an initializer that is also a graph input, so callers may override it",
                        ),
                    )
                return Resolved(_values(tensor), overridable=True)
            return Resolved(_values(tensor))
        if depth > 64:
            return Resolved(None, SkipReason(Reason.NOT_CONSTANT, f"'{tensor.name}' is computed too deep to evaluate"))
        if not tensor.inputs:
            return Resolved(
                None, SkipReason(Reason.NOT_CONSTANT, f"'{tensor.name}' is a graph input, not a constant")
            )
        node: gs.Node = tensor.inputs[0]
        if node.op == "Constant":
            return Resolved(_constant_node_value(node))
        if node.op in ("Shape", "Size"):
            return self._static_shape_value(node, tensor)
        if node.op in NON_DETERMINISTIC or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return Resolved(None, SkipReason(Reason.NOT_CONSTANT, f"'{tensor.name}' is computed at run time by {node.op}"))
        inputs: list[np.ndarray | None] = []
        for i, inp in enumerate(node.inputs):
            if inp.name == "" and isinstance(inp, gs.Variable):
                inputs.append(None)
                continue
            if node.op == "CastLike" and i == 1:  # only the element type of the second input matters
                dtype = _dtype_of(inp, self.shapes)
                if dtype is None:
                    return Resolved(None, SkipReason(Reason.NOT_CONSTANT, f"type of '{inp.name}' unknown"))
                inputs.append(np.zeros((), dtype))
                continue
            r = self._memoised(inp, depth + 1)
            if not r.ok:
                msg = r.reason.message if r.reason else ""
                code = r.reason.code if r.reason else Reason.NOT_CONSTANT
                return Resolved(None, SkipReason(code, f"'{tensor.name}' depends on {msg}"))
            inputs.append(r.value)
        key = _evaluation_key(node, inputs)
        refusal = self._afford(node, inputs, key)
        if refusal is not None:
            return Resolved(None, SkipReason(Reason.NOT_CONSTANT, f"'{tensor.name}' ({node.op}) {refusal}"))
        outputs = self._evaluated.get(key) if key is not None else None
        if outputs is None:
            try:
                outputs = _evaluate(node, inputs, self.opset)
            except Exception as exc:  # the reference runtime lacks an op or the inputs are odd
                outputs = _Failed(_short(exc))
            if key is not None:
                self._evaluated[key] = outputs
        if isinstance(outputs, _Failed):
            return Resolved(
                None, SkipReason(Reason.NOT_CONSTANT, f"'{tensor.name}' ({node.op}) could not be evaluated: {outputs.message}")
            )
        idx = [o.name for o in node.outputs].index(tensor.name)
        value = np.asarray(outputs[idx])
        if value.size > MAX_EVAL_ELEMENTS:
            return Resolved(None, SkipReason(Reason.NOT_CONSTANT, f"'{tensor.name}' is too large to evaluate"))
        return Resolved(value)

    def _afford(self, node: gs.Node, inputs: list[np.ndarray | None], key: tuple | None = None) -> str | None:
        """Why `node` must not be evaluated (None: go ahead, the budget is charged).

        The output's size is found *before* anything is allocated: by onnx shape inference on the node
        alone, fed the actual input shapes and its small integer inputs (shapes, repeats, pads) as
        values. An op that can expand its inputs is refused when that size stays unknown. ``key``: the
        node's `_evaluation_key`, under which that inference is remembered (the budget is charged
        every time).
        """
        if key is not None and key in self._predicted:
            shape = self._predicted[key]
        else:
            shape = _predict_shape(node, inputs, self.opset)
            if key is not None:
                self._predicted[key] = shape
        if shape is None:
            shape = _static_shape(node.outputs[0], self.shapes) if node.outputs else None
        in_sizes = [int(v.size) for v in inputs if v is not None]
        if shape is None:
            if node.op in EXPANDING:
                return "could not be evaluated: its size cannot be known before evaluating it"
            elements = sum(in_sizes)
        else:
            elements = 1
            for d in shape:
                elements *= d
        return self.budget.spend(elements, _work(node, inputs, elements, in_sizes))

    def _static_shape_value(self, node: gs.Node, tensor: gs.Tensor) -> Resolved:
        src = node.inputs[0]
        shape = _static_shape(src, self.shapes)
        if shape is None:
            return Resolved(
                None, SkipReason(Reason.NOT_CONSTANT, f"'{tensor.name}' is the shape of '{src.name}', not static")
            )
        if node.op == "Size":
            return Resolved(np.array(int(np.prod(shape)), dtype=np.int64))
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        sliced = shape[start:] if end is None else shape[start : int(end)]
        return Resolved(np.array(sliced, dtype=np.int64))


@dataclass(frozen=True)
class _Failed:
    """An evaluation that raised, and what it said."""

    message: str


KEY_INPUT_BYTES = 1 << 12
"""Inputs up to this size (each) let a node's evaluation be remembered (`_evaluation_key`); a larger one
(a Transpose of a weight, say) is evaluated every time, as it is met once anyway."""


def _evaluation_key(node: gs.Node, inputs: list[np.ndarray | None]) -> tuple | None:
    """Everything `_predict_shape` and `_evaluate` read of a node and its inputs, as a dict key: its op,
    domain, number of outputs, attributes, and each input's dtype, shape and bytes (the opset is the
    resolver's). None where that cannot be said exactly and cheaply: a large or object input, an
    attribute of another kind than numbers, strings and small tensors (or a NaN, which equals nothing)."""
    parts: list[object] = [node.op, node.domain or "", len(node.outputs)]
    for value in inputs:
        if value is None:
            parts.append(None)
            continue
        if value.nbytes > KEY_INPUT_BYTES or value.dtype.hasobject:
            return None
        parts.append((value.dtype, value.shape, value.tobytes()))
    for name in sorted(node.attrs):
        attr = _attribute_key(node.attrs[name])
        if attr is None:
            return None
        parts.append((name, attr))
    return tuple(parts)


def _attribute_key(value: object) -> tuple | None:
    if isinstance(value, (bool, int, str, bytes)):  # bool before int: True and 1 are different attributes
        return (type(value).__name__, value)
    if isinstance(value, float):
        return None if value != value else ("float", value.hex())  # hex: -0.0 is not 0.0
    if isinstance(value, (list, tuple)):
        items = [_attribute_key(v) for v in value]
        return None if any(i is None for i in items) else (type(value).__name__, tuple(items))
    if isinstance(value, gs.Constant):
        array = _values(value)
        if array.nbytes > KEY_INPUT_BYTES or array.dtype.hasobject:
            return None
        return ("tensor", array.dtype, array.shape, array.tobytes())
    return None


def _values(tensor: gs.Constant) -> np.ndarray:
    """The constant's values, read without caching them in the graph (a weight is read once, then replaced)."""
    values = tensor._values
    if isinstance(values, StandIn):  # a check's uncomputed fold, read by a later fold of the same plan
        return values.real()
    if isinstance(values, _LazyValues):
        proto = values.tensor
        dtype = _RAW_DTYPES.get(proto.data_type)
        if dtype is not None and proto.data_location != _EXTERNAL and proto.HasField("raw_data") and not proto.HasField("segment"):
            # `onnx.numpy_helper.to_array`'s own path for such a tensor, without its per-call lookups:
            # 4 of 5 tensors a fold reads are a BatchNorm's small parameters, where those dominate.
            array = np.frombuffer(proto.raw_data, dtype=dtype)
            dims = proto.dims
            if len(dims) == 1 and dims[0] == array.shape[0]:  # already what reshape(dims) would give
                return array
            return array.reshape(dims)
        return np.asarray(read_tensor(proto))  # also reads a reference to an external file
    return np.asarray(tensor.values)


_LazyValues = gs.ir.tensor.LazyValues
_EXTERNAL = onnx.TensorProto.EXTERNAL


# Element types whose inline raw_data `_values` reads directly: those whose bytes are the numpy array's,
# little-endian (onnx byte-swaps on a big-endian host, so there the reading is left to onnx).
_RAW_DTYPES: dict[int, np.dtype] = (
    {
        onnx.TensorProto.FLOAT: np.dtype(np.float32),
        onnx.TensorProto.FLOAT16: np.dtype(np.float16),
        onnx.TensorProto.DOUBLE: np.dtype(np.float64),
        onnx.TensorProto.INT32: np.dtype(np.int32),
        onnx.TensorProto.INT64: np.dtype(np.int64),
    }
    if sys.byteorder == "little"
    else {}
)


def _constant_node_value(node: gs.Node) -> np.ndarray:
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        return _values(value)
    if value is not None:
        return np.asarray(value)
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=dtype)
    raise ValueError(f"Constant node {node.name!r} has no supported value attribute")


def _static_shape(tensor: gs.Tensor, shapes: dict[str, tuple[list[int | None], int]]) -> list[int] | None:
    if isinstance(tensor, gs.Constant):
        return list(tensor.shape)
    info = shapes.get(tensor.name)
    shape = info[0] if info else (tensor.shape if tensor.shape is not None else None)
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _dtype_of(tensor: gs.Tensor, shapes: dict[str, tuple[list[int | None], int]]) -> np.dtype | None:
    if isinstance(tensor, gs.Constant):
        return _values(tensor).dtype
    info = shapes.get(tensor.name)
    if info and info[1]:
        return helper.tensor_dtype_to_np_dtype(info[1])
    if tensor.dtype is not None:
        try:
            return np.dtype(tensor.dtype)
        except TypeError:
            return None
    return None


def _work(node: gs.Node, inputs: list[np.ndarray | None], elements: int, in_sizes: list[int]) -> int:
    """Multiply-adds of a contraction (output elements × reduction length); else elements touched."""
    a = inputs[0] if inputs else None
    b = inputs[1] if len(inputs) > 1 else None
    if node.op in ("MatMul", "MatMulInteger") and a is not None and a.ndim:
        return elements * int(a.shape[-1])
    if node.op == "Gemm" and a is not None and a.ndim == 2:
        return elements * int(a.shape[0] if node.attrs.get("transA", 0) else a.shape[1])
    if node.op in ("Conv", "ConvTranspose") and b is not None and b.ndim >= 2:
        return elements * int(np.prod(b.shape[1:]) if node.op == "Conv" else b.shape[0] * np.prod(b.shape[2:]))
    if node.op == "Einsum":
        return elements * max(in_sizes, default=1)
    return elements + sum(in_sizes)


def _predict_shape(node: gs.Node, inputs: list[np.ndarray | None], opset: int) -> list[int] | None:
    """The output's static shape by onnx shape inference on this node alone, or None if not found."""
    try:
        small = {i for i, v in enumerate(inputs) if v is not None and v.size <= 64 and v.dtype.kind in "iu"}
        model = _one_node_model(node, inputs, opset, values=small)
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # no shape function, or one that rejects the inputs: the size stays unknown
        return None
    tt = inferred.graph.output[0].type.tensor_type
    if not tt.HasField("shape") or any(not d.HasField("dim_value") or d.dim_value < 0 for d in tt.shape.dim):
        return None
    return [d.dim_value for d in tt.shape.dim]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _one_node_model(
    node: gs.Node, inputs: list[np.ndarray | None], opset: int, values: Collection[int] = ()
) -> onnx.ModelProto:
    """`node` as a model whose inputs have the given arrays' types and shapes (those in `values`:
    their values too, as initializers, for shape inference to read)."""
    in_names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    out_names = [f"o{k}" for k in range(len(node.outputs))]
    attrs = {}
    for key, val in node.attrs.items():
        if isinstance(val, gs.Constant):
            val = onnx.numpy_helper.from_array(_values(val))
        attrs[key] = val
    proto = helper.make_node(node.op, in_names, out_names, domain=node.domain or "", **attrs)
    feeds = {n: v for n, v in zip(in_names, inputs) if n}
    inits = [onnx.numpy_helper.from_array(inputs[k], in_names[k]) for k in sorted(values)]
    graph = helper.make_graph(
        [proto],
        "eval",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in out_names],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(node.domain or "", opset)])


def _evaluate(node: gs.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run one node with onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    model = _one_node_model(node, inputs, opset)
    feeds = {f"i{k}": v for k, v in enumerate(inputs) if v is not None}
    return list(ReferenceEvaluator(model).run(None, feeds))
