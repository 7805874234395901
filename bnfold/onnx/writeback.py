"""The folded model: the source ModelProto with the applied plan written back into it.

Why not export the graph: the pass plans and applies its folds on an onnx-graphsurgeon graph (`plan.py`,
`fold.py`), and ``gs.export_onnx`` rebuilds every node, tensor and value_info of it — per-node work that
cost ~5-7 ms of a 60 ms ShuffleNetV2 fold, plus ~2 ms for the ``toposort`` before it — and drops what
its graph does not carry: node doc strings and metadata_props, initializers listed as graph inputs, the
doc strings of graph inputs and outputs, the model's fields and functions, each of which then had to be
put back; and value_info doc strings, initializers no node reads, attributes of the types it does not
read (a Constant's ``sparse_value``: the fold of such a model failed the checker), which never were.

So the folded model is the source model, edited where the fold changed something and nowhere else.
`Imported` records, right after ``gs.import_onnx`` and before any fold, what each node was:
onnx-graphsurgeon imports the nodes of every graph in the proto's order (main graph, subgraphs through
node attributes — If/Loop/Scan bodies —, local function bodies), so the i-th node of a graph came from
its i-th NodeProto. `write_back` then compares the graph with that record:

* nodes: one the fold left alone stays its NodeProto; one it rewired gets its new input and output
  names; one whose op, name or attributes it changed keeps its NodeProto with those fields rewritten
  (each changed attribute by onnx-graphsurgeon's own ``OnnxExporter.export_attributes``); one it created
  is exported whole (``OnnxExporter.export_node``); one it removed goes. Order: the source's, a created
  node right after the last node it reads from (a bias Add after its MatMul) or, reading none, right
  before its first reader; so a diff of input and output shows the fold and nothing else. Should that
  order not be topological (no rule makes such a graph today), a stable topological sort fixes it.
* initializers: one the fold left alone stays the source's TensorProto, never copied; a changed one is
  rewritten in its place and a new one appended, each by the `TensorStore` that holds its value (in
  memory, spilled, or pending for the streaming writer); one the fold removed goes (one no node read to
  begin with is the user's business, and stays). A local function has no initializers: a new
  constant there becomes a Constant node, as onnx-graphsurgeon's function export does.
* graph inputs: an initializer the fold removed leaves them; from IR 4 on, so does an overridable one it
  changed (overriding it would no longer mean the same); before IR 4, which requires every initializer
  listed, each new one is added. value_info and quantization annotations of a tensor that no longer
  exists go.

Doc strings, metadata_props, value_info, opset imports, functions and the model's own fields are never
touched, so nothing has to be restored.
"""

from __future__ import annotations

import heapq
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Union

import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from bnfold.onnx import io
from bnfold.onnx.storage import TensorStore, write_value

Body = Union[onnx.GraphProto, onnx.FunctionProto]


@dataclass(eq=False)
class _Part:
    """One graph of the model as imported: the main graph, a subgraph, or a local function's body.

    ``path``: from the model to its proto — ``("function", k)`` for the k-th function, then one
    ``(node index, attribute name)`` per subgraph. ``state``: per node, what it was — op, domain, name,
    attribute names, attribute values (compared by identity), input names, output names.
    """

    graph: gs.Graph
    path: tuple
    parent: "_Part | None"
    function: bool
    nodes: list[gs.Node]
    state: list[tuple]
    index: dict[int, int]
    children: list["_Part"] = field(default_factory=list)


class Imported:
    """What every node of an imported model was, recorded before the plan runs (in place) on the graph."""

    def __init__(self, graph: gs.Graph, model: onnx.ModelProto) -> None:
        self.parts: list[_Part] = []  # parents before their subgraphs
        self._take(graph, (), None, False)
        for k, function in enumerate(graph.functions):
            self._take(function, (("function", k),), None, True)
        main = self.parts[0]
        if len(main.nodes) != len(model.graph.node) or len(graph.functions) != len(model.functions):
            raise AssertionError("onnx-graphsurgeon did not import one node per NodeProto")  # the premise of the write-back

    def _take(self, graph: gs.Graph, path: tuple, parent: _Part | None, function: bool) -> None:
        nodes = list(graph.nodes)
        state: list[tuple] = []
        part = _Part(graph, path, parent, function, nodes, state, {id(n): i for i, n in enumerate(nodes)})
        self.parts.append(part)
        if parent is not None:
            parent.children.append(part)
        for i, node in enumerate(nodes):
            attrs = node.attrs
            values = tuple(attrs.values())
            state.append((node.op, node.domain, node.name, tuple(attrs), values,
                          [t.name for t in node.inputs], [t.name for t in node.outputs]))
            for key, value in zip(attrs, values):
                if isinstance(value, gs.Graph):
                    self._take(value, path + ((i, key),), part, False)


@dataclass(eq=False)
class _Changes:
    """What the fold did to one part's nodes, and the constants its nodes now read."""

    live: list[gs.Node]
    target: Body
    source: Body  # the same graph in the imported model (`target` itself unless the target is a copy)
    rewired: dict[int, tuple[list[str], list[str]]] = field(default_factory=dict)  # source position → new names
    changed: dict[int, gs.Node] = field(default_factory=dict)  # op, name or attributes changed
    created: list[gs.Node] = field(default_factory=list)
    reads: dict[str, gs.Constant] = field(default_factory=dict)
    names: set[str] | None = None  # tensor names still in use, where the part has value_info to prune


def write_back(
    imported: Imported,
    source: onnx.ModelProto,
    target: onnx.ModelProto,
    store: TensorStore,
    modified: set[str],
    overridable: set[str],
) -> None:
    """Write the folds made on `imported`'s graph into `target`: `source` itself, or a copy of it whose
    main graph has no initializers yet (`copy_for_write_back`).

    ``source``: the model that was imported (its initializers tell an untouched constant from a changed
    one; never written when `target` is a copy). ``modified``: initializer names the folds changed or
    dropped (`GraphEdit.modified`). ``overridable``: the source's initializers listed as graph inputs.
    """
    changes: dict[int, _Changes] = {}
    bodies: dict[tuple, tuple[Body, Body]] = {(): (target.graph, source.graph)}  # path → (target's, source's)
    bodies.update({(("function", k),): (f, source.functions[k]) for k, f in enumerate(target.functions)})
    for part in imported.parts:  # parents first
        if part.path not in bodies:  # a subgraph of a node the fold removed, or one it replaced: nothing to write
            continue
        body, original = bodies[part.path]
        if len(body.node) != len(part.nodes):
            raise AssertionError(f"graph {part.path}: {len(body.node)} NodeProtos, {len(part.nodes)} imported nodes")
        changes[id(part)] = found = _changes(part, body, original)
        live = {id(n) for n in found.live}
        for child in part.children:  # found now, while the NodeProtos are where they were
            i, key = child.path[-1]
            node = part.nodes[i]
            if id(node) in live and node.attrs.get(key) is child.graph:
                bodies[child.path] = (_subgraph(body, i, key), _subgraph(original, i, key))
    homes = _homes(imported, changes)
    for part in imported.parts:
        found = changes.get(id(part))
        if found is None:
            continue
        constants = homes.get(id(part), {})
        if part.function:
            _write_nodes(part, found, list(constants.values()))
        else:
            _write_nodes(part, found, [])
            fill = not part.path and target is not source
            removed, new = _write_initializers(part, found, constants, store, modified, fill)
            if not part.path:
                _write_graph_inputs(target, removed, new, modified, overridable)
        if found.names is not None:
            _prune_value_info(found.target, found.names)


def copy_for_write_back(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` to write a fold into, but for its main graph's initializers: `write_back` adds
    those itself, so that none the fold rewrites or removes is copied first (most weights, in a CNN)."""
    out = onnx.ModelProto()
    io.copy_fields(model, out, skip=("graph",))
    io.copy_fields(model.graph, out.graph, skip=("initializer",))
    return out


def _subgraph(body: Body, i: int, key: str) -> onnx.GraphProto:
    return next(a.g for a in body.node[i].attribute if a.name == key)


def _changes(part: _Part, body: Body, original: Body) -> _Changes:
    """Compare one part's nodes with the record: which were rewired, changed, created; what they read."""
    live = list(part.graph.nodes)
    found = _Changes(live, body, original)
    annotated = len(getattr(body, "value_info", ())) or len(getattr(body, "quantization_annotation", ()))
    names = found.names = set() if annotated else None
    index, state, is_ = part.index, part.state, operator.is_
    reads = found.reads
    for node in live:
        ins = [t.name for t in node.inputs]
        outs = [t.name for t in node.outputs]
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                reads[t.name] = t
        if names is not None:
            names.update(ins)
            names.update(outs)
        i = index.get(id(node))
        if i is None:
            found.created.append(node)
            continue
        op, domain, name, keys, values, old_ins, old_outs = state[i]
        attrs = node.attrs
        if (node.op != op or node.domain != domain or node.name != name or len(attrs) != len(keys)
                or not all(map(is_, attrs.values(), values)) or tuple(attrs) != keys):
            found.changed[i] = node
        if ins != old_ins or outs != old_outs:
            found.rewired[i] = (ins, outs)
    for t in part.graph.outputs:
        if isinstance(t, gs.Constant):
            reads[t.name] = t
    if names is not None:
        names.update(t.name for t in part.graph.inputs)
        names.update(t.name for t in part.graph.outputs)
    return found


def _homes(imported: Imported, changes: dict[int, _Changes]) -> dict[int, dict[str, gs.Constant]]:
    """Which part each constant read by a node belongs to: the innermost scope that holds it as an
    initializer (outer-scope reads from a subgraph included), else — a constant the fold made — the
    innermost part that all its readers share. A main graph's or function body's own reads are its own
    (no scope above): only reads from subgraphs need the search."""
    by_path = {p.path: p for p in imported.parts}
    held: dict[int, set[str]] = {}  # part → its initializer names, built on first need

    def holds(part: _Part, name: str) -> bool:
        if part.function:
            return False
        names = held.get(id(part))
        if names is None:
            body = changes[id(part)].source
            names = held[id(part)] = {t.name for t in body.initializer} | {s.values.name for s in body.sparse_initializer}
        return name in names

    homes: dict[int, dict[str, gs.Constant]] = {}
    readers: dict[str, tuple[gs.Constant, list[_Part]]] = {}
    for part in imported.parts:
        found = changes.get(id(part))
        if found is None:
            continue
        if part.parent is None:
            homes.setdefault(id(part), {}).update(found.reads)
            continue
        top = part
        while top.parent is not None:
            top = top.parent
        for name, constant in found.reads.items():
            scope: _Part | None = part
            while scope is not None and not holds(scope, name):
                scope = scope.parent
            if scope is not None:
                homes.setdefault(id(scope), {})[name] = constant
            elif name not in changes[id(top)].reads:  # else the top graph's own read placed it there
                readers.setdefault(name, (constant, []))[1].append(part)
    for name, (constant, parts) in readers.items():
        home = by_path[tuple(os.path.commonprefix([p.path for p in parts]))]
        homes.setdefault(id(home), {})[name] = constant
    return homes


# ---------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------
def _write_nodes(part: _Part, found: _Changes, constants: list[gs.Constant]) -> None:
    """Rewire, rewrite, remove and add the NodeProtos of one part; ``constants``: a function body's new
    constants, each to become a Constant node."""
    body, live = found.target, found.live
    protos = body.node
    touched = {**found.rewired, **found.changed}
    wrappers = {i: protos[i] for i in touched}  # before any removal moves them
    for i, (ins, outs) in found.rewired.items():
        p = wrappers[i]
        del p.input[:]
        p.input.extend(ins)
        del p.output[:]
        p.output.extend(outs)
    for i, node in found.changed.items():
        _rewrite(wrappers[i], node, part.state[i])
    created = [(node, OnnxExporter.export_node(node)) for node in found.created]
    created += [(_Constant(c), helper.make_node("Constant", [], [c.name], value=_tensor(c))) for c in constants]
    if created:
        keys = _keys(part, found, created)
        order = sorted(live + [n for n, _ in created if isinstance(n, _Constant)], key=lambda n: keys[id(n)])
    else:  # the source's order, less what the fold removed (the graph's own, unless a rule moved a node)
        keys, order = {}, live
        if not _ascending([part.index[id(n)] for n in live]):
            order = sorted(live, key=lambda n: part.index[id(n)])
    if (touched or created) and not _topological(part, found, order, created):
        keys = keys or {id(n): (part.index[id(n)],) for n in live}
        order = _toposorted(part, order, created, keys)
    kept = [part.index[id(n)] for n in order if id(n) in part.index]
    if not _ascending(kept):
        _reorder(part, found, created, order)
        return
    for i in sorted(set(range(len(part.nodes))) - set(kept), reverse=True):
        del protos[i]
    new = {id(n): p for n, p in created}
    for position, node in enumerate(order):
        p = new.get(id(node))
        if p is not None:
            protos.insert(position, p)


def _ascending(positions: list[int]) -> bool:
    return all(a < b for a, b in zip(positions, positions[1:]))


class _Constant:
    """The Constant node a function body gets for a new constant (`write_back`): for ordering only."""

    def __init__(self, constant: gs.Constant) -> None:
        self.constant = constant
        self.inputs: list = []
        self.outputs = [constant]


def _tensor(constant: gs.Constant) -> onnx.TensorProto:
    out = onnx.TensorProto()
    write_value(constant, out)
    return out


def _rewrite(proto: onnx.NodeProto, node: gs.Node, state: tuple) -> None:
    """The fields of a node the fold changed, in place: op, domain, name, and each changed attribute."""
    op, domain, name, keys, values, _, _ = state
    if node.op != op:
        proto.op_type = node.op
    if node.domain != domain:
        if node.domain is None:
            proto.ClearField("domain")
        else:
            proto.domain = node.domain
    if node.name != name:
        proto.name = node.name
    old = dict(zip(keys, values))
    for key, value in node.attrs.items():
        if key in old and old[key] is value:
            continue
        (attr,) = OnnxExporter.export_attributes({key: value})
        existing = next((a for a in proto.attribute if a.name == key), None)
        if existing is None:
            proto.attribute.append(attr)
        else:
            existing.CopyFrom(attr)
    for key in keys:
        if key not in node.attrs:
            proto.attribute.remove(next(a for a in proto.attribute if a.name == key))


def _keys(part: _Part, found: _Changes, created: list[tuple[Any, onnx.NodeProto]]) -> dict[int, tuple]:
    """Sort keys: a kept node's source position; a created one right after the last node of this graph
    it reads from, or — reading none — just before its first kept reader (at the front without one)."""
    keys: dict[int, tuple] = {id(n): (part.index[id(n)],) for n in found.live if id(n) in part.index}
    live = {id(n) for n in found.live}
    seq = {id(n): s for s, (n, _) in enumerate(created)}

    def before(readers: list[tuple], s: int) -> tuple:
        if not readers:
            return (-1, s)
        first = min(readers)
        return first[:-1] + (first[-1] - 0.5, s)

    def key(node: gs.Node, visiting: set[int]) -> tuple | None:
        k = keys.get(id(node))
        if k is not None or id(node) in visiting:  # a cycle is left to the topological sort
            return k
        visiting.add(id(node))
        after = [key(p, visiting) for t in node.inputs for p in t.inputs if id(p) in live]
        after = [k for k in after if k is not None]
        if after:
            k = max(after) + (seq[id(node)],)
        else:
            k = before([keys[id(c)] for t in node.outputs for c in t.outputs if id(c) in keys and id(c) in part.index], seq[id(node)])
        keys[id(node)] = k
        return k

    constants = []
    for node, _ in created:
        if isinstance(node, _Constant):
            constants.append(node)
        else:
            key(node, set())
    for node in constants:  # after every reader has its key
        readers = [keys[id(c)] for c in node.constant.outputs if id(c) in keys]
        keys[id(node)] = before(readers, seq[id(node)])
    return keys


def _producers(node, live: set[int]) -> list:
    """The nodes of this graph that `node` reads from (a function's Constant stand-in reads none)."""
    return [p for t in node.inputs for p in t.inputs if id(p) in live]


def _readers(node, live: set[int]) -> list:
    return [c for t in node.outputs for c in t.outputs if id(c) in live]


def _topological(part: _Part, found: _Changes, order: list, created: list) -> bool:
    """Whether every node the fold touched comes after what it reads and before what reads it (the
    others kept their edges and their relative order from a source that the checker found sorted)."""
    position = {id(n): k for k, n in enumerate(order)}
    touched = [part.nodes[i] for i in (*found.rewired, *found.changed)] + [n for n, _ in created]
    for node in touched:
        here = position[id(node)]
        if any(position[id(p)] >= here for p in _producers(node, position.keys())):
            return False
        if any(position[id(c)] <= here for c in _readers(node, position.keys())):
            return False
    return True


def _toposorted(part: _Part, order: list, created: list, keys: dict[int, tuple]) -> list:
    """A topological order of `order`, each node as early as its key allows (Kahn, smallest key first)."""
    members = {id(n): n for n in order}
    deps = {id(n): {id(p) for p in _producers(n, members.keys())} for n in order}
    for node, _ in created:
        if isinstance(node, _Constant):
            for c in node.constant.outputs:
                if id(c) in deps:
                    deps[id(c)].add(id(node))
    users: dict[int, list[int]] = {k: [] for k in members}
    for k, ds in deps.items():
        for d in ds:
            users[d].append(k)
    waiting = {k: len(ds) for k, ds in deps.items()}
    ready = [(keys[k], k) for k, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, k = heapq.heappop(ready)
        out.append(members[k])
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (keys[u], u))
    if len(out) != len(order):
        raise AssertionError(f"graph {part.path}: the folded graph has a cycle")
    return out


def _reorder(part: _Part, found: _Changes, created: list, order: list) -> None:
    """Any order at all (the topological sort moved kept nodes): remove, append, then sort the NodeProtos."""
    protos = found.target.node
    wrapper = {part.index[id(n)]: protos[part.index[id(n)]] for n in order if id(n) in part.index}
    for i in sorted(set(range(len(part.nodes))) - set(wrapper), reverse=True):
        del protos[i]
    new = {}
    for node, proto in created:
        protos.append(proto)
        new[id(node)] = protos[len(protos) - 1]
    rank = {id(wrapper[part.index[id(n)]] if id(n) in part.index else new[id(n)]): k for k, n in enumerate(order)}
    protos.sort(key=lambda p: rank[id(p)])


# ---------------------------------------------------------------------------------------------
# initializers, graph inputs, value_info
# ---------------------------------------------------------------------------------------------
def _write_initializers(
    part: _Part,
    found: _Changes,
    constants: dict[str, gs.Constant],
    store: TensorStore,
    modified: set[str],
    fill: bool,
) -> tuple[set[str], list[onnx.TensorProto]]:
    """Keep, rewrite, add and remove one graph's initializers. Returns the names removed and the new tensors.

    ``fill``: the target graph has no initializers yet (the main graph of a copy, `write_back`): they
    are added here in the source's order, so a folded value is never first copied and then replaced.
    """
    body, source = found.target, found.source
    originals = source.initializer
    index = {t.name: k for k, t in enumerate(originals)}
    sparse = {s.values.name: k for k, s in enumerate(source.sparse_initializer)}
    main = not part.path
    rewrite: dict[int, gs.Constant] = {}
    made: list[gs.Constant] = []
    dropped_sparse: list[int] = []
    for name, constant in constants.items():
        values = constant._values
        k = index.get(name)
        if k is not None:
            if not (isinstance(values, LazyValues) and values.tensor is originals[k]):
                rewrite[k] = constant  # else untouched: the source's own TensorProto
            continue
        k = sparse.get(name)
        if k is not None:
            if isinstance(values, SparseValues) and values.tensor is source.sparse_initializer[k]:
                continue
            dropped_sparse.append(k)  # a fold wrote a dense value: a dense initializer replaces it
        made.append(constant)
    gone = {index[n] for n in modified if n in index and n not in constants}
    removed = {originals[k].name for k in gone}
    if fill:
        for k, tensor in enumerate(originals):
            if k in gone:
                continue
            if k in rewrite:
                store.write(rewrite[k], body.initializer.add(), may_pend=main)
            else:
                body.initializer.add().CopyFrom(tensor)  # measured 2-3x faster than append(tensor)
    else:
        for k, constant in rewrite.items():
            store.write(constant, body.initializer[k], may_pend=main)
        for k in sorted(gone, reverse=True):
            del body.initializer[k]
    new = []
    for constant in made:
        tensor = body.initializer.add()
        store.write(constant, tensor, may_pend=main)
        new.append(tensor)
    dropped_sparse += [sparse[n] for n in modified if n in sparse and n not in constants]
    for k in sorted(set(dropped_sparse), reverse=True):
        removed.add(body.sparse_initializer[k].values.name)
        del body.sparse_initializer[k]
    return removed - constants.keys(), new


def _write_graph_inputs(
    model: onnx.ModelProto, removed: set[str], new: list[onnx.TensorProto], modified: set[str], overridable: set[str]
) -> None:
    """Initializers listed as graph inputs: the removed ones leave; from IR 4 on the changed ones too
    (they were overridable defaults); before IR 4 every initializer is listed, so the new ones are added."""
    graph = model.graph
    drop = set(removed)
    if model.ir_version >= 4:
        drop |= overridable & modified
    if drop:
        for k in reversed([k for k, v in enumerate(graph.input) if v.name in drop]):
            del graph.input[k]
    if model.ir_version < 4:
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new)


def _prune_value_info(body: Body, names: set[str]) -> None:
    """value_info and quantization annotations of tensors the fold removed go; the rest stays as the
    source had it (an annotation naming a tensor that no longer exists would mislead a quantizer)."""
    gone = [k for k, v in enumerate(body.value_info) if v.name not in names]
    for k in reversed(gone):
        del body.value_info[k]
    annotations = getattr(body, "quantization_annotation", None)
    if annotations is not None:
        gone = [k for k, a in enumerate(annotations) if a.tensor_name not in names]
        for k in reversed(gone):
            del annotations[k]
