"""The model's dataflow as call sites, built from torch.fx or torch.export.

Both tracers end in the same small picture, so the pairing rules exist once:

* a *site* is one call of a recognised producer module (Conv/ConvTranspose/Linear), or one
  **BatchNorm call**: a call of a BatchNorm module, or a ``batch_norm`` op wherever it runs — inside a
  library subclass's own ``forward`` (timm's ``BatchNormAct2d`` calls ``F.batch_norm`` itself) or any
  other forward. BatchNorm calls are found at the graph level, not by module class, so that a
  BatchNorm that runs is never missing from the report; each one records the tensors it reads
  (`BnCall`), which is how it maps back to the module that owns them;
* every value knows its consumers: other sites, other graph nodes (named, for the report), or the
  graph output. Uses that read only a value's shape (``reshape_as``'s template, ``x.ndim``) are not
  consumers: a fold changes values, never shapes;
* the ops between sites that a fold may look through (`Op`: reshape/flatten/view, cat, eval-mode
  dropout), with their tensor inputs;
* traced shapes where the tracer has them;
* the parameters and buffers that the graph reads outside their own module's calls (``self.conv.weight``
  used in ``forward``): such a module cannot be rewritten safely.

fx keeps producers and plain BatchNorm modules whole (one ``call_module`` node per call) and traces
through everything that may hide a BatchNorm. torch.export inlines every module into aten ops and tags
each op with ``nn_module_stack``; a producer's ops share the innermost stack key (``L__self__conv@1``
for the second call), which is how a producer call becomes a site again; a ``batch_norm`` op is a site
by itself.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from bnfold.torch.kinds import ModuleInfo, bn_kind

STATE = ("weight", "bias", "running_mean", "running_var")


@dataclass
class BnCall:
    """What one BatchNorm call reads: enough to compute its ``(s, t)`` and to map it to a module.

    ``state`` maps each of weight/bias/running_mean/running_var to the canonical qualified name of the
    stored tensor it reads, ``None`` where the call passes None, or ``"<computed>"`` where the forward
    computes the tensor (then nothing is provably constant).
    """

    state: dict[str, str | None]
    eps: float | None
    training: bool | None  # None: not a constant in the trace
    owner: str | None  # canonical name of the module owning the tensors, None if none or several
    op: str  # "BatchNorm2d", "F.batch_norm", "aten.batch_norm", … for the report

    @classmethod
    def traced(cls, state: dict[str, str | None], eps: object, training: object, op: str) -> "BnCall":
        """A call seen in a trace: ``eps``/``training`` count only where the trace holds them as constants."""
        return cls(
            state,
            float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None,
            bool(training) if isinstance(training, bool) else None,
            _owner(state),
            op,
        )


COMPUTED = "<computed>"


@dataclass
class Site:
    """One call of a recognised producer, or one BatchNorm call (``call`` set)."""

    module: str  # canonical qualified name (the owner for a BatchNorm call; its label when it has none)
    inputs: list[str]  # values flowing in from outside the call (for a BatchNorm call: its data input)
    outputs: list[str]  # values leaving the call (normally one)
    label: str  # e.g. "conv@1" for the report
    call: BnCall | None = None


@dataclass
class Op:
    """A graph node a fold may look through: ``reshape`` (flatten/view/reshape), ``cat``, ``pass`` (eval dropout)."""

    kind: str
    inputs: list[str]
    dim: int | None = None  # cat's dimension


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
    ops: dict[str, Op] = field(default_factory=dict)  # value → the look-through op producing it

    def describe(self, value: str) -> str:
        return self.described.get(value, value)

    def sites_of(self, module: str) -> list[int]:
        return [i for i, s in enumerate(self.sites) if s.module == module]

    def bn_sites(self) -> list[int]:
        return [i for i, s in enumerate(self.sites) if s.call is not None]

    def users(self, value: str) -> list[str]:
        return self.consumers.get(value, [])


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


def hides_batchnorm(m: nn.Module) -> bool:
    """``m`` or a module under it holds BatchNorm statistics, so a tracer must not treat it as opaque."""
    return any(
        isinstance(sub, nn.modules.batchnorm._NormBase) or isinstance(getattr(sub, "running_mean", None), torch.Tensor)
        for sub in m.modules()
    )


# Which positional parameter of each BatchNorm function is what (None: a fixed value below).
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_TORCH_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
_NO_TRAINING = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
_FX_BN_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.batch_norm: ("F.batch_norm", _F_BN),
    torch.batch_norm: ("torch.batch_norm", _TORCH_BN),
}


def _aten_bn_table() -> dict[Any, tuple[str, tuple[str, ...], bool | None]]:
    """aten BatchNorm overloads → (name, parameter order, fixed training flag or None to read it)."""
    aten = torch.ops.aten
    table: dict[Any, tuple[str, tuple[str, ...], bool | None]] = {}
    for name, params, training in (
        ("batch_norm", _TORCH_BN, None),
        ("native_batch_norm", _TORCH_BN[:8], None),
        ("_native_batch_norm_legit", _TORCH_BN[:8], None),
        ("_native_batch_norm_legit_no_training", _NO_TRAINING, False),
        ("_native_batch_norm_legit_functional", _TORCH_BN[:8], None),
        ("_batch_norm_no_update", _NO_TRAINING, False),
        ("_batch_norm_with_update", ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), True),
        ("_batch_norm_with_update_functional", ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), True),
        ("cudnn_batch_norm", _TORCH_BN[:8], None),
        ("miopen_batch_norm", _TORCH_BN[:8], None),
    ):
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            table[getattr(packet, overload)] = (f"aten.{name}", params, training)
    return table


_ATEN_BN = _aten_bn_table()


def is_aten_batchnorm(target: Any) -> bool:
    return target in _ATEN_BN


def _bind(params: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    return bound


def _owner(state: dict[str, str | None]) -> str | None:
    owners = {name.rpartition(".")[0] for name in state.values() if name not in (None, COMPUTED)}
    return owners.pop() if len(owners) == 1 else None


# ---------------------------------------------------------------------------------------------
# torch.fx
# ---------------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    """fx's tracer: recognised producers and plain BatchNorms are leaves, anything hiding a BatchNorm is not."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name) and not hides_batchnorm(m)


def fx_leaves(infos: dict[int, ModuleInfo]) -> set[int]:
    """Modules kept whole by fx: producers and BatchNorms whose forward is torch's (not subclasses)."""
    return {i for i, info in infos.items() if info.kind != "subclass"}


def trace_fx(model: nn.Module, infos: dict[int, ModuleInfo]) -> fx.GraphModule:
    """Symbolically trace ``model``; raises whatever fx raises when the forward is not traceable."""
    tracer = _LeafTracer(fx_leaves(infos))
    with rank_checks_skipped(model):
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _no_check(_input: Any) -> None:
    return None


@contextmanager
def rank_checks_skipped(model: nn.Module) -> Iterator[None]:
    """While tracing, BatchNorm subclasses skip ``_check_input_dim`` (only on these instances, undone after).

    A subclass whose forward calls ``super().forward(x)`` runs torch's ``if input.dim() != 4: raise``,
    which fx cannot trace (a traced value in Python control flow). The check computes nothing, so the
    trace is the same function without it; ranks are then proven by traced shapes, never by the check.
    """
    patched = []
    for m in model.modules():
        if bn_kind(m) == "subclass":
            patched.append((m, m.__dict__.get("_check_input_dim")))
            m.__dict__["_check_input_dim"] = _no_check
    try:
        yield
    finally:
        for m, old in patched:
            if old is None:
                del m.__dict__["_check_input_dim"]
            else:
                m.__dict__["_check_input_dim"] = old


def propagate_shapes(gm: fx.GraphModule, args: tuple) -> None:
    """Attach real shapes to the fx nodes by running the traced module once on ``args``."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*args)


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement"}
_TEMPLATE_METHODS = {"reshape_as", "view_as", "expand_as"}
_FX_RESHAPE_METHODS = {"flatten", "reshape", "view", "reshape_as", "view_as"}
_FX_CAT = {torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)}


def _fx_shape_only(user: fx.Node, src: fx.Node) -> bool:
    """``user`` reads only ``src``'s shape/dtype: ``x.ndim``, ``x.size()``, ``y.reshape_as(x)``."""
    if user.op == "call_function" and user.target is getattr and len(user.args) > 1 and user.args[1] in _SHAPE_ATTRS:
        return True
    if user.op == "call_method" and user.target in _SHAPE_METHODS:
        return True
    if user.op == "call_method" and user.target in _TEMPLATE_METHODS:
        return user.args[0] is not src and src not in _flat_nodes((user.args[2:], user.kwargs))
    return False


def _fx_op(node: fx.Node, gm: fx.GraphModule) -> Op | None:
    """The look-through ops fx shows: reshape-like methods/functions, cat, eval-mode dropout/identity."""
    if node.op == "call_method" and node.target in _FX_RESHAPE_METHODS and isinstance(node.args[0], fx.Node):
        return Op("reshape", [node.args[0].name])
    if node.op == "call_function" and node.target in (torch.flatten, torch.reshape) and isinstance(node.args[0], fx.Node):
        return Op("reshape", [node.args[0].name])
    if node.op == "call_function" and node.target in _FX_CAT:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if isinstance(tensors, (list, tuple)) and all(isinstance(t, fx.Node) for t in tensors) and isinstance(dim, int):
            return Op("cat", [t.name for t in tensors], dim)
    if node.op == "call_module" and len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs:
        sub = gm.get_submodule(str(node.target))
        if type(sub) is nn.Identity or (isinstance(sub, nn.modules.dropout._DropoutNd) and not sub.training):
            return Op("pass", [node.args[0].name])
    if node.op == "call_method" and node.target == "contiguous" and isinstance(node.args[0], fx.Node):
        return Op("pass", [node.args[0].name])
    return None


def _fx_bn_call(node: fx.Node, gm: fx.GraphModule, model: nn.Module, canonical: dict[int, str]) -> tuple[BnCall, fx.Node | None, set[str]] | None:
    """A BatchNorm function call in the fx graph: its BnCall, its data input and the get_attr nodes it reads."""
    if node.op != "call_function" or node.target not in _FX_BN_FUNCTIONS:
        return None
    op_name, params = _FX_BN_FUNCTIONS[node.target]
    bound = _bind(params, node.args, node.kwargs)
    defaults = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
    state: dict[str, str | None] = {}
    reads: set[str] = set()
    for key in STATE:
        v = bound.get(key, defaults.get(key))
        if v is None:
            state[key] = None
        elif isinstance(v, fx.Node) and v.op == "get_attr":
            state[key] = _canonical_state(str(v.target), model, canonical)
            reads.add(v.name)
        else:
            state[key] = COMPUTED
    training = bound.get("training", False)
    eps = bound.get("eps", 1e-5)
    data = bound.get("input")
    call = BnCall.traced(state, eps, training, op_name)
    return call, data if isinstance(data, fx.Node) else None, reads


def module_call(info: ModuleInfo) -> BnCall:
    """The BnCall of a BatchNorm module whose forward is torch's (or a FrozenBatchNorm2d)."""
    m = info.module
    state = {key: (f"{info.name}.{key}" if isinstance(getattr(m, key, None), torch.Tensor) else None) for key in STATE}
    if info.kind == "frozen":
        training: bool | None = False
    else:
        training = bool(m.training) or (m.running_mean is None and m.running_var is None)
    return BnCall(state, float(m.eps), training, info.name, info.class_name)


def from_fx(gm: fx.GraphModule, model: nn.Module, infos: dict[int, ModuleInfo]) -> SiteGraph:
    canonical = _canonical_names(model)
    g = SiteGraph("torch.fx")
    calls: dict[str, int] = {}
    bn_reads: set[str] = set()  # get_attr nodes read only as a BatchNorm call's own tensors
    site_of_node: dict[str, int] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            g.shapes[node.name] = tuple(int(d) for d in meta.shape)
        g.described[node.name] = _describe_fx(node, gm)
        op = _fx_op(node, gm)
        if op is not None:
            g.ops[node.name] = op
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            name = canonical.get(id(sub), str(node.target))
            info = infos.get(id(sub))
            if info is not None:
                n_call = calls.get(name, 0)
                calls[name] = n_call + 1
                inputs = [a.name for a in _flat_nodes((node.args, node.kwargs))]
                label = name + (f"@{n_call}" if n_call else "")
                call = module_call(info) if info.role == "batchnorm" else None
                site_of_node[node.name] = len(g.sites)
                g.sites.append(Site(name, inputs, [node.name], label, call))
                g.producer_of[node.name] = site_of_node[node.name]
        found = _fx_bn_call(node, gm, model, canonical)
        if found is not None:
            call, data, reads = found
            bn_reads |= reads
            name = call.owner or node.name
            n_call = calls.get(name, 0)
            calls[name] = n_call + 1
            site_of_node[node.name] = len(g.sites)
            label = f"{name}@{n_call}" if n_call else name
            g.sites.append(Site(name, [data.name] if data is not None else [], [node.name], label, call))
            g.producer_of[node.name] = site_of_node[node.name]

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.name not in bn_reads or any(site_of_node.get(u.name) is None for u in node.users):
                g.outside_reads.setdefault(str(node.target), node.name)
            continue
        if node.op == "placeholder":
            continue
        if node.op == "output":
            for src in _flat_nodes(node.args):
                g.consumers.setdefault(src.name, []).append("output")
            continue
        g.compute_nodes += 1
        idx = site_of_node.get(node.name)
        consumer = f"site:{idx}" if idx is not None else f"node:{node.name}"
        for src in _flat_nodes((node.args, node.kwargs)):
            if src.op == "get_attr" or _fx_shape_only(node, src):
                continue
            if consumer not in g.consumers.get(src.name, []):
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


def _aten(name: str) -> set[Any]:
    packet = getattr(torch.ops.aten, name, None)
    return set() if packet is None else {getattr(packet, o) for o in packet.overloads()}


_ATEN_RESHAPE = set().union(*(_aten(n) for n in ("flatten", "view", "reshape", "_unsafe_view", "reshape_as", "view_as")))
_ATEN_CAT = _aten("cat") | _aten("concat") | _aten("concatenate")
_ATEN_PASS = _aten("clone") | _aten("contiguous") | _aten("alias")
_ATEN_DROPOUT = _aten("dropout")
_ATEN_SHAPE = set().union(*(_aten(n) for n in ("sym_size", "sym_numel", "sym_stride", "size", "dim")))
_ATEN_TEMPLATE = set().union(*(_aten(n) for n in ("reshape_as", "view_as", "expand_as")))


def _export_op(node: fx.Node) -> Op | None:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], (fx.Node, list, tuple)):
        return None
    first = node.args[0]
    if node.target in _ATEN_RESHAPE and isinstance(first, fx.Node):
        return Op("reshape", [first.name])
    if node.target in _ATEN_CAT and isinstance(first, (list, tuple)) and all(isinstance(t, fx.Node) for t in first):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return Op("cat", [t.name for t in first], dim) if isinstance(dim, int) else None
    if isinstance(first, fx.Node) and (
        node.target in _ATEN_PASS or (node.target in _ATEN_DROPOUT and len(node.args) > 2 and node.args[2] is False)
    ):
        return Op("pass", [first.name])
    return None


def _export_shape_only(user: fx.Node, src: fx.Node) -> bool:
    if user.op != "call_function":
        return False
    if user.target in _ATEN_SHAPE:
        return True
    if user.target in _ATEN_TEMPLATE:
        return user.args[0] is not src
    return False


def from_export(ep: "torch.export.ExportedProgram", model: nn.Module | None, infos: dict[int, ModuleInfo]) -> SiteGraph:
    """The SiteGraph of an exported program; ``model`` (the module it came from) maps names to modules.

    Without ``model`` (a program given as is) only the BatchNorm calls are sites: the producers are the
    ops themselves, found by `bnfold.torch.program`.
    """
    canonical = _canonical_names(model) if model is not None else {}
    state_of = export_state_names(ep)
    g = SiteGraph("torch.export")

    # Group the producer ops by the call they belong to (innermost nn_module_stack key of a producer/frozen BN).
    group_of: dict[str, str] = {}  # node name → stack key
    key_module: dict[str, str] = {}  # stack key → canonical module name
    key_info: dict[str, ModuleInfo] = {}
    order: list[str] = []
    bn_nodes: list[fx.Node] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ATEN_BN:
            bn_nodes.append(node)
            continue
        if model is None:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        key, info = _innermost_recognised(stack, model, infos)
        if key is None or info is None or info.kind == "subclass" or info.kind == "batchnorm":
            continue
        group_of[node.name] = key
        if key not in key_module:
            key_module[key] = info.name
            key_info[key] = info
            order.append(key)

    nodes = {n.name: n for n in ep.graph.nodes}
    members: dict[str, list[fx.Node]] = {k: [] for k in order}
    for name, key in group_of.items():
        members[key].append(nodes[name])
    site_of_node: dict[str, int] = {}
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
        info = key_info[key]
        call = module_call(info) if info.role == "batchnorm" else None
        g.sites.append(Site(owner, inputs, outputs, _label(key, owner), call))
        for n in members[key]:
            site_of_node[n.name] = idx
        for out in outputs:
            g.producer_of[out] = idx

    # BatchNorm ops: one site each, owned by the module whose tensors they read.
    calls: dict[str, int] = {}
    bn_reads: set[str] = set()
    for node in bn_nodes:
        name, params, fixed = _ATEN_BN[node.target]
        bound = _bind(params, node.args, node.kwargs)
        state: dict[str, str | None] = {}
        for key in STATE:
            v = bound.get(key)
            if v is None:
                state[key] = None
            elif isinstance(v, fx.Node) and v.name in state_of:
                qual = state_of[v.name]
                state[key] = _canonical_state(qual, model, canonical) if model is not None else qual
                bn_reads.add(v.name)
            else:
                state[key] = COMPUTED
        training = fixed if fixed is not None else bound.get("training")
        eps = bound.get("eps")
        call = BnCall.traced(state, eps, training, name)
        # The normalised value: the op itself, or item 0 of the tuple the native variants return.
        out = node
        if not _returns_tensor(node):
            firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            others = [u for u in node.users if not (u.target is operator.getitem and u.args[1] == 0)]
            out = firsts[0] if len(firsts) == 1 else node
            if others and not training:
                call.training = None  # the saved statistics are used: not a plain inference call
        owner = call.owner or node.name
        n_call = calls.get(owner, 0)
        calls[owner] = n_call + 1
        data = bound.get("input")
        idx = len(g.sites)
        g.sites.append(
            Site(owner, [data.name] if isinstance(data, fx.Node) else [], [out.name], f"{owner}@{n_call}" if n_call else owner, call)
        )
        site_of_node[node.name] = idx
        if out is not node:
            site_of_node[out.name] = idx
        g.producer_of[out.name] = idx

    # Consumers, outside reads and shapes over the whole graph.
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
        op = _export_op(node)
        if op is not None:
            g.ops[node.name] = op
        if node.op == "placeholder":
            continue
        if node.op == "output":
            for src in _flat_nodes(node.args):
                g.consumers.setdefault(src.name, []).append("output")
            continue
        idx = site_of_node.get(node.name)
        if idx is None:
            g.compute_nodes += 1
        consumer = f"site:{idx}" if idx is not None else f"node:{node.name}"
        owner = g.sites[idx].module if idx is not None else None
        for src in _flat_nodes((node.args, node.kwargs)):
            qual = state_of.get(src.name)
            if qual is not None:
                if src.name in bn_reads and idx is not None and g.sites[idx].call is not None:
                    continue
                mod = qual.rsplit(".", 1)[0] if "." in qual else ""
                if model is not None:
                    mod = _canonical_of_path(mod, model, canonical) or mod
                if owner != mod:
                    g.outside_reads.setdefault(_canonical_state(qual, model, canonical) if model is not None else qual, node.name)
                continue
            if idx is not None and site_of_node.get(src.name) == idx:
                continue  # inside the same call
            if _export_shape_only(node, src):
                continue
            if consumer not in g.consumers.get(src.name, []):
                g.consumers.setdefault(src.name, []).append(consumer)
    g.compute_nodes += len(g.sites)
    return g


def _returns_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) or not any(u.target is operator.getitem for u in node.users)


def export_state_names(ep: "torch.export.ExportedProgram") -> dict[str, str]:
    """Placeholder name → qualified name of the parameter, buffer or lifted constant it stands for."""
    sig = ep.graph_signature
    state_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    state_of.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    return dict(state_of)


def _innermost_recognised(stack: dict, model: nn.Module, infos: dict[int, ModuleInfo]) -> tuple[str | None, ModuleInfo | None]:
    """The innermost stack entry, if it is a recognised module: (key, its info) or (None, None)."""
    if not stack:
        return None, None
    key, value = list(stack.items())[-1]
    path = value[0] if isinstance(value, tuple) else str(value)
    mod = _module_at(path, model)
    if mod is None or id(mod) not in infos:
        return None, None
    return key, infos[id(mod)]


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


def _canonical_state(qual: str, model: nn.Module | None, canonical: dict[int, str]) -> str:
    if model is None:
        return qual
    mod, _, attr = qual.rpartition(".")
    owner = _canonical_of_path(mod, model, canonical) if mod else ""
    return f"{owner}.{attr}" if owner else qual


def _canonical_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _label(key: str, owner: str) -> str:
    m = re.search(r"@(\d+)$", key)
    return owner + (f"@{m.group(1)}" if m else "")


