"""BatchNorm calls → the layers they fold into, each with the reason it may or may not fold (the plan).

A *pairing* is every call of one BatchNorm module (or, for a ``batch_norm`` call that owns no
BatchNorm module, that one call) with its fold targets. Planning reads the graph and the modules and
changes nothing; `bnfold.torch.apply` writes. The rules:

* the call normalises with stored running statistics (not computed tensors, not batch statistics);
* **into the producer** (output channels scaled): the BatchNorm's input is the output of a
  Conv/ConvTranspose/Linear module, directly, through a reshape that keeps the channel (Linear →
  ``flatten(0, 1)`` → BatchNorm1d, the LeViT token BN: the channel is the Linear's last axis; conv →
  reshape of the spatial axes only), or through ``torch.cat`` on the channel axis of several producers
  (each takes its slice of the BatchNorm's channels). Every call of every producer feeds only that;
* **into the consumer** (input channels scaled, shift pushed into the bias), tried when no producer
  qualifies: the BatchNorm's only consumer is a Linear (directly, after dropout in eval, after a reshape
  of ``[M, C]`` rows, or after ``flatten(1)`` of ``[N, C, …]``, where each channel's scale repeats over
  its positions), or a conv that adds no padding (padded zeros would not pass through the BatchNorm);
* the channel axis is proven on traced shapes (without shapes only where the BatchNorm class itself
  enforces the batched rank);
* no module involved has hooks or parametrizations, the forward reads none of their tensors directly,
  the layer's weight and bias belong to it alone, the dtype is floating;
* a BatchNorm subclass with its own forward must reduce to 'the rest of its forward' (`rest`).

A refusal is a `SkipReason` with a message that names the modules involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from bnfold.report import Reason, SkipReason
from bnfold.torch.graph import COMPUTED, BnCall, SiteGraph
from bnfold.torch.kinds import (
    SUPPORTED_DTYPES,
    ModuleInfo,
    bn_channels,
    enforced_rank,
    frozen_computes_affine,
    out_channels,
    spatial_dims,
)
from bnfold.torch.rest import RestError, asserted_rank, without_batchnorm


@dataclass
class Target:
    """One layer a BatchNorm folds into."""

    info: ModuleInfo
    direction: str  # "into-producer" | "into-consumer"
    channels: tuple[int, int] | None = None  # the BatchNorm channels this producer made (a cat slice)
    repeat: int = 1  # into a Linear after flatten(1): features per BatchNorm channel


@dataclass
class Pairing:
    """Every call of one BatchNorm and the outcome of the rules for it."""

    name: str  # the BatchNorm module's name, or the call's label when no module owns it
    op_type: str
    bn: ModuleInfo | None
    sites: list[int]
    call: BnCall
    targets: list[Target] = field(default_factory=list)
    reasons: list[SkipReason] = field(default_factory=list)
    replacement: nn.Module | None = None  # a subclass's forward without the normalisation

    @property
    def ok(self) -> bool:
        return bool(self.targets) and not self.reasons

    @property
    def direction(self) -> str | None:
        return self.targets[0].direction if self.targets else None

    @property
    def target_names(self) -> str | None:
        return " + ".join(t.info.name for t in self.targets) if self.targets else None

    @property
    def target_op(self) -> str | None:
        if not self.targets:
            return None
        ops = sorted({t.info.class_name for t in self.targets})
        return " + ".join(ops)


def find_pairs(graph: SiteGraph, model: nn.Module, infos: dict[int, ModuleInfo]) -> tuple[list[Pairing], list[str]]:
    """A Pairing for every BatchNorm call the forward makes; notes for BatchNorm modules it never calls."""
    by_name = {info.name: info for info in infos.values()}
    aliases = _aliases(model)
    shared = _shared_tensors(model)
    groups: dict[str, list[int]] = {}
    for idx in graph.bn_sites():
        groups.setdefault(graph.sites[idx].module, []).append(idx)
    pairings: list[Pairing] = []
    for name, sites in groups.items():
        info = by_name.get(name)
        call = graph.sites[sites[0]].call
        assert call is not None
        op_type = info.class_name if info is not None else f"BatchNorm ({call.op})"
        if "BatchNorm" not in op_type:
            op_type = f"BatchNorm ({op_type})"
        p = Pairing(name, op_type, info if info is not None and info.role == "batchnorm" else None, sites, call)
        _plan(p, graph, model, by_name, aliases, shared)
        pairings.append(p)
    notes = [
        f"{info.name} ({info.class_name}) is never called in the traced forward; left as it is"
        for info in infos.values()
        if info.role == "batchnorm" and info.name not in groups
    ]
    return pairings, notes


def _plan(
    p: Pairing,
    graph: SiteGraph,
    model: nn.Module,
    by_name: dict[str, ModuleInfo],
    aliases: dict[int, list[str]],
    shared: dict[int, list[str]],
) -> None:
    """Plan one pairing in place: the call, then a producer, else a consumer, then the modules, then a subclass's rest."""
    if not _check_call(p, graph):
        return
    _pair_producer(p, graph, by_name)
    if p.reasons and p.reasons[0].code is Reason.NO_LINEAR_NEIGHBOUR and len(p.sites) == 1:
        consumer = _pair_consumer(p, graph, by_name)
        if consumer is not None:
            p.reasons = consumer
    if p.ok:
        _check_modules(p, graph, aliases, shared)
    if p.ok and p.bn is not None and p.bn.kind == "subclass":
        try:
            p.replacement = without_batchnorm(p.bn.module, p.bn.name, p.call)
        except RestError as exc:
            _refuse(p, Reason.UNSUPPORTED, str(exc))


def _refuse(p: Pairing, code: Reason, message: str) -> None:
    p.reasons.append(SkipReason(code, message))


def _check_call(p: Pairing, graph: SiteGraph) -> bool:
    """The call normalises with stored running statistics, the same at every site, owned by a BatchNorm module."""
    label = graph.sites[p.sites[0]].label
    calls = [graph.sites[i].call for i in p.sites]
    if any(c != p.call for c in calls):
        _refuse(p, Reason.MULTIPLE_CALL_SITES, f"{p.name} is called with different tensors or eps at {len(calls)} sites")
        return False
    c = p.call
    if c.state["running_mean"] is None or c.state["running_var"] is None:
        _refuse(p, Reason.NO_RUNNING_STATS, f"{label} has no running statistics (track_running_stats=False): it normalises with batch statistics")
        return False
    if c.training is None:
        _refuse(p, Reason.UNSUPPORTED, f"{label} ({c.op}): its training flag is not a constant, or its saved batch statistics are used")
        return False
    if c.training:
        _refuse(p, Reason.TRAINING_MODE, f"{label} ({c.op}) normalises with batch statistics (training=True)")
        return False
    computed = [k for k, v in c.state.items() if v == COMPUTED]
    if computed:
        _refuse(p, Reason.NOT_CONSTANT, f"{label} ({c.op}) takes {', '.join(computed)} computed in the forward, not stored tensors")
        return False
    if c.eps is None:
        _refuse(p, Reason.UNSUPPORTED, f"{label} ({c.op}): eps is not a constant")
        return False
    if p.bn is None:
        owner = "the model's root module" if c.owner == "" else (c.owner or "several modules")
        _refuse(
            p,
            Reason.UNSUPPORTED,
            f"{label} ({c.op}) normalises with tensors of {owner}, which is not a BatchNorm module; "
            "bnfold folds BatchNorm modules and their subclasses",
        )
        return False
    if any(len(graph.sites[i].inputs) != 1 for i in p.sites):
        _refuse(p, Reason.UNSUPPORTED, f"{label} takes no single tensor input")
        return False
    return True


def _describe_consumer(graph: SiteGraph, consumer: str) -> str:
    if consumer == "output":
        return "the model's output"
    if consumer.startswith("site:"):
        return graph.sites[int(consumer[5:])].label
    return graph.describe(consumer[5:])


def _producer_at(graph: SiteGraph, value: str, by_name: dict[str, ModuleInfo]) -> ModuleInfo | None:
    src = graph.producer_of.get(value)
    if src is None or graph.sites[src].call is not None:
        return None
    info = by_name.get(graph.sites[src].module)
    return info if info is not None and info.role == "producer" else None


def _pair_producer(p: Pairing, graph: SiteGraph, by_name: dict[str, ModuleInfo]) -> None:
    """Find the producer(s) behind every call of the BatchNorm, or say why there are none."""
    inputs = [graph.sites[i].inputs[0] for i in p.sites]
    direct = [_producer_at(graph, v, by_name) for v in inputs]
    if all(d is not None for d in direct):
        _pair_direct(p, graph, [d for d in direct if d is not None])
        return
    if len(p.sites) == 1:
        op = graph.ops.get(inputs[0])
        if op is not None and op.kind == "reshape":
            prod = _producer_at(graph, op.inputs[0], by_name)
            if prod is not None:
                _pair_reshaped(p, graph, prod, inputs[0], op.inputs[0])
                return
        if op is not None and op.kind == "cat":
            prods = [_producer_at(graph, v, by_name) for v in op.inputs]
            if all(x is not None for x in prods):
                _pair_cat(p, graph, [x for x in prods if x is not None], inputs[0], op.inputs, op.dim or 0)
                return
            what = ", ".join(graph.describe(v) for v, x in zip(op.inputs, prods) if x is None)
            _refuse(p, Reason.NO_LINEAR_NEIGHBOUR, f"{p.name} normalises a concatenation with inputs that no Conv/Linear module produces ({what})")
            return
    if any(d is not None for d in direct):
        shown = ", ".join(f"{graph.sites[i].label} ← {d.name if d else 'a non-linear op'}" for i, d in zip(p.sites, direct))
        _refuse(p, Reason.MULTIPLE_CALL_SITES, f"{p.name} is called at {len(p.sites)} sites with different inputs: {shown}")
        return
    site = graph.sites[p.sites[0]]
    src = graph.producer_of.get(site.inputs[0])
    what = graph.sites[src].label if src is not None else graph.describe(site.inputs[0])
    _refuse(p, Reason.NO_LINEAR_NEIGHBOUR, f"{site.label} takes its input from {what}, not from a Conv/ConvTranspose/Linear module"
            + _identity_branch_words(graph, site.inputs[0], by_name))


def _identity_branch_words(graph: SiteGraph, value: str, by_name: dict[str, ModuleInfo]) -> str:
    """Say so when the BatchNorm reads the same tensor as a Conv module: likely a RepVGG/MobileOne identity
    branch, which the ONNX pass merges into that conv (rule ``reparam``) and fold_torch does not (it would
    have to rewrite the block's forward, not only parameters). Measured on timm repvgg/mobileone/fastvit."""
    siblings = []
    for u in graph.users(value):
        if u.startswith("site:"):
            s = graph.sites[int(u[5:])]
            info = by_name.get(s.module) if s.call is None else None
            if info is not None and info.role == "producer" and info.kind == "conv":
                siblings.append(s.label)
    if not siblings:
        return ""
    return (f"; it reads the same input as {', '.join(siblings[:3])}: an identity branch, which fold_torch does not "
            "re-parameterise (export to ONNX and run bnfold there: rule reparam merges it into the conv)")


def _only_feeds(graph: SiteGraph, value: str, allowed: set[str]) -> list[str]:
    """The consumers of ``value`` outside ``allowed`` (shape-only reads are not consumers)."""
    return [u for u in graph.users(value) if u not in allowed]


def _single_site(p: Pairing, graph: SiteGraph, prod: ModuleInfo) -> bool:
    sites = graph.sites_of(prod.name)
    if len(sites) != 1:
        _refuse(p, Reason.MULTIPLE_CALL_SITES, f"{prod.name} is called at {len(sites)} sites: folding would change every call")
        return False
    if len(graph.sites[sites[0]].outputs) != 1:
        _refuse(p, Reason.UNSUPPORTED, f"{graph.sites[sites[0]].label} returns {len(graph.sites[sites[0]].outputs)} values, expected 1")
        return False
    return True


def _pair_direct(p: Pairing, graph: SiteGraph, producers: list[ModuleInfo]) -> None:
    """BatchNorm directly after one producer module at every call."""
    names = sorted({d.name for d in producers})
    if len(names) > 1:
        shown = ", ".join(f"{graph.sites[i].label} ← {d.name}" for i, d in zip(p.sites, producers))
        _refuse(p, Reason.MULTIPLE_CALL_SITES, f"{p.name} is called at {len(p.sites)} sites with different inputs: {shown}")
        return
    prod = producers[0]
    bn_site_ids = {f"site:{i}" for i in p.sites}
    prod_sites = graph.sites_of(prod.name)
    for idx in prod_sites:
        site = graph.sites[idx]
        if len(site.outputs) != 1:
            _refuse(p, Reason.UNSUPPORTED, f"{site.label} returns {len(site.outputs)} values, expected 1")
            return
        users = graph.users(site.outputs[0])
        feeds_bn = [u for u in users if u in bn_site_ids]
        others = [u for u in users if u not in bn_site_ids]
        if others and feeds_bn:
            names_ = ", ".join(_describe_consumer(graph, u) for u in others)
            _refuse(p, Reason.OTHER_CONSUMER, f"the output of {site.label} also feeds {names_}, not only {p.name}")
            return
        if not feeds_bn:
            names_ = ", ".join(_describe_consumer(graph, u) for u in others) or "nothing"
            _refuse(
                p,
                Reason.MULTIPLE_CALL_SITES,
                f"{prod.name} is called at {len(prod_sites)} sites and {site.label} feeds {names_}, not {p.name}: "
                "folding would change that call too",
            )
            return
        if len(feeds_bn) > 1:
            _refuse(p, Reason.OTHER_CONSUMER, f"the output of {site.label} feeds {p.name} at {len(feeds_bn)} sites")
            return
    p.targets = [Target(prod, "into-producer")]
    c = _channels(p)
    if c != out_channels(prod.module):
        _refuse(p, Reason.SHAPE_MISMATCH, f"{p.name} has {c} channels but {prod.name} produces {out_channels(prod.module)}")
        return
    want_rank = spatial_dims(prod.module) + 2
    for idx in p.sites:
        value = graph.sites[idx].inputs[0]
        shape = graph.shapes.get(value)
        if shape is None:
            if p.bn is not None and _enforced_rank(p.bn) == want_rank and prod.kind != "linear":
                continue
            _refuse(
                p,
                Reason.NEEDS_EXAMPLE_INPUTS,
                f"the rank of {prod.name}'s output is unknown, so {p.name}'s axis 1 may not be its channel axis; "
                "pass example_inputs so bnfold can check the traced shapes",
            )
            return
        if len(shape) != want_rank:
            if prod.kind == "linear":
                msg = (
                    f"{prod.name} outputs rank {len(shape)} {list(shape)}: {p.name} normalises axis 1, "
                    "but Linear's features are the last axis"
                )
            else:
                msg = f"{prod.name} outputs rank {len(shape)} {list(shape)} (unbatched?), so axis 1 is not its channel axis"
            _refuse(p, Reason.SHAPE_MISMATCH, msg)
            return
        if shape[1] != c:
            _refuse(p, Reason.SHAPE_MISMATCH, f"{prod.name}'s output {list(shape)} has {shape[1]} on axis 1, not {c}")
            return
        if not _frozen_ok(p, shape):
            return


def _enforced_rank(bn: ModuleInfo) -> int | None:
    """The input rank the BatchNorm's forward insists on: torch's class check, or a subclass's own assertion."""
    return asserted_rank(bn.module) if bn.kind == "subclass" else enforced_rank(bn.module)


def _frozen_ok(p: Pairing, shape: tuple[int, ...]) -> bool:
    if p.bn is not None and p.bn.kind == "frozen":
        why = frozen_computes_affine(p.bn.module, (2,) + tuple(shape[1:]))
        if why is not None:
            _refuse(p, Reason.UNSUPPORTED, f"{p.name} looks like a FrozenBatchNorm2d but {why}")
            return False
    return True


def _channels(p: Pairing) -> int | None:
    return bn_channels(p.bn.module) if p.bn is not None else None


def _pair_reshaped(p: Pairing, graph: SiteGraph, prod: ModuleInfo, value: str, produced: str) -> None:
    """producer → reshape → BatchNorm, where the reshape keeps the producer's channel on axis 1."""
    if not _single_site(p, graph, prod):
        return
    site = f"site:{p.sites[0]}"
    others = _only_feeds(graph, produced, {f"node:{value}"}) or _only_feeds(graph, value, {site})
    if others:
        names = ", ".join(_describe_consumer(graph, u) for u in others)
        _refuse(p, Reason.OTHER_CONSUMER, f"the output of {prod.name} (or its reshape {value}) also feeds {names}")
        return
    p.targets = [Target(prod, "into-producer")]
    src, dst, c = graph.shapes.get(produced), graph.shapes.get(value), _channels(p)
    if src is None or dst is None:
        _refuse(p, Reason.NEEDS_EXAMPLE_INPUTS, f"{prod.name} → {value} → {p.name}: only traced shapes prove the channel; pass example_inputs")
        return
    n = out_channels(prod.module)
    if prod.kind == "linear":
        ok = len(dst) == 2 and dst[1] == c == n and src[-1] == n and math.prod(src[:-1]) == dst[0]
        want = f"[{math.prod(src[:-1])}, {n}] (the Linear's rows merged, its features on axis 1)"
    else:
        ok = len(src) == spatial_dims(prod.module) + 2 and len(dst) >= 2 and tuple(dst[:2]) == tuple(src[:2]) and src[1] == c == n
        want = f"[{src[0]}, {n}, …] (only the spatial axes reshaped)" if src else "?"
    if not ok:
        _refuse(p, Reason.SHAPE_MISMATCH, f"{prod.name} outputs {list(src)}, reshaped to {list(dst)} before {p.name}; the fold needs {want}")


def _pair_cat(p: Pairing, graph: SiteGraph, prods: list[ModuleInfo], value: str, parts: list[str], dim: int) -> None:
    """cat([producer outputs], dim=1) → BatchNorm: each producer takes its slice of the channels."""
    if len({x.name for x in prods}) != len(prods):
        _refuse(p, Reason.OTHER_CONSUMER, f"one module's output appears twice in the concatenation before {p.name}")
        return
    for prod, part in zip(prods, parts):
        if not _single_site(p, graph, prod):
            return
        others = _only_feeds(graph, part, {f"node:{value}"})
        if others:
            names = ", ".join(_describe_consumer(graph, u) for u in others)
            _refuse(p, Reason.OTHER_CONSUMER, f"the output of {prod.name} is concatenated before {p.name} but also feeds {names}")
            return
    others = _only_feeds(graph, value, {f"site:{p.sites[0]}"})
    if others:
        names = ", ".join(_describe_consumer(graph, u) for u in others)
        _refuse(p, Reason.OTHER_CONSUMER, f"the concatenation {value} before {p.name} also feeds {names}")
        return
    shapes = [graph.shapes.get(v) for v in parts]
    out = graph.shapes.get(value)
    if out is None or any(s is None for s in shapes):
        _refuse(p, Reason.NEEDS_EXAMPLE_INPUTS, f"the concatenation before {p.name}: only traced shapes prove the channel slices; pass example_inputs")
        return
    if dim % len(out) != 1:
        _refuse(p, Reason.SHAPE_MISMATCH, f"the concatenation before {p.name} joins axis {dim}, not the channel axis 1")
        return
    start = 0
    targets = []
    for prod, shape in zip(prods, shapes):
        assert shape is not None
        n = out_channels(prod.module)
        if len(shape) != spatial_dims(prod.module) + 2 or shape[1] != n:
            _refuse(p, Reason.SHAPE_MISMATCH, f"{prod.name} outputs {list(shape)}: axis 1 is not its {n} channels")
            return
        targets.append(Target(prod, "into-producer", (start, start + n)))
        start += n
    if start != _channels(p) or out[1] != start:
        _refuse(p, Reason.SHAPE_MISMATCH, f"the concatenation has {out[1]} channels, {p.name} {_channels(p)}")
        return
    p.targets = targets


def _pair_consumer(p: Pairing, graph: SiteGraph, by_name: dict[str, ModuleInfo]) -> list[SkipReason] | None:
    """BatchNorm → (dropout/reshape) → Linear or unpadded conv. New reasons ([] = foldable), or None: no layer there."""
    site = graph.sites[p.sites[0]]
    out = site.outputs[0]
    value = out
    reshaped = False
    seen = [value]
    while True:
        users = graph.users(value)
        if len(users) != 1 or not users[0].startswith(("node:", "site:")):
            return None
        user = users[0]
        if user.startswith("site:"):
            break
        op = graph.ops.get(user[5:])
        if op is None or op.kind not in ("pass", "reshape") or op.inputs != [value]:
            return None
        reshaped = reshaped or op.kind == "reshape"
        value = user[5:]
        seen.append(value)
    idx = int(user[5:])
    cons_site = graph.sites[idx]
    layer = by_name.get(cons_site.module)
    if cons_site.call is not None or layer is None or layer.role != "producer" or cons_site.inputs != [value]:
        return None
    def no(code: Reason, msg: str) -> list[SkipReason]:
        return [SkipReason(code, msg)]

    if len(graph.sites_of(layer.name)) != 1:
        return no(Reason.MULTIPLE_CALL_SITES, f"{p.name} feeds {layer.name}, which is called at several sites")
    s_in, s_layer = graph.shapes.get(graph.sites[p.sites[0]].inputs[0]), graph.shapes.get(value)
    c = _channels(p)
    if s_in is None or s_layer is None:
        return no(Reason.NEEDS_EXAMPLE_INPUTS, f"{p.name} → {layer.name}: only traced shapes prove the channel; pass example_inputs")
    repeat = 1
    if layer.kind == "linear":
        if len(s_in) == 2 and s_in[1] == c and s_layer[-1] == c and math.prod(s_layer[:-1]) == s_in[0]:
            repeat = 1
        elif len(s_in) > 2 and s_in[1] == c and tuple(s_layer) == (s_in[0], math.prod(s_in[1:])):
            repeat = math.prod(s_in[2:])
        else:
            return no(Reason.SHAPE_MISMATCH, f"{p.name}'s output {list(s_in)} reaches {layer.name} as {list(s_layer)}: its features are not the BatchNorm's channels")
    elif layer.kind == "conv":
        m = layer.module
        if reshaped or tuple(s_layer) != tuple(s_in) or m.in_channels != c:
            return no(Reason.SHAPE_MISMATCH, f"{p.name}'s output {list(s_in)} reaches {layer.name} as {list(s_layer)}")
        padding = m.padding
        if not (padding == "valid" or (isinstance(padding, tuple) and all(int(x) == 0 for x in padding))):
            return no(Reason.PADDING, f"{layer.name} pads its input ({padding}): the padded zeros would not pass through {p.name}")
    else:
        return no(Reason.NO_LINEAR_NEIGHBOUR, f"{p.name} feeds {layer.class_name} {layer.name}; bnfold folds into a consumer Linear or unpadded conv only")
    p.targets = [Target(layer, "into-consumer", None, repeat)]
    return []


def _check_modules(p: Pairing, graph: SiteGraph, aliases: dict[int, list[str]], shared: dict[int, list[str]]) -> None:
    """Module-level preconditions: hooks, parametrizations, direct reads, shared weights, dtype."""
    infos = [t.info for t in p.targets] + ([p.bn] if p.bn is not None else [])
    for info in infos:
        m = info.module
        hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks") if getattr(m, h, None)]
        if hooks:
            _refuse(p, Reason.UNSUPPORTED, f"{info.name} has hooks ({', '.join(hooks)}) that could change what it computes")
            return
        if torch.nn.utils.parametrize.is_parametrized(m):
            _refuse(p, Reason.UNSUPPORTED, f"{info.name} is parametrized: its weight is computed, not stored")
            return
        for alias in aliases.get(id(m), [info.name]):
            for key, node in graph.outside_reads.items():
                if key.startswith(alias + ".") and "." not in key[len(alias) + 1 :]:
                    _refuse(p, Reason.OTHER_CONSUMER, f"the forward reads {key} directly (node {node})")
                    return
    for t in p.targets:
        prod = t.info
        for pname in ("weight", "bias"):
            w = getattr(prod.module, pname, None)
            if w is None:
                continue
            if not isinstance(w, torch.Tensor):
                _refuse(p, Reason.UNSUPPORTED, f"{prod.name}.{pname} is not a tensor")
                return
            if isinstance(w, torch.nn.parameter.UninitializedParameter):
                _refuse(p, Reason.UNSUPPORTED, f"{prod.name}.{pname} is not initialised (lazy module)")
                return
            own = tuple(a + "." for a in aliases.get(id(prod.module), [prod.name]))
            others = [n for n in shared.get(id(w), []) if not n.startswith(own)]
            if others:
                _refuse(p, Reason.OTHER_CONSUMER, f"{prod.name}.{pname} is shared with {', '.join(others)}")
                return
            if w.dtype not in SUPPORTED_DTYPES:
                _refuse(p, Reason.UNSUPPORTED, f"{prod.name}.{pname} has dtype {w.dtype}; bnfold folds floating-point layers only")
                return


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module is registered."""
    out: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def _shared_tensors(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter or buffer is registered (tied weights show up twice)."""
    out: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        out.setdefault(id(t), []).append(name)
    return out
