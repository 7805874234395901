"""Applying a plan: the graph edits a fold makes, through onnx-graphsurgeon.

A rule's `apply` (``bnfold/onnx/rules``) calls these on a `GraphEdit`: write new parameter values into
private constants, add the bias Add a MatMul needs, drop the folded chain and whatever only it used.
Each fold's edits run while planning (so that later decisions see earlier folds, see `plan.py`): on the
API's own graph (in place), or on a scratch copy and then again on the real graph when the plan is
applied. Every edit is deterministic (names from `unique`, values already computed), so a replay
produces the same graph. How a folded value is held (memory, spill file) is the `TensorStore`'s
business (`storage.py`): `write_params` hands each value over and puts what it gets back in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from bnfold.onnx.chain import display, is_graph_output
from bnfold.onnx.storage import TensorStore, in_memory


@dataclass
class GraphEdit:
    """The graph a fold rewrites, the names it may take, and what it changed.

    ``modified``: initializer names whose values changed or vanished (the API keeps them off the graph
    inputs). ``forget``: told of every constant whose value changed (the planner's constant cache).
    """

    graph: gs.Graph
    names: set[str]
    modified: set[str] = field(default_factory=set)
    store: TensorStore | None = None  # holds the folded values (None: a check, values stay as computed)
    forget: Callable[[gs.Tensor], None] = lambda tensor: None
    dead: dict[int, gs.Node] = field(default_factory=dict, repr=False)  # cut off by `remove_dead`, in graph.nodes until `prune`
    _own: tuple[list, int, set[int]] | None = field(default=None, init=False, repr=False)  # see `_own_nodes`

    def for_graph(self, graph: gs.Graph) -> "GraphEdit":
        """The same edit (names, modified set, store) on another graph of the model (a subgraph)."""
        return GraphEdit(graph, self.names, self.modified, self.store, self.forget)

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def write_params(self, node: gs.Node, params: dict[int, Any], attrs: dict[str, Any]) -> None:
        """Write each new value into a private constant; never change a tensor another node reads.

        Highest input first, dropping what the replaced value was computed from: a dynamo export's conv bias
        `Expand(CastLike(0, x), Shape(W)[0])` reads W, and once it is gone W is private and keeps its name.
        Each value is replaced in `params` by the way the store holds it (`TensorStore.hold`), so a second
        run of the same edit (the real apply after the planning rehearsal) writes the same object, spilled once.
        """
        for index in sorted(params, reverse=True):
            old = node.inputs[index] if index < len(node.inputs) else None
            present = old is not None and not (isinstance(old, gs.Variable) and not old.name)
            private = isinstance(old, gs.Constant) and len(old.outputs) == 1
            if present and private:
                assert isinstance(old, gs.Constant)
                old.values = params[index] = self._held(params[index], old.name)
                old.data_location = None  # the new value lives in memory (or the spill), not where the old one did
                self.modified.add(old.name)
                self.forget(old)
                continue
            base = old.name if present and old.name else f"{display(node)}.{'bias' if index == 2 else 'param'}"
            new_name = self.unique(f"{base}_folded" if present else base)
            params[index] = self._held(params[index], new_name)
            new = gs.Constant(new_name, params[index])
            while len(node.inputs) < index:
                node.inputs.append(gs.Variable.empty())
            if index < len(node.inputs):
                node.inputs[index] = new
            else:
                node.inputs.append(new)
            if present:
                self.remove_dead([], [old])
        for key, value in attrs.items():
            node.attrs[key] = value

    def _held(self, values: Any, name: str) -> Any:
        return in_memory(values) if self.store is None else self.store.hold(values, name)

    def add_bias_after(self, node: gs.Node, bias: np.ndarray | None) -> None:
        """MatMul has no bias input: route its output through an Add of the folded bias (the tensor keeps its name)."""
        if bias is None:
            return
        out = node.outputs[0]
        mid = gs.Variable(self.unique(f"{out.name}_matmul"), dtype=out.dtype, shape=out.shape)
        node.outputs = [mid]
        constant = gs.Constant(self.unique(f"{display(node)}.bias"), bias)
        self.graph.nodes.append(
            gs.Node("Add", name=self.unique(f"{display(node)}_bias_add"), inputs=[mid, constant], outputs=[out])
        )

    def remove_dead(self, removed: list[gs.Node], tensors: list[gs.Tensor] | tuple = ()) -> None:
        """Disconnect the folded chain, then drop whatever only it used (constant subexpressions).

        Targeted rather than `graph.cleanup()`: cleanup would also delete dead nodes the user already had,
        which is not ours to change. The nodes are cut off here (no inputs, no outputs: nothing reaches
        them) and leave `graph.nodes` at `prune`, once per graph: rebuilding the list on every fold made
        planning quadratic in the number of nodes.
        """
        graph = self.graph
        work: list[gs.Tensor] = list(tensors)
        dead = self.dead
        for node in removed:
            work.extend(node.inputs)
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    self.modified.add(t.name)
            node.inputs.clear()
            node.outputs.clear()
            dead[id(node)] = node
        own: set[int] | None = None  # never reach into an outer graph from a subgraph
        while work:
            t = work.pop()
            if t.outputs or is_graph_output(t, graph) or not t.inputs:
                if isinstance(t, gs.Constant) and not t.outputs:
                    self.modified.add(t.name)
                continue
            producer = t.inputs[0]
            if own is None:  # looked up on first need only: a plain Conv → BN fold never reaches a producer
                own = self._own_nodes()
            if id(producer) not in own or any(o.outputs or is_graph_output(o, graph) for o in producer.outputs):
                continue
            work.extend(producer.inputs)
            producer.inputs.clear()
            producer.outputs.clear()
            dead[id(producer)] = producer

    def _own_nodes(self) -> set[int]:
        """Ids of `graph.nodes`, kept across folds: a dynamo export reaches a producer (its conv bias's
        Expand) on every fold, and a set built each time made that O(nodes) per fold. Between prunes the
        list only grows (`add_bias_after` appends), so the ids of its new tail are added; a list replaced
        (`prune`) or shorter is counted again."""
        nodes, cached = self.graph.nodes, self._own
        if cached is None or cached[0] is not nodes or cached[1] > len(nodes):
            cached = self._own = (nodes, len(nodes), {id(n) for n in nodes})
        elif cached[1] < len(nodes):
            cached[2].update(id(n) for n in nodes[cached[1] :])
            cached = self._own = (nodes, len(nodes), cached[2])
        return cached[2]

    def prune(self) -> None:
        """Take the nodes `remove_dead` cut off out of `graph.nodes` (the others keep their order)."""
        if self.dead:
            dead = self.dead
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in dead]
            dead.clear()
