"""The folding pass over one onnx-graphsurgeon graph (and, recursively, its subgraphs and functions).

For each per-channel affine chain (see `chain.py`) in topological order it tries, in turn, to fold the
chain into the layer that produces its input, then into the layer that consumes its output, and
records a `Candidate` either way. Every decision reads the live graph, so a fold earlier in the order
is seen by the ones after it. A plan is complete before the graph is touched: a refusal changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bnfold.affine import Affine
from bnfold.onnx.chain import (
    AffineStep,
    batchnorm_step,
    compose,
    display,
    elementwise_step,
    is_graph_output,
)
from bnfold.onnx.constants import ConstantResolver
from bnfold.onnx.layers import CONSUMERS, PRODUCERS, LayerPlan, Planner
from bnfold.report import Candidate, Reason, SkipReason, Status

FLATTENERS = ("Flatten", "Reshape")


@dataclass
class PassState:
    """What the pass needs across graphs: constants, shapes, names in use, what it changed."""

    resolver: ConstantResolver
    shapes: dict[str, tuple[list[int | None], int]]
    names: set[str]
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    modified: set[str] = field(default_factory=set)  # initializer names whose values changed or vanished
    flushed: int = 0
    spill: "Spill | None" = None  # where folded weights go when they should not stay in memory

    def rank_of(self, tensor: gs.Tensor) -> int | None:
        if isinstance(tensor, gs.Constant):
            return len(tensor.shape)
        info = self.shapes.get(tensor.name)
        if info is not None and info[0] is not None:
            return len(info[0])
        return len(tensor.shape) if tensor.shape is not None else None

    def static_shape(self, tensor: gs.Tensor) -> list[int | None] | None:
        info = self.shapes.get(tensor.name)
        shape = info[0] if info else tensor.shape
        if shape is None:
            return None
        return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name


def fold_graph(graph: gs.Graph, state: PassState, path: str = "") -> None:
    """Fold every chain in `graph`, then recurse into subgraphs (If/Loop/Scan bodies)."""
    planner = Planner(state.resolver, state.rank_of)
    seen: set[int] = set()
    own = {id(n) for n in graph.nodes}  # by identity: gs compares nodes by value, which is slow
    for node in list(graph.nodes):
        if id(node) in seen or not _alive(node):
            continue
        seed = _step(node, state)
        if seed is None:
            continue
        if isinstance(seed, SkipReason):  # a BatchNorm that is not an affine map at all
            seen.add(id(node))
            state.candidates.append(
                Candidate(display(node), node.op, Status.SKIPPED, [display(node)], reasons=[seed], graph=path)
            )
            continue
        steps = _grow_chain(seed, graph, state, seen, own)
        seen.update(id(s.node) for s in steps)
        _fold_chain(graph, steps, planner, state, path)
    for node in list(graph.nodes):
        for key, value in node.attrs.items():
            if isinstance(value, gs.Graph):
                fold_graph(value, state, f"{path}/{display(node)}.{key}".lstrip("/"))


def _alive(node: gs.Node) -> bool:
    return bool(node.outputs)


def _step(node: gs.Node, state: PassState) -> AffineStep | SkipReason | None:
    if node.op == "BatchNormalization" and (node.domain or "") in ("", "ai.onnx"):
        return batchnorm_step(node, state.resolver)
    if (node.domain or "") in ("", "ai.onnx"):
        return elementwise_step(node, state.resolver, state.rank_of, state.static_shape)
    return None


def _grow_chain(
    seed: AffineStep, graph: gs.Graph, state: PassState, seen: set[int], own: set[int]
) -> list[AffineStep]:
    """Extend both ways through tensors that have exactly one consumer and are not graph outputs."""
    steps = [seed]
    x = seed.data
    while x.inputs and len(x.outputs) == 1 and not is_graph_output(x, graph):
        prev = x.inputs[0]
        if id(prev) in seen or id(prev) not in own:  # never grow into an outer graph
            break
        step = _step(prev, state)
        if not isinstance(step, AffineStep) or len(prev.outputs) != 1:
            break
        steps.insert(0, step)
        x = step.data
    while True:
        y = steps[-1].node.outputs[0]
        if len(y.outputs) != 1 or is_graph_output(y, graph):
            break
        nxt = y.outputs[0]
        if id(nxt) in seen or id(nxt) not in own:
            break
        step = _step(nxt, state)
        if not isinstance(step, AffineStep) or step.data is not y:
            break
        steps.append(step)
    return steps


def _fold_chain(graph: gs.Graph, steps: list[AffineStep], planner: Planner, state: PassState, path: str) -> None:
    bns = [s for s in steps if s.node.op == "BatchNormalization"]
    head = bns[0].node if bns else steps[0].node
    cand = Candidate(
        display(head),
        head.op,
        Status.SKIPPED,
        [display(s.node) for s in steps],
        graph=path,
        bn_count=len(bns),
    )
    affine = compose(steps)
    x, y = steps[0].data, steps[-1].node.outputs[0]

    producer_result = _try_producer(graph, steps, x, affine, planner, state)
    if isinstance(producer_result, LayerPlan):
        if not bns and _pointless(producer_result, steps):
            return
        _apply_producer(graph, producer_result, steps, y, state)
        _record(cand, producer_result, "into-producer", affine, state)
        return
    consumer_result = _try_consumer(graph, y, affine, planner, state)
    if isinstance(consumer_result, tuple):
        plan, flatten = consumer_result
        _apply_consumer(graph, plan, flatten, steps, x, y, state)
        _record(cand, plan, "into-consumer", affine, state)
        return
    if not bns:
        return  # a Mul/Add that stays is not worth a line in the report
    reasons = [r for r in (producer_result, consumer_result) if isinstance(r, SkipReason)]
    if not reasons:
        reasons = [
            SkipReason(
                Reason.NO_LINEAR_NEIGHBOUR,
                f"'{display(head)}' has no Conv/ConvTranspose/Gemm/MatMul before it or after it"
                + (f" (fed by {x.inputs[0].op} '{display(x.inputs[0])}')" if x.inputs else f" (fed by input '{x.name}')"),
            )
        ]
    cand.reasons = reasons
    state.candidates.append(cand)


def _pointless(plan: LayerPlan, steps: list[AffineStep]) -> bool:
    """MatMul → Add(bias) with no BatchNorm: folding would only replace the Add with an Add."""
    return plan.node.op == "MatMul" and plan.bias_after is not None and len(steps) == 1 and steps[0].node.op == "Add"


def _record(cand: Candidate, plan: LayerPlan, direction: str, affine: Affine, state: PassState) -> None:
    cand.status = Status.FOLDED
    cand.target = display(plan.node)
    cand.target_op = plan.node.op
    cand.direction = direction
    state.candidates.append(cand)
    state.notes.extend(affine.notes)
    if plan.flushed:
        state.notes.append(f"{display(plan.node)}: {plan.flushed} folded value(s) became subnormal and were flushed to zero")
    state.flushed += plan.flushed


# ---------------------------------------------------------------------------------------------
# deciding
# ---------------------------------------------------------------------------------------------
def _try_producer(
    graph: gs.Graph, steps: list[AffineStep], x: gs.Tensor, affine: Affine, planner: Planner, state: PassState
) -> LayerPlan | SkipReason | None:
    if not x.inputs:
        return None
    producer = x.inputs[0]
    if producer.op not in PRODUCERS or (producer.domain or "") not in ("", "ai.onnx"):
        # A per-channel Mul/Add the chain could not absorb (MatMul → Add(bias) → BN with the Add's
        # output read elsewhere): name that, not "no linear neighbour".
        if isinstance(_step(producer, state), AffineStep) and (len(x.outputs) > 1 or is_graph_output(x, graph)):
            return _shared_output_reason(graph, steps, x, producer)
        return None
    shared = _shared_output_reason(graph, steps, x, producer)
    if shared is not None:
        return shared
    if len(producer.outputs) != 1:
        return SkipReason(Reason.UNSUPPORTED, f"{producer.op} '{display(producer)}' has several outputs")
    return planner.producer(producer, affine)


def _shared_output_reason(graph: gs.Graph, steps: list[AffineStep], x: gs.Tensor, producer: gs.Node) -> SkipReason | None:
    if is_graph_output(x, graph):
        return SkipReason(
            Reason.GRAPH_OUTPUT, f"{producer.op} '{display(producer)}' output '{x.name}' is also a graph output"
        )
    others = [n for n in x.outputs if n is not steps[0].node]
    if others:
        names = ", ".join(f"{n.op} '{display(n)}'" for n in others[:4])
        return SkipReason(
            Reason.OTHER_CONSUMER, f"{producer.op} '{display(producer)}' output '{x.name}' also feeds {names}"
        )
    return None


def _try_consumer(
    graph: gs.Graph, y: gs.Tensor, affine: Affine, planner: Planner, state: PassState
) -> tuple[LayerPlan, gs.Node | None] | SkipReason | None:
    if is_graph_output(y, graph) or len(y.outputs) != 1:
        if len(y.outputs) > 1 and any(n.op in CONSUMERS + FLATTENERS for n in y.outputs):
            names = ", ".join(f"{n.op} '{display(n)}'" for n in y.outputs[:4])
            return SkipReason(Reason.OTHER_CONSUMER, f"output '{y.name}' feeds several nodes ({names})")
        return None
    consumer = y.outputs[0]
    flatten = None
    repeat = 1
    if consumer.op in FLATTENERS:
        mapped = _flatten_repeat(consumer, y, planner, state)
        if mapped is None:
            return None
        if isinstance(mapped, SkipReason):
            return mapped
        flat_out = consumer.outputs[0]
        if len(flat_out.outputs) != 1 or is_graph_output(flat_out, graph):
            return None
        flatten, repeat, consumer = consumer, mapped, flat_out.outputs[0]
        y = flat_out
    if consumer.op not in CONSUMERS or (consumer.domain or "") not in ("", "ai.onnx"):
        return None
    if not consumer.inputs or consumer.inputs[0] is not y or sum(t is y for t in consumer.inputs) != 1:
        return None
    plan = planner.consumer(consumer, affine, repeat)
    if isinstance(plan, SkipReason):
        return plan
    return plan, flatten


def _flatten_repeat(node: gs.Node, y: gs.Tensor, planner: Planner, state: PassState) -> int | SkipReason | None:
    """How many features each channel becomes when `node` flattens [N, C, d…] to [N, C·Πd]; None if not provable."""
    shape = state.static_shape(y)
    if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    per_channel = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    features = shape[1] * per_channel
    if node.op == "Flatten":
        return per_channel if int(node.attrs.get("axis", 1)) == 1 else None
    target = planner.const(node, 1, "shape")
    if target is None or isinstance(target, SkipReason):
        return None
    t = [int(v) for v in np.asarray(target).reshape(-1)]
    if len(t) != 2 or int(node.attrs.get("allowzero", 0)):
        return None
    first_ok = t[0] in (0, -1) or (shape[0] is not None and t[0] == shape[0])
    if first_ok and t[1] in (-1, features) and not (t[0] == -1 and t[1] == -1):
        return per_channel
    return None


# ---------------------------------------------------------------------------------------------
# rewriting
# ---------------------------------------------------------------------------------------------
def _apply_producer(graph: gs.Graph, plan: LayerPlan, steps: list[AffineStep], y: gs.Tensor, state: PassState) -> None:
    """The producer takes over the chain's output tensor, so graph-output names survive."""
    producer = plan.node
    _write_params(graph, plan, state)
    last = steps[-1].node
    last.outputs.clear()
    producer.outputs = [y]
    _add_bias_after(graph, plan, state)
    _remove_dead(graph, [s.node for s in steps], state)


def _apply_consumer(
    graph: gs.Graph,
    plan: LayerPlan,
    flatten: gs.Node | None,
    steps: list[AffineStep],
    x: gs.Tensor,
    y: gs.Tensor,
    state: PassState,
) -> None:
    """The consumer (or the Flatten before it) reads the chain's input instead of its output."""
    consumer = plan.node
    _write_params(graph, plan, state)
    reader = flatten if flatten is not None else consumer
    reader.inputs[0] = x
    _add_bias_after(graph, plan, state)
    _remove_dead(graph, [s.node for s in steps], state)


def _add_bias_after(graph: gs.Graph, plan: LayerPlan, state: PassState) -> None:
    """MatMul has no bias input: route its output through an Add of the folded bias (the tensor keeps its name)."""
    if plan.bias_after is None:
        return
    node, out = plan.node, plan.node.outputs[0]
    mid = gs.Variable(state.unique(f"{out.name}_matmul"), dtype=out.dtype, shape=out.shape)
    node.outputs = [mid]
    bias = gs.Constant(state.unique(f"{display(node)}.bias"), plan.bias_after)
    graph.nodes.append(gs.Node("Add", name=state.unique(f"{display(node)}_bias_add"), inputs=[mid, bias], outputs=[out]))


def _write_params(graph: gs.Graph, plan: LayerPlan, state: PassState) -> None:
    """Write each new value into a private constant; never change a tensor another node reads.

    Highest input first, dropping what the replaced value was computed from: a dynamo export's conv bias
    `Expand(CastLike(0, x), Shape(W)[0])` reads W, and once it is gone W is private and keeps its name.
    """
    node = plan.node
    for index, values in sorted(plan.params.items(), reverse=True):
        old = node.inputs[index] if index < len(node.inputs) else None
        present = old is not None and not (isinstance(old, gs.Variable) and not old.name)
        private = isinstance(old, gs.Constant) and len(old.outputs) == 1
        if present and private:
            assert isinstance(old, gs.Constant)
            old.values = _held_value(values, old.name, state.spill)
            old.data_location = None  # the new value lives in memory (or the spill), not where the old one did
            state.modified.add(old.name)
            state.resolver.forget(old)
            continue
        base = old.name if present and old.name else f"{display(node)}.{'bias' if index == 2 else 'param'}"
        new_name = state.unique(f"{base}_folded" if present else base)
        new = gs.Constant(new_name, _held_value(values, new_name, state.spill))
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        if index < len(node.inputs):
            node.inputs[index] = new
        else:
            node.inputs.append(new)
        if present:
            _remove_dead(graph, [], state, [old])
    for key, value in plan.attrs.items():
        node.attrs[key] = value


class Spill:
    """An append-only file of folded weights, so a model of any size folds in bounded memory.

    Each weight is written as soon as it is folded and kept in the graph as a reference (absolute path,
    offset, length); `bnfold.onnx.io.save_model` streams it into the output's data file.
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


def _held_value(values: np.ndarray, name: str, spill: Spill | None) -> np.ndarray | gs.ir.tensor.LazyValues:
    """A folded value as the graph should hold it: in memory, or — with a spill file — on disk.

    In memory it stays a numpy array until `api._unpark` writes its bytes into the output model once;
    with a spill file, large values leave memory altogether.
    """
    if spill is not None and values.nbytes >= Spill.MIN_BYTES:
        return gs.ir.tensor.LazyValues(spill.add(values, name))
    return np.ascontiguousarray(values)  # large ones are written straight into the output (api._unpark)


def _remove_dead(
    graph: gs.Graph, removed: list[gs.Node], state: PassState, tensors: list[gs.Tensor] | tuple = ()
) -> None:
    """Disconnect the folded chain, then drop whatever only it used (constant subexpressions).

    Targeted rather than `graph.cleanup()`: cleanup would also delete dead nodes the user already had,
    which is not ours to change.
    """
    work: list[gs.Tensor] = list(tensors)
    for node in removed:
        work.extend(node.inputs)
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                state.modified.add(t.name)
        node.inputs.clear()
        node.outputs.clear()
    dead = {id(n) for n in removed}
    own = {id(n) for n in graph.nodes}  # never reach into an outer graph from a subgraph
    while work:
        t = work.pop()
        if t.outputs or is_graph_output(t, graph) or not t.inputs:
            if isinstance(t, gs.Constant) and not t.outputs:
                state.modified.add(t.name)
            continue
        node = t.inputs[0]
        if id(node) not in own or any(o.outputs or is_graph_output(o, graph) for o in node.outputs):
            continue
        work.extend(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        dead.add(id(node))
    graph.nodes = [n for n in graph.nodes if id(n) not in dead]
