"""Fold the BatchNorms of a `torch.export.ExportedProgram` into the conv/linear ops that produce them.

The PyTorch 2 deployment route (ExecuTorch, AOTInductor, dynamo ONNX export) starts from an
ExportedProgram, where modules are gone: a BatchNorm is an aten op (``aten.batch_norm`` in the training
IR, ``_native_batch_norm_legit_no_training`` after ``run_decompositions()``) reading lifted parameters
and buffers. For each one whose input is the output of an ``aten.conv*``/``convolution``/``linear`` op
with stored weights, and only of that, the folded weight and bias are computed (float64, rounded once)
and written into a copy of the program's state dict, the BatchNorm op is removed, and the BatchNorm's
tensors are dropped from the signature when nothing else reads them. A conv/linear without bias gets a
new parameter input ``<layer>.bias``, placed right after its weight's, so the order the signature
demands (parameters, buffers, constants, user inputs) holds. Like the module path, a producer may sit
behind a reshape that keeps its channel (Linear → flatten(0, 1) → BatchNorm1d) or a concatenation on
axis 1 (each producer takes its slice); folding into a consumer is left to the module path. The result is a new ExportedProgram; the
caller's is not modified. The same float64 check as for modules runs on ``example_inputs`` (or the
program's stored example inputs).
"""

from __future__ import annotations

import copy
import math
import operator
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from bnfold.affine import FoldOverflowError, batchnorm_affine, channel_slice, fold_into_conv, fold_into_conv_transpose
from bnfold.report import Candidate, FoldReport, Reason, SkipReason, Status
from bnfold.torch.apply import to_torch
from bnfold.torch.checking import example_args, measure_before, verify_fold
from bnfold.torch.graph import COMPUTED, Site, SiteGraph, export_state_names, from_export
from bnfold.torch.kinds import SUPPORTED_DTYPES


def _producer_table() -> dict[Any, tuple[str, int | None, int | None]]:
    """aten producer overloads → (kind, index of `groups`, index of `transposed` or None)."""
    aten = torch.ops.aten
    table: dict[Any, tuple[str, int | None, int | None]] = {}

    def add(name: str, kind: str, groups: int | None, transposed: int | None) -> None:
        packet = getattr(aten, name, None)
        if packet is not None:
            for o in packet.overloads():
                table[getattr(packet, o)] = (kind, groups, transposed)

    for d in (1, 2, 3):
        add(f"conv{d}d", "conv", 6, None)
        add(f"conv_transpose{d}d", "conv_transpose", 6, None)
    add("convolution", "conv", 8, 6)
    add("linear", "linear", None, None)
    return table


_PRODUCERS = _producer_table()


@dataclass
class _Part:
    """One producer op and the BatchNorm channels it makes (all of them, or its slice of a concatenation)."""

    node: fx.Node
    kind: str
    groups: int
    channels: tuple[int, int]


@dataclass
class _Plan:
    site: Site
    bn_node: fx.Node
    parts: list[_Part]
    value: fx.Node | None = None  # what the BatchNorm's users read once it is gone
    reason: SkipReason | None = None

    @property
    def producer(self) -> fx.Node | None:
        return self.parts[0].node if self.parts else None


def fold_program(ep: ExportedProgram, example_inputs: Any = None) -> tuple[ExportedProgram, FoldReport]:
    """A new ExportedProgram with every provably foldable BatchNorm op folded, and the report."""

    start = time.perf_counter()
    args = example_args(example_inputs)
    if args is None and ep.example_inputs is not None and not ep.example_inputs[1]:
        args = tuple(ep.example_inputs[0])
    with warnings.catch_warnings():  # torch's own pytree deprecation, raised by copying its TreeSpecs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        work = copy.deepcopy(ep)
    graph = work.graph_module.graph
    state_of = export_state_names(work)
    sg = from_export(work, None, {})
    report = FoldReport(source="ExportedProgram", frontend="torch", analysis="torch.export program")
    report.params_before = sum(int(t.numel()) for t in work.state_dict.values())
    nodes = {n.name: n for n in graph.nodes}

    plans = [_plan(sg, i, nodes, state_of, work) for i in sg.bn_sites()]
    removed = 0
    new_specs: dict[str, InputSpec] = {}  # bias inputs added for producers without one
    for plan in plans:
        cand = Candidate(
            node=plan.site.label,
            op_type=f"BatchNorm ({plan.site.call.op if plan.site.call else '?'})",
            status=Status.SKIPPED,
            nodes=[plan.bn_node.name],
            target=" + ".join(_prefix(state_of[p.node.args[1].name]) for p in plan.parts) or None,
            target_op=" + ".join(sorted({_op_name(p.node) for p in plan.parts})) or None,
            direction="into-producer",
            bn_count=1,
        )
        report.candidates.append(cand)
        if plan.reason is not None:
            cand.reasons.append(plan.reason)
            continue
        try:
            _apply(plan, work, state_of, new_specs)
        except FoldOverflowError as exc:
            cand.reasons.append(SkipReason(Reason.FP16_OVERFLOW, str(exc)))
            continue
        cand.status = Status.FOLDED
        removed += 1
    folded = _rebuild(work, new_specs) if removed else work
    report.nodes_before, report.nodes_after = sg.compute_nodes, sg.compute_nodes - removed
    report.params_after = sum(int(t.numel()) for t in folded.state_dict.values())
    if args is not None and removed:
        before = measure_before(ep.module(), args)
        report.notes.append(verify_fold(folded.module(), args, before))
    report.seconds = time.perf_counter() - start
    return folded, report


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "name", lambda: node.target)()).replace("aten::", "aten.")


def _prefix(target: str) -> str:
    return target[: -len(".weight")] if target.endswith(".weight") else target


def _refuse(plan: _Plan, code: Reason, message: str) -> _Plan:
    plan.reason = SkipReason(code, message)
    return plan


def _part(node: fx.Node, start: int) -> _Part | None:
    if node.op != "call_function" or node.target not in _PRODUCERS:
        return None
    kind, g_idx, t_idx = _PRODUCERS[node.target]
    if t_idx is not None and len(node.args) > t_idx and node.args[t_idx]:
        kind = "conv_transpose"
    groups = int(node.args[g_idx]) if g_idx is not None and len(node.args) > g_idx else int(node.kwargs.get("groups", 1))
    return _Part(node, kind, groups, (start, start))


def _plan(sg: SiteGraph, idx: int, nodes: dict[str, fx.Node], state_of: dict[str, str], ep: ExportedProgram) -> _Plan:
    site = sg.sites[idx]
    call = site.call
    assert call is not None
    out = nodes[site.outputs[0]]
    bn_node = out if out.target is not operator.getitem else out.args[0]
    plan = _Plan(site, bn_node, [])
    if call.state["running_mean"] is None or call.state["running_var"] is None:
        return _refuse(plan, Reason.NO_RUNNING_STATS, f"{site.label} has no running statistics: it normalises with batch statistics")
    if call.training is not False:
        return _refuse(plan, Reason.TRAINING_MODE, f"{site.label} ({call.op}) normalises with batch statistics; export the model in eval mode")
    computed = [k for k, v in call.state.items() if v == COMPUTED]
    if computed or call.eps is None:
        return _refuse(plan, Reason.NOT_CONSTANT, f"{site.label} ({call.op}) takes {', '.join(computed) or 'eps'} computed in the program")
    if not site.inputs:
        return _refuse(plan, Reason.UNSUPPORTED, f"{site.label} has no tensor input")
    channels = int(_state_tensor(ep, call.state["running_mean"]).shape[0])  # type: ignore[arg-type]
    value = nodes[site.inputs[0]]
    plan.value = value
    op = sg.ops.get(value.name)
    direct = _part(value, 0)
    if direct is not None:
        plan.parts = [direct]
        direct.channels = (0, channels)
        feeds = {value.name: f"site:{idx}"}
    elif op is not None and op.kind == "reshape" and _part(nodes[op.inputs[0]], 0) is not None:
        plan.parts = [_part(nodes[op.inputs[0]], 0)]  # type: ignore[list-item]
        plan.parts[0].channels = (0, channels)
        feeds = {op.inputs[0]: f"node:{value.name}", value.name: f"site:{idx}"}
        why = _reshape_keeps_channel(sg, plan.parts[0], op.inputs[0], value.name, channels, ep, state_of)
        if why:
            return _refuse(plan, Reason.SHAPE_MISMATCH, why)
    elif op is not None and op.kind == "cat" and all(_part(nodes[v], 0) is not None for v in op.inputs):
        shape = sg.shapes.get(value.name)
        if shape is None or (op.dim or 0) % len(shape) != 1:
            return _refuse(plan, Reason.SHAPE_MISMATCH, f"the concatenation before {site.label} is not on the channel axis 1")
        start = 0
        for v in op.inputs:
            part = _part(nodes[v], start)
            assert part is not None
            n = sg.shapes.get(v, (0, 0))[1]
            part.channels = (start, start + n)
            start += n
            plan.parts.append(part)
        if len({p.node.name for p in plan.parts}) != len(plan.parts):
            return _refuse(plan, Reason.OTHER_CONSUMER, f"one op's output is concatenated twice before {site.label}")
        feeds = {v: f"node:{value.name}" for v in op.inputs}
        feeds[value.name] = f"site:{idx}"
    else:
        return _refuse(plan, Reason.NO_LINEAR_NEIGHBOUR, f"{site.label} takes its input from {sg.describe(value.name)}, not from a conv/linear op")
    for name, only in feeds.items():
        users = sg.users(name)
        if users != [only]:
            shown = ", ".join(sg.describe(u[5:]) if u.startswith("node:") else sg.sites[int(u[5:])].label if u.startswith("site:") else u for u in users if u != only)
            return _refuse(plan, Reason.OTHER_CONSUMER, f"the output of {name} also feeds {shown}, not only {site.label}")
    for part in plan.parts:
        why = _check_part(sg, part, state_of, ep, site.label, reshaped=op is not None and direct is None and op.kind == "reshape")
        if why is not None:
            return _refuse(plan, *why)
    if plan.parts[-1].channels[1] != channels:
        return _refuse(plan, Reason.SHAPE_MISMATCH, f"the producers make {plan.parts[-1].channels[1]} channels, {site.label} has {channels}")
    return plan


def _reshape_keeps_channel(sg: SiteGraph, part: _Part, src: str, dst: str, c: int, ep: ExportedProgram, state_of: dict[str, str]) -> str | None:
    """None when producer → reshape → BatchNorm keeps the producer's channel on axis 1, else why not."""
    a, b = sg.shapes.get(src), sg.shapes.get(dst)
    if a is None or b is None:
        return f"the shapes around {dst} are unknown"
    if part.kind == "linear":
        ok = len(b) == 2 and a[-1] == b[1] == c and math.prod(a[:-1]) == b[0]
    else:
        ok = len(b) >= 2 and tuple(a[:2]) == tuple(b[:2]) and a[1] == c
    return None if ok else f"{src} {list(a)} is reshaped to {list(b)}: the BatchNorm's axis 1 is not the producer's channel"


def _check_part(sg: SiteGraph, part: _Part, state_of: dict[str, str], ep: ExportedProgram, label: str, reshaped: bool) -> tuple[Reason, str] | None:
    src = part.node
    weight = src.args[1] if len(src.args) > 1 else src.kwargs.get("weight")
    bias = src.args[2] if len(src.args) > 2 else src.kwargs.get("bias")
    for what, ph in (("weight", weight), ("bias", bias)):
        if ph is None and what == "bias":
            continue
        if not isinstance(ph, fx.Node) or ph.name not in state_of:
            return Reason.NOT_CONSTANT, f"the {what} of {src.name} is computed in the program, not a stored tensor"
        if len(ph.users) != 1:
            return Reason.OTHER_CONSUMER, f"{state_of[ph.name]} is read by {len(ph.users)} ops, not only {src.name}"
        if _state_tensor(ep, state_of[ph.name]).dtype not in SUPPORTED_DTYPES:
            return Reason.UNSUPPORTED, f"{state_of[ph.name]} is not floating point"
    if reshaped:
        return None
    shape = sg.shapes.get(src.name)
    w = _state_tensor(ep, state_of[weight.name])
    want = 2 if part.kind == "linear" else w.dim()
    if shape is None or len(shape) != want:
        return Reason.SHAPE_MISMATCH, f"{src.name} outputs {list(shape) if shape else 'an unknown shape'}: {label}'s axis 1 is not its channel axis"
    return None


def _state_tensor(ep: ExportedProgram, target: str) -> torch.Tensor:
    return ep.state_dict[target] if target in ep.state_dict else ep.constants[target]


def _set_state(ep: ExportedProgram, target: str, value: torch.Tensor, parameter: bool) -> None:
    if target in ep.constants and target not in ep.state_dict:
        ep.constants[target] = value
    else:
        ep.state_dict[target] = torch.nn.Parameter(value, requires_grad=False) if parameter else value


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def _apply(plan: _Plan, ep: ExportedProgram, state_of: dict[str, str], new_specs: dict[str, InputSpec]) -> None:
    """Compute every part (may raise before writing), then write the state, rewire, drop the BatchNorm op."""
    call = plan.site.call
    assert call is not None and plan.value is not None
    mean, var = (_state_tensor(ep, call.state[k]) for k in ("running_mean", "running_var"))  # type: ignore[arg-type]
    c = int(mean.shape[0])
    gamma = _np(_state_tensor(ep, call.state["weight"])) if call.state["weight"] else np.ones(c)
    beta = _np(_state_tensor(ep, call.state["bias"])) if call.state["bias"] else np.zeros(c)
    a = batchnorm_affine(gamma, beta, _np(mean), _np(var), float(call.eps))  # type: ignore[arg-type]
    writes = []
    for part in plan.parts:
        src = part.node
        w_node = src.args[1]
        b_node = src.args[2] if len(src.args) > 2 and isinstance(src.args[2], fx.Node) else None
        w_target = state_of[w_node.name]
        w = _state_tensor(ep, w_target)
        b = _state_tensor(ep, state_of[b_node.name]) if b_node is not None else None
        sub = channel_slice(a, *part.channels)
        if part.kind == "conv_transpose":
            new_w, new_b = fold_into_conv_transpose(_np(w), None if b is None else _np(b), sub, part.groups)
        else:
            new_w, new_b = fold_into_conv(_np(w), None if b is None else _np(b), sub)
        like = b if b is not None else w
        w_t, _ = to_torch(new_w, w.dtype, w.device, w_target)
        b_t, _ = to_torch(new_b, like.dtype, like.device, f"bias of {w_target}")
        writes.append((src, w_node, b_node, w_target, w, b, w_t, b_t))
    for src, w_node, b_node, w_target, w, b, w_t, b_t in writes:
        _set_state(ep, w_target, w_t, isinstance(w, torch.nn.Parameter))
        if b_node is not None:
            _set_state(ep, state_of[b_node.name], b_t, isinstance(b, torch.nn.Parameter))
        else:
            _add_bias(ep, src, w_node, w_target, b_t, state_of, new_specs)
    bn = plan.bn_node
    graph = bn.graph
    for user in list(bn.users):
        if user.target is operator.getitem:
            user.replace_all_uses_with(plan.value)
            graph.erase_node(user)
    bn.replace_all_uses_with(plan.value)
    inputs = [x for x in bn.args[1:5] if isinstance(x, fx.Node)]
    graph.erase_node(bn)
    if call.owner:  # the BatchNorm's step counter: unused by inference, owned by nothing once it is gone
        inputs += [n for n in graph.nodes if n.op == "placeholder" and state_of.get(n.name) == f"{call.owner}.num_batches_tracked"]
    for ph in inputs:
        if not ph.users and ph.op == "placeholder":
            target = state_of.pop(ph.name, None)
            if target is not None:
                ep.state_dict.pop(target, None)
                ep.constants.pop(target, None)
            graph.erase_node(ph)


def _add_bias(
    ep: ExportedProgram, src: fx.Node, w_node: fx.Node, w_target: str, value: torch.Tensor, state_of: dict[str, str], new_specs: dict[str, InputSpec]
) -> None:
    """A new parameter input for a producer without bias, placed right after the weight's input."""
    target = _prefix(w_target) + ".bias" if w_target.endswith(".weight") else w_target + "_bias"
    while target in ep.state_dict or target in ep.constants:
        target += "_folded"
    graph = src.graph
    with graph.inserting_after(w_node):
        ph = graph.placeholder(w_node.name.removesuffix("weight") + "bias" if w_node.name.endswith("weight") else w_node.name + "_bias")
    fake = w_node.meta.get("val")
    if fake is not None and hasattr(fake, "fake_mode"):
        ph.meta["val"] = fake.fake_mode.from_tensor(value, static_shapes=True)
    state_of[ph.name] = target
    ep.state_dict[target] = torch.nn.Parameter(value, requires_grad=False) if isinstance(_state_tensor(ep, w_target), torch.nn.Parameter) else value
    new_specs[ph.name] = InputSpec(InputKind.PARAMETER, TensorArgument(name=ph.name), target, None)
    args = list(src.args)
    if len(args) > 2:
        args[2] = ph
    else:
        args = args[:2] + [ph]
    src.args = tuple(args)


def _rebuild(ep: ExportedProgram, new_specs: dict[str, InputSpec]) -> ExportedProgram:
    """A consistent ExportedProgram: one input spec per placeholder that is left, in placeholder order."""
    old = {getattr(s.arg, "name", None): s for s in ep.graph_signature.input_specs}
    specs = []
    for n in ep.graph.nodes:
        if n.op != "placeholder":
            continue
        spec = old.get(n.name) or new_specs.pop(n.name)
        specs.append(spec)
    signature = ExportGraphSignature(input_specs=specs, output_specs=list(ep.graph_signature.output_specs))
    kept = {s.target for s in specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    state_dict = {k: v for k, v in ep.state_dict.items() if k in kept}
    ep.graph_module.recompile()
    return ExportedProgram(
        root=ep.graph_module,
        graph=ep.graph_module.graph,
        graph_signature=signature,
        state_dict=state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs,
        constants=ep.constants,
        verifiers=ep.verifiers,
    )
