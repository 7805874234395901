"""What a BatchNorm subclass does besides normalising, as a module of its own.

Library norms subclass ``nn.BatchNorm2d`` and override ``forward`` (timm's ``BatchNormAct2d``:
``F.batch_norm`` → ``self.drop`` → ``self.act``). Once the normalisation is folded into the layer before
it, the module must keep doing the rest and stop normalising. bnfold **replaces** the module rather
than neutralising it (γ = √(σ²+ε), β = μ would make the BatchNorm an identity but leave the op running:
no speed-up, and a second rounding of every activation).

The replacement is derived from the module's own ``forward``, not written per library: torch.fx traces
that forward with every child module kept whole, the one ``batch_norm`` call reading this module's
tensors is cut out (its users read its input instead), and what remains is the rest. Input assertions
(``torch._assert(x.ndim == 4, …)``) go too: they check the normalisation's input and compute nothing.
When the rest is a plain chain of child modules, as in timm's ``BatchNormAct2d``, it becomes an
``nn.Sequential`` of those very children under their own names (``bn.act`` stays ``bn.act``): a plain
torch class, scriptable and picklable; otherwise an ``fx.GraphModule`` of the remaining graph. A forward
that fx cannot trace, or that normalises more than once, is left with a reason.
"""

from __future__ import annotations

import operator
from collections import OrderedDict

import torch
from torch import fx, nn

from bnfold.torch.graph import _FX_BN_FUNCTIONS, STATE, BnCall, _bind, rank_checks_skipped


class RestError(Exception):
    """The module's forward cannot be reduced to 'the rest' provably; the message says why."""


class _ChildrenWhole(fx.Tracer):
    """Trace only the root's own forward; every child module is one call."""

    def __init__(self, root: nn.Module | None = None) -> None:  # no-argument form: fx re-creates it to unpickle
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root


def without_batchnorm(module: nn.Module, name: str, call: BnCall) -> nn.Module:
    """``module``'s forward with its normalising call removed; raises `RestError` when that is not provable.

    ``call`` is the BatchNorm call the model-level trace found for this module (``name``): the call cut
    out here must read the same tensors with the same eps, so both traces saw the same normalisation.
    """
    tracer = _ChildrenWhole(module)
    try:
        with rank_checks_skipped(module):
            graph = tracer.trace(module)
    except Exception as exc:
        raise RestError(
            f"torch.fx cannot trace {type(module).__name__}.forward ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), "
            "so what it does besides normalising cannot be kept without the BatchNorm"
        ) from exc
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise RestError(f"{type(module).__name__}.forward takes {len(placeholders)} inputs, expected 1")
    bn_nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in _FX_BN_FUNCTIONS]
    if len(bn_nodes) != 1:
        raise RestError(f"{type(module).__name__}.forward calls batch_norm {len(bn_nodes)} times, expected once")
    node = bn_nodes[0]
    _same_call(node, name, call, type(module).__name__)
    data = _bind(_FX_BN_FUNCTIONS[node.target][1], node.args, node.kwargs).get("input")
    if not isinstance(data, fx.Node):
        raise RestError(f"the batch_norm call in {type(module).__name__}.forward has no tensor input")
    node.replace_all_uses_with(data)
    graph.erase_node(node)
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target is torch._assert]:
        graph.erase_node(n)
    fx.GraphModule(module, graph).graph.eliminate_dead_code()  # the purity check needs an owning module
    chain = _module_chain(graph)
    if chain is not None:
        if not chain:
            return nn.Identity()
        return nn.Sequential(OrderedDict((target, module.get_submodule(target)) for target in chain))
    return fx.GraphModule(module, graph, f"{type(module).__name__}WithoutBatchNorm")


def asserted_rank(module: nn.Module) -> int | None:
    """The input rank ``module``'s forward asserts (``torch._assert(x.ndim == 4, …)``, as timm's BatchNormAct2d), or None.

    Like BatchNorm2d's own check, such an assertion proves that the input is batched, so that axis 1 is
    the producer's channel axis, without traced shapes.
    """
    try:
        with rank_checks_skipped(module):
            graph = _ChildrenWhole(module).trace(module)
    except Exception:
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n in graph.nodes:
        if n.op != "call_function" or n.target is not torch._assert or not n.args:
            continue
        cond = n.args[0]
        if isinstance(cond, fx.Node) and cond.target is operator.eq and len(cond.args) == 2:
            lhs, rhs = cond.args
            if (
                isinstance(lhs, fx.Node)
                and lhs.target is getattr
                and lhs.args[1] in ("ndim",)
                and placeholders
                and lhs.args[0] is placeholders[0]
                and isinstance(rhs, int)
            ):
                return rhs
    return None


def _same_call(node: fx.Node, name: str, call: BnCall, cls: str) -> None:
    """The call in the module's own trace reads this module's tensors, as the model-level call did."""
    bound = _bind(_FX_BN_FUNCTIONS[node.target][1], node.args, node.kwargs)
    for key in STATE:
        v = bound.get(key)
        here = None if v is None else (f"{name}.{v.target}" if isinstance(v, fx.Node) and v.op == "get_attr" else "?")
        if here != call.state.get(key):
            raise RestError(
                f"the batch_norm call in {cls}.forward reads {key} as {here}, the model's trace saw {call.state.get(key)}"
            )
    eps = bound.get("eps", 1e-5)
    training = bound.get("training", False)
    if eps != call.eps or training is not False:
        raise RestError(f"the batch_norm call in {cls}.forward differs from the model's trace (eps or training)")


def _module_chain(graph: fx.Graph) -> list[str] | None:
    """``x → m1 → m2 → … → output`` as child names, or None when the graph is anything else."""
    chain: list[str] = []
    current: fx.Node | None = None
    for n in graph.nodes:
        if n.op == "placeholder":
            current = n
            continue
        if n.op == "call_module" and n.args == (current,) and not n.kwargs and len(current.users) == 1:
            chain.append(str(n.target))
            current = n
            continue
        if n.op == "output" and n.args[0] is current and current is not None and len(current.users) == 1:
            return chain
        return None
    return None
