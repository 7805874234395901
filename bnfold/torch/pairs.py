"""Producer → BatchNorm pairs from a SiteGraph, each with the reason it may or may not fold.

The rules, all of which must hold for a BatchNorm module to fold into producer module P:

* every call of the BatchNorm takes P's output directly, and every call of P feeds only a call of this
  BatchNorm (a module reused elsewhere, or a producer whose output is also read, stays);
* the BatchNorm normalises with running statistics, and the producer's channel axis is the
  BatchNorm's axis 1 at every call (checked on traced shapes; without shapes only where the BatchNorm
  class itself enforces the batched rank);
* neither module has hooks or parametrizations, the forward reads none of their tensors directly,
  and P's weight and bias belong to P alone;
* a supported floating dtype.

A refusal is a `SkipReason` with a message that names the modules involved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bnfold.report import Reason, SkipReason
from bnfold.torch.graph import SiteGraph
from bnfold.torch.kinds import (
    SUPPORTED_DTYPES,
    ModuleInfo,
    bn_channels,
    enforced_rank,
    frozen_computes_affine,
    out_channels,
    spatial_dims,
)


@dataclass
class Pairing:
    """One BatchNorm module and the outcome of the rules for it."""

    bn: ModuleInfo
    producer: ModuleInfo | None = None
    reasons: list[SkipReason] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.producer is not None and not self.reasons


def find_pairs(graph: SiteGraph, model: nn.Module, infos: dict[int, ModuleInfo]) -> tuple[list[Pairing], list[str]]:
    """A Pairing for every recognised BatchNorm the forward calls; notes for those it never calls."""
    by_name = {info.name: info for info in infos.values()}
    aliases = _aliases(model)
    shared = _shared_tensors(model)
    pairings: list[Pairing] = []
    notes: list[str] = []
    for info in infos.values():
        if info.role != "batchnorm":
            continue
        sites = graph.sites_of(info.name)
        if not sites:
            notes.append(f"{info.name} ({info.class_name}) is never called in the traced forward; left as it is")
            continue
        p = Pairing(info)
        _pair(p, sites, graph, by_name)
        if p.producer is not None and not p.reasons:
            _check_modules(p, graph, aliases, shared)
        pairings.append(p)
    return pairings, notes


def _refuse(p: Pairing, code: Reason, message: str) -> None:
    p.reasons.append(SkipReason(code, message))


def _describe_consumer(graph: SiteGraph, consumer: str) -> str:
    if consumer == "output":
        return "the model's output"
    if consumer.startswith("site:"):
        return graph.sites[int(consumer[5:])].label
    return graph.describe(consumer[5:])


def _pair(p: Pairing, bn_sites: list[int], graph: SiteGraph, by_name: dict[str, ModuleInfo]) -> None:
    """Find the single producer module behind every call of the BatchNorm, or say why there is none."""
    bn = p.bn
    producers: list[str | None] = []
    for idx in bn_sites:
        site = graph.sites[idx]
        if len(site.inputs) != 1:
            _refuse(p, Reason.UNSUPPORTED, f"{site.label} takes {len(site.inputs)} tensor inputs, expected 1")
            return
        src = graph.producer_of.get(site.inputs[0])
        src_info = by_name.get(graph.sites[src].module) if src is not None else None
        producers.append(src_info.name if src_info is not None and src_info.role == "producer" else None)
    distinct = sorted({x for x in producers if x is not None})
    if not distinct:
        site = graph.sites[bn_sites[0]]
        src = graph.producer_of.get(site.inputs[0])
        what = graph.sites[src].label if src is not None else graph.describe(site.inputs[0])
        _refuse(
            p,
            Reason.NO_LINEAR_NEIGHBOUR,
            f"{site.label} takes its input from {what}, not from a Conv/ConvTranspose/Linear module",
        )
        return
    if len(distinct) > 1 or None in producers:
        shown = ", ".join(f"{graph.sites[i].label} ← {x or 'a non-linear op'}" for i, x in zip(bn_sites, producers))
        _refuse(p, Reason.MULTIPLE_CALL_SITES, f"{bn.name} is called at {len(bn_sites)} sites with different inputs: {shown}")
        return
    prod = by_name[distinct[0]]
    p.producer = prod

    # Every call of the producer must feed exactly one call of this BatchNorm, and nothing else.
    prod_sites = graph.sites_of(prod.name)
    bn_site_ids = {f"site:{i}" for i in bn_sites}
    for idx in prod_sites:
        site = graph.sites[idx]
        if len(site.outputs) != 1:
            _refuse(p, Reason.UNSUPPORTED, f"{site.label} returns {len(site.outputs)} values, expected 1")
            return
        users = graph.consumers.get(site.outputs[0], [])
        feeds_bn = [u for u in users if u in bn_site_ids]
        others = [u for u in users if u not in bn_site_ids]
        if others and feeds_bn:
            names = ", ".join(_describe_consumer(graph, u) for u in others)
            _refuse(p, Reason.OTHER_CONSUMER, f"the output of {site.label} also feeds {names}, not only {bn.name}")
            return
        if not feeds_bn:
            names = ", ".join(_describe_consumer(graph, u) for u in others) or "nothing"
            _refuse(
                p,
                Reason.MULTIPLE_CALL_SITES,
                f"{prod.name} is called at {len(prod_sites)} sites and {site.label} feeds {names}, not {bn.name}: "
                "folding would change that call too",
            )
            return
        if len(feeds_bn) > 1:
            _refuse(p, Reason.OTHER_CONSUMER, f"the output of {site.label} feeds {bn.name} at {len(feeds_bn)} sites")
            return

    # Shapes at every call.
    c = bn_channels(bn.module)
    if c != out_channels(prod.module):
        _refuse(p, Reason.SHAPE_MISMATCH, f"{bn.name} has {c} channels but {prod.name} produces {out_channels(prod.module)}")
        return
    want_rank = spatial_dims(prod.module) + 2
    for idx in bn_sites:
        value = graph.sites[idx].inputs[0]
        shape = graph.shapes.get(value)
        if shape is None:
            if enforced_rank(bn.module) == want_rank and prod.kind != "linear":
                continue
            _refuse(
                p,
                Reason.NEEDS_EXAMPLE_INPUTS,
                f"the rank of {prod.name}'s output is unknown, so {bn.name}'s axis 1 may not be its channel axis; "
                "pass example_inputs so bnfold can check the traced shapes",
            )
            return
        if len(shape) != want_rank:
            if prod.kind == "linear":
                msg = (
                    f"{prod.name} outputs rank {len(shape)} {list(shape)}: {bn.name} normalises axis 1, "
                    "but Linear's features are the last axis"
                )
            else:
                msg = f"{prod.name} outputs rank {len(shape)} {list(shape)} (unbatched?), so axis 1 is not its channel axis"
            _refuse(p, Reason.SHAPE_MISMATCH, msg)
            return
        if shape[1] != c:
            _refuse(p, Reason.SHAPE_MISMATCH, f"{prod.name}'s output {list(shape)} has {shape[1]} on axis 1, not {c}")
            return
        if bn.kind == "frozen":
            why = frozen_computes_affine(bn.module, (2,) + tuple(shape[1:]))
            if why is not None:
                _refuse(p, Reason.UNSUPPORTED, f"{bn.name} looks like a FrozenBatchNorm2d but {why}")
                return


def _check_modules(p: Pairing, graph: SiteGraph, aliases: dict[int, list[str]], shared: dict[int, list[str]]) -> None:
    """Module-level preconditions: stats, hooks, parametrizations, direct reads, shared weights, dtype."""
    bn, prod = p.bn, p.producer
    assert prod is not None
    if bn.kind == "batchnorm" and (bn.module.running_mean is None or bn.module.running_var is None):
        _refuse(p, Reason.NO_RUNNING_STATS, f"{bn.name} has track_running_stats=False: it normalises with batch statistics")
        return
    for info in (prod, bn):
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
    for pname in ("weight", "bias"):
        t = getattr(prod.module, pname, None)
        if t is None:
            continue
        if type(t) is not torch.nn.Parameter and not isinstance(t, torch.Tensor):
            _refuse(p, Reason.UNSUPPORTED, f"{prod.name}.{pname} is not a tensor")
            return
        if isinstance(t, torch.nn.parameter.UninitializedParameter):
            _refuse(p, Reason.UNSUPPORTED, f"{prod.name}.{pname} is not initialised (lazy module)")
            return
        others = [n for n in shared.get(id(t), []) if not n.startswith(tuple(a + "." for a in aliases.get(id(prod.module), [prod.name])))]
        if others:
            _refuse(p, Reason.OTHER_CONSUMER, f"{prod.name}.{pname} is shared with {', '.join(others)}")
            return
        if t.dtype not in SUPPORTED_DTYPES:
            _refuse(p, Reason.UNSUPPORTED, f"{prod.name}.{pname} has dtype {t.dtype}; bnfold folds floating-point layers only")
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
