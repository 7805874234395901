"""A scratch copy of a graph's structure, and the way back to the original's objects.

The planner rehearses each fold on this copy (see `plan.py`), so it must behave exactly like the
original: same nodes in the same order, same tensors, and the same order of every node's inputs and
outputs *and* of every tensor's producers and consumers (messages and "the sole consumer" tests read
those lists). onnx-graphsurgeon's own `Graph.copy` rebuilds consumer lists in its own order, shares
function bodies, and drops a constant's data location, so the copy is made here. Weights are shared,
never copied: a rehearsed fold replaces a copy's value, it never writes into an array.
"""

from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs


class ScratchCopy:
    """`graph` copied with its subgraphs; `original(obj)` maps a copied node, tensor or graph back."""

    def __init__(self, graph: gs.Graph) -> None:
        self._copies: dict[int, Any] = {}  # id(original) → copy
        self._originals: dict[int, Any] = {}  # id(copy) → original
        self._pairs: list[tuple[Any, Any]] = []  # keeps every original alive, so no id is reused
        self.graph = self._graph(graph)
        for original, copy in self._pairs:
            if isinstance(original, gs.Node):
                list.extend(copy.inputs, [self._tensor(t) for t in original.inputs])
                list.extend(copy.outputs, [self._tensor(t) for t in original.outputs])
        for original, copy in list(self._pairs):
            if isinstance(original, gs.Tensor):
                list.extend(copy.inputs, [self._node(n) for n in original.inputs])
                list.extend(copy.outputs, [self._node(n) for n in original.outputs])

    def original(self, obj: Any) -> Any:
        """The original of a copied node, tensor or graph; a KeyError for one the rehearsal created."""
        return self._originals[id(obj)]

    # ------------------------------------------------------------------------------------------
    def _remember(self, original: Any, copy: Any) -> Any:
        self._copies[id(original)] = copy
        self._originals[id(copy)] = original
        self._pairs.append((original, copy))
        return copy

    def _graph(self, graph: gs.Graph) -> gs.Graph:
        nodes = [self._node(n) for n in graph.nodes]
        copy = gs.Graph(
            nodes=nodes,
            inputs=[self._tensor(t) for t in graph.inputs],
            outputs=[self._tensor(t) for t in graph.outputs],
            name=graph.name,
        )
        return self._remember(graph, copy)

    def _node(self, node: gs.Node) -> gs.Node:
        known = self._copies.get(id(node))
        if known is not None:
            return known
        attrs = {k: (self._graph(v) if isinstance(v, gs.Graph) else v) for k, v in node.attrs.items()}
        copy = gs.Node(node.op, name=node.name, attrs=attrs, domain=node.domain)  # wired in __init__
        return self._remember(node, copy)

    def _tensor(self, tensor: gs.Tensor) -> gs.Tensor:
        known = self._copies.get(id(tensor))
        if known is not None:
            return known
        if isinstance(tensor, gs.Constant):
            copy: gs.Tensor = gs.Constant(
                tensor.name, tensor._values, data_location=tensor.data_location, export_dtype=tensor._export_dtype
            )
        else:
            copy = gs.Variable(tensor.name, dtype=tensor.dtype, shape=tensor.shape, type=tensor.type)
        return self._remember(tensor, copy)
