"""The model's dataflow as module call sites, built from torch.fx or torch.export.

Both tracers end in the same small picture, so the pairing rules exist once:

* a *site* is one call of one recognised module (a producer or a BatchNorm): the tensor values that
  flow in from outside the call and the one value it returns;
* every value knows its consumers: other sites, or other graph nodes (named, for the report), or the
  graph output;
* traced shapes where the tracer has them;
* the parameters and buffers that the graph reads outside their own module's calls (``self.conv.weight``
  used in ``forward``): such a module cannot be rewritten safely.

fx leaves recognised modules whole (one ``call_module`` node per call). torch.export inlines every
module into aten ops and tags each op with ``nn_module_stack``; the ops of one call share the innermost
stack key (``L__self__conv@1`` for the second call), which is how a call becomes a site again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from bnfold.torch.kinds import ModuleInfo


@dataclass
class Site:
    """One call of a recognised module."""

    module: str  # canonical qualified name
    inputs: list[str]  # values flowing in from outside the call
    outputs: list[str]  # values leaving the call (normally one)
    label: str  # e.g. "conv@1" for the report


@dataclass
class SiteGraph:
    """Sites, consumers and shapes of one traced forward."""

    analysis: str  # "torch.fx" | "torch.export"
    sites: list[Site] = field(default_factory=list)
    producer_of: dict[str, int] = field(default_factory=dict)  # value → index of the site returning it
    consumers: dict[str, list[str]] = field(default_factory=dict)  # value → ["site:3", "node:add_1", "output"]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outside_reads: dict[str, str] = field(default_factory=dict)  # "conv.weight" → reading node
    compute_nodes: int = 0  # work nodes, a module call counted once
    described: dict[str, str] = field(default_factory=dict)  # value → words for the report

    def describe(self, value: str) -> str:
        return self.described.get(value, value)

    def sites_of(self, module: str) -> list[int]:
        return [i for i, s in enumerate(self.sites) if s.module == module]


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


# ---------------------------------------------------------------------------------------------
# torch.fx
# ---------------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    """fx's tracer, keeping every recognised module a leaf (FrozenBatchNorm2d would be traced through)."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, module_qualified_name)


def trace_fx(model: nn.Module, infos: dict[int, ModuleInfo]) -> fx.GraphModule:
    """Symbolically trace ``model``; raises whatever fx raises when the forward is not traceable."""
    tracer = _LeafTracer(set(infos))
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def propagate_shapes(gm: fx.GraphModule, args: tuple) -> None:
    """Attach real shapes to the fx nodes by running the traced module once on ``args``."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*args)


def from_fx(gm: fx.GraphModule, model: nn.Module, infos: dict[int, ModuleInfo]) -> SiteGraph:
    canonical = _canonical_names(model)
    g = SiteGraph("torch.fx")
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            g.shapes[node.name] = tuple(int(d) for d in meta.shape)
        g.described[node.name] = _describe_fx(node, gm)
        if node.op == "get_attr":
            g.outside_reads.setdefault(str(node.target), node.name)
            continue
        if node.op in ("placeholder", "output"):
            if node.op == "output":
                for src in _flat_nodes(node.args):
                    g.consumers.setdefault(src.name, []).append("output")
            continue
        g.compute_nodes += 1
        consumer = f"node:{node.name}"
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            name = canonical.get(id(sub), str(node.target))
            if id(sub) in infos:
                n_call = calls.get(name, 0)
                calls[name] = n_call + 1
                idx = len(g.sites)
                inputs = [a.name for a in _flat_nodes((node.args, node.kwargs))]
                g.sites.append(Site(name, inputs, [node.name], name + (f"@{n_call}" if n_call else "")))
                g.producer_of[node.name] = idx
                consumer = f"site:{idx}"
        for src in _flat_nodes((node.args, node.kwargs)):
            g.consumers.setdefault(src.name, []).append(consumer)
    return g


def _describe_fx(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "placeholder":
        return f"the input {node.name}"
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


# ---------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------
def trace_export(model: nn.Module, args: tuple, kwargs: dict | None = None) -> "torch.export.ExportedProgram":
    return torch.export.export(model, args, kwargs=kwargs, strict=False)


def from_export(ep: "torch.export.ExportedProgram", model: nn.Module, infos: dict[int, ModuleInfo]) -> SiteGraph:
    canonical = _canonical_names(model)
    sig = ep.graph_signature
    state_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    state_of.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    g = SiteGraph("torch.export")

    # Group the ops by the call they belong to (innermost nn_module_stack key of a recognised module).
    group_of: dict[str, str] = {}  # node name → stack key
    key_module: dict[str, str] = {}  # stack key → canonical module name
    order: list[str] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        key, owner = _innermost_recognised(stack, model, canonical, infos)
        if key is None:
            continue
        group_of[node.name] = key
        if key not in key_module:
            key_module[key] = owner
            order.append(key)

    nodes = {n.name: n for n in ep.graph.nodes}
    members: dict[str, list[fx.Node]] = {k: [] for k in order}
    for name, key in group_of.items():
        members[key].append(nodes[name])
    site_index: dict[str, int] = {}
    for key in order:
        owner = key_module[key]
        inside = {n.name for n in members[key]}
        inputs: list[str] = []
        outputs: list[str] = []
        for n in members[key]:
            for src in _flat_nodes((n.args, n.kwargs)):
                if src.name not in inside and src.name not in state_of and src.name not in inputs:
                    inputs.append(src.name)
            if any(u.name not in inside for u in n.users):
                outputs.append(n.name)
        idx = len(g.sites)
        site_index[key] = idx
        g.sites.append(Site(owner, inputs, outputs, _label(key, owner)))
        for out in outputs:
            g.producer_of[out] = idx

    # Consumers, outside reads and shapes over the whole graph.
    owner_of_state = {ph: q for ph, q in state_of.items()}
    for node in ep.graph.nodes:
        g.described[node.name] = (
            f"the input {node.name}" if node.op == "placeholder" else f"{node.name} ({getattr(node.target, '__name__', node.target)})"
        )
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            try:
                g.shapes[node.name] = tuple(int(d) for d in val.shape)
            except Exception:  # symbolic sizes: leave unknown
                pass
        if node.op == "placeholder":
            continue
        if node.op == "output":
            for src in _flat_nodes(node.args):
                g.consumers.setdefault(src.name, []).append("output")
            continue
        key = group_of.get(node.name)
        if key is None:
            g.compute_nodes += 1
        consumer = f"site:{site_index[key]}" if key is not None else f"node:{node.name}"
        owner = key_module.get(key) if key is not None else None
        for src in _flat_nodes((node.args, node.kwargs)):
            qual = owner_of_state.get(src.name)
            if qual is not None:
                mod = qual.rsplit(".", 1)[0] if "." in qual else ""
                mod = _canonical_of_path(mod, model, canonical) or mod
                if owner != mod:
                    g.outside_reads.setdefault(_canonical_state(qual, model, canonical), node.name)
                continue
            if key is not None and src.name in group_of and group_of[src.name] == key:
                continue  # inside the same call
            if consumer not in g.consumers.get(src.name, []):
                g.consumers.setdefault(src.name, []).append(consumer)
    g.compute_nodes += len(g.sites)
    return g


def _innermost_recognised(
    stack: dict, model: nn.Module, canonical: dict[int, str], infos: dict[int, ModuleInfo]
) -> tuple[str | None, str]:
    """The innermost stack entry, if it is a recognised module: (key, canonical name) or (None, "")."""
    if not stack:
        return None, ""
    key, value = list(stack.items())[-1]
    path = value[0] if isinstance(value, tuple) else str(value)
    mod = _module_at(path, model)
    if mod is None or id(mod) not in infos:
        return None, ""
    return key, canonical.get(id(mod), path)


def _module_at(path: str, model: nn.Module) -> nn.Module | None:
    for candidate in (path, _normalise_path(path)):
        try:
            return model.get_submodule(candidate)
        except (AttributeError, Exception):
            continue
    return None


def _normalise_path(path: str) -> str:
    """``L['self'].layers[0].conv`` (older torch) → ``layers.0.conv``."""
    p = re.sub(r"^L\['self'\]\.?", "", path)
    p = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", p)
    return p.lstrip(".")


def _canonical_of_path(path: str, model: nn.Module, canonical: dict[int, str]) -> str | None:
    mod = _module_at(path, model)
    return None if mod is None else canonical.get(id(mod), path)


def _canonical_state(qual: str, model: nn.Module, canonical: dict[int, str]) -> str:
    mod, _, attr = qual.rpartition(".")
    owner = _canonical_of_path(mod, model, canonical) if mod else ""
    return f"{owner}.{attr}" if owner else qual


def _canonical_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _label(key: str, owner: str) -> str:
    m = re.search(r"@(\d+)$", key)
    return owner + (f"@{m.group(1)}" if m else "")
