"""The folding pass as a plan: which chains fold, by which rule, into what, with which values.

For each per-channel affine chain (`chain.py`) in topological order, the registered rules
(`rules/registry.py`) are tried in order; the first that plans a fold wins, and every refusal on the
way is kept as a reason. `check` stops at the plan; `fold` applies it (`apply_plan`) and then checks
the result.

**Why a rehearsal.** Today's decisions depend on the folds made before them: a BN → Conv → BN pair
composes (the second fold reads the weights the first wrote), a fold into a producer hands it the
chain's output tensor (so a later chain sees that layer, not the BatchNorm, as its producer), a MatMul
fold adds a bias Add, and a fold removes nodes a later chain would otherwise reach. Re-deriving all of
that from an overlay of "claimed" nodes would be a second, subtly different model of the graph. Instead
each planned fold is applied, by the rule's own `apply`, to a scratch copy of the graph's structure
(`scratch.py`: weights shared, never written), so every later decision reads exactly the graph it read
when folds were applied one by one — identical decisions by construction. The plan then refers to the
*original* graph's nodes, and `apply_plan` replays the same edits there. The graph handed to
`plan_model` is never touched.

**In place.** The API imports a graph for one use only: `check` throws it away after planning, `fold`
applies the plan to it right away. Both call `plan_model(..., in_place=True)`, which rehearses on that
graph itself: the rehearsal *is* the apply. That is the same sequence of edits on the same objects
that a scratch copy followed by a replay produces (the copy exists to mirror the original exactly), so
the decisions are identical, minus a copy of every node and tensor, a translation of every fold and a
second run of every `apply` (on a MobileNetV2, about a third of the planning time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from bnfold.onnx.chain import AffineStep, display
from bnfold.onnx.constants import ConstantResolver
from bnfold.onnx.fold import GraphEdit
from bnfold.onnx.rules.base import Chain, Fold, Later, PlanContext, Refusal, Rule
from bnfold.onnx.rules.registry import rules
from bnfold.onnx.scratch import ScratchCopy
from bnfold.onnx.storage import TensorStore
from bnfold.report import Candidate, Reason, SkipReason, Status


@dataclass
class PlannedFold:
    """A fold of the plan, on the graph (main graph, subgraph or function body) it rewrites."""

    graph: gs.Graph
    fold: Fold
    candidate: Candidate


@dataclass
class Plan:
    """Every candidate with its outcome, and the folds to apply, in the order they must be applied."""

    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folds: list[PlannedFold] = field(default_factory=list)
    applied: bool = False  # planned in place: the folds are already made on the graph
    modified: set[str] = field(default_factory=set)  # initializer names the folds changed or dropped
    flushed: int = 0
    nodes_after: int = 0  # nodes of the rehearsed graphs: what the fold would leave
    params_change: int = 0  # parameter elements the folds add (negative: remove), counted on the rehearsal


def plan_model(
    graph: gs.Graph,
    resolver: ConstantResolver,
    shapes: dict[str, tuple[list[int | None], int]],
    names: set[str],
    store: TensorStore | None = None,
    *,
    in_place: bool = False,
    dry_run: bool = False,
) -> Plan:
    """Plan the main graph (and its subgraphs), then each local function.

    ``names``: the names in use (the rehearsal takes new ones from a copy, the apply from this set, in
    the same order). ``store``: holds folded values as they are planned (a spilling one keeps a fold of
    a model with external data from holding them in memory); without it (check) they stay in the plan.
    ``in_place``: rehearse on `graph` itself (see the module docstring): the folds are made as they are
    planned, `names` is taken from directly, and `apply_plan` only marks them FOLDED. Otherwise `graph`
    is left as it was. ``dry_run``: the plan is for a check and will not be applied, so a rule may
    leave a value it can prove harmless uncomputed (a `bnfold.affine.StandIn`; see `PlanContext`).
    """
    plan = Plan(applied=in_place)
    rehearsal = names if in_place else set(names)
    scratches: list[ScratchCopy] = []  # kept until the end: the resolver memoises by object identity
    parts = [(graph, "")] + [(f, f"function {f.domain}.{f.name}") for f in getattr(graph, "functions", [])]
    for part, path in parts:
        scratch = None if in_place else ScratchCopy(part)
        work = part if scratch is None else scratch.graph
        if scratch is not None:
            scratches.append(scratch)
        params_before = _count_params(work)
        ctx = PlanContext(work, resolver, shapes, dry_run=dry_run)
        edit = GraphEdit(work, rehearsal, modified=plan.modified, store=store, forget=resolver.forget)
        first = len(plan.folds)
        _plan_graph(ctx, edit, plan, path)
        if scratch is not None:
            for planned in plan.folds[first:]:
                planned.graph = scratch.original(planned.graph)
                planned.fold = _translated(planned.fold, scratch.original)
        nodes_after, params_after = _count(work)
        plan.nodes_after += nodes_after
        plan.params_change += params_after - params_before
    return plan


def apply_plan(plan: Plan, edit: GraphEdit) -> None:
    """Make the planned folds on the real graph, in order; each candidate becomes FOLDED.

    A plan made in place is already applied: only the statuses change (and `edit.modified` learns
    what the folds changed, as a replay would have told it).
    """
    edits: dict[int, GraphEdit] = {}  # one per graph, each pruned once at the end (`GraphEdit.prune`)
    for planned in plan.folds:
        if not plan.applied:
            graph_edit = edits.get(id(planned.graph))
            if graph_edit is None:
                graph_edit = edits[id(planned.graph)] = edit.for_graph(planned.graph)
            planned.fold.rule.apply(planned.fold, graph_edit)
        planned.candidate.status = Status.FOLDED
    for graph_edit in edits.values():
        graph_edit.prune()
    if plan.applied:
        edit.modified |= plan.modified


# ---------------------------------------------------------------------------------------------
# planning one graph
# ---------------------------------------------------------------------------------------------
def _plan_graph(ctx: PlanContext, edit: GraphEdit, plan: Plan, path: str) -> None:
    """Plan every chain of `ctx.graph` in node order, then recurse into subgraphs (If/Loop/Scan bodies)."""
    graph = ctx.graph
    seen: set[int] = set()
    own = {id(n) for n in graph.nodes}  # by identity: gs compares nodes by value, which is slow
    later: list[Chain] = []  # chains a rule asked to plan after the rest of the graph (`Later`)
    for node in list(graph.nodes):
        if id(node) in seen or not node.outputs:  # already in a chain, or removed by a fold
            continue
        seed = ctx.affine_step(node)
        if seed is None:
            continue
        if isinstance(seed, SkipReason):  # a BatchNorm that is not an affine map at all
            seen.add(id(node))
            plan.candidates.append(
                Candidate(display(node), node.op, Status.SKIPPED, [display(node)], reasons=[seed], graph=path)
            )
            continue
        steps = _grow_chain(seed, ctx, seen, own)
        seen.update(id(s.node) for s in steps)
        chain = Chain.of(steps)
        if _plan_chain(chain, ctx, edit, plan, path, may_wait=True):
            later.append(chain)
    for chain in later:
        _plan_chain(chain, ctx, edit, plan, path, may_wait=False)
    edit.prune()  # the folded nodes leave graph.nodes once, before its subgraphs are looked for
    for node in list(graph.nodes):
        for key, value in node.attrs.items():
            if isinstance(value, gs.Graph):
                sub = f"{path}/{display(node)}.{key}".lstrip("/")
                _plan_graph(ctx.for_graph(value), edit.for_graph(value), plan, sub)


def _grow_chain(seed: AffineStep, ctx: PlanContext, seen: set[int], own: set[int]) -> list[AffineStep]:
    """Extend both ways through tensors that have exactly one consumer and are not graph outputs."""
    steps = [seed]
    x = seed.data
    while x.inputs and len(x.outputs) == 1 and not ctx.is_output(x):
        prev = x.inputs[0]
        if id(prev) in seen or id(prev) not in own:  # never grow into an outer graph
            break
        step = ctx.affine_step(prev)
        if not isinstance(step, AffineStep) or len(prev.outputs) != 1:
            break
        steps.insert(0, step)
        x = step.data
    while True:
        y = steps[-1].node.outputs[0]
        if len(y.outputs) != 1 or ctx.is_output(y):
            break
        nxt = y.outputs[0]
        if id(nxt) in seen or id(nxt) not in own:
            break
        step = ctx.affine_step(nxt)
        if not isinstance(step, AffineStep) or step.data is not y:
            break
        steps.append(step)
    return steps


def _plan_chain(chain: Chain, ctx: PlanContext, edit: GraphEdit, plan: Plan, path: str, may_wait: bool = False) -> bool:
    """Ask each rule in turn; the first fold wins and is rehearsed. Every refusal is caught here, once.

    True: a rule raised `Later` and `may_wait`; nothing was recorded, the caller plans the chain again last.
    """
    bns = chain.batchnorms
    head = bns[0] if bns else chain.steps[0].node
    cand = Candidate(display(head), head.op, Status.SKIPPED, [display(n) for n in chain.nodes], graph=path, bn_count=len(bns))
    reasons: list[SkipReason] = []
    for rule in rules():
        try:
            site = rule.match(chain, ctx)
            if site is None:
                continue
            fold = rule.plan(chain, site, ctx)
        except Refusal as refusal:
            if may_wait and isinstance(refusal, Later):
                return True
            if refusal.reason not in reasons:  # two rules may see the same obstacle (a shared output)
                reasons.append(refusal.reason)
            continue
        if not rule.worthwhile(fold):
            return False
        rule.apply(fold, edit)  # the rehearsal: later decisions see this fold
        _record(cand, fold, rule, plan, path)
        plan.folds.append(PlannedFold(ctx.graph, fold, cand))
        return False
    if not bns:
        return False  # a Mul/Add that stays is not worth a line in the report
    if not reasons:
        x = chain.x
        reasons = [
            SkipReason(
                Reason.NO_LINEAR_NEIGHBOUR,
                f"'{display(head)}' has no Conv/ConvTranspose/Gemm/MatMul before it or after it"
                + (f" (fed by {x.inputs[0].op} '{display(x.inputs[0])}')" if x.inputs else f" (fed by input '{x.name}')"),
            )
        ]
    cand.reasons = reasons
    plan.candidates.append(cand)
    return False


def _record(cand: Candidate, fold: Fold, rule: Rule, plan: Plan, path: str) -> None:
    """The candidate as foldable, named after its rule; read after the rehearsal, as the report always was."""
    cand.status = Status.FOLDABLE
    cand.target_op, cand.target = fold.site.names()
    cand.direction = rule.direction
    cand.rule = rule.name
    plan.candidates.append(cand)
    plan.notes.extend(fold.chain.affine.notes)
    plan.notes.extend(fold.notes)
    for layer in fold.layers:
        if layer.flushed:
            plan.notes.append(f"{display(layer.node)}: {layer.flushed} folded value(s) became subnormal and were flushed to zero")
    plan.flushed += fold.flushed


# ---------------------------------------------------------------------------------------------
# from the scratch copy back to the original
# ---------------------------------------------------------------------------------------------
def _translated(obj: Any, original: Callable[[Any], Any]) -> Any:
    """`obj` with every node, tensor and graph it refers to replaced by the original's (any dataclass nesting).

    A fold may only refer to what existed before planning; one that refers to something an earlier
    rehearsed fold created cannot be replayed, and that is a bug in its rule.
    """
    if isinstance(obj, (gs.Node, gs.Tensor, gs.Graph)):
        try:
            return original(obj)
        except KeyError:
            raise AssertionError(f"a planned fold refers to {obj.name!r}, which only its rehearsal created") from None
    if isinstance(obj, (Rule, np.ndarray)):
        return obj
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _translated(getattr(obj, f.name), original) for f in fields(obj) if f.init})
    if isinstance(obj, list):
        return [_translated(v, original) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_translated(v, original) for v in obj)
    if isinstance(obj, dict):
        return {k: _translated(v, original) for k, v in obj.items()}
    return obj


def _count_params(graph: gs.Graph) -> int:
    """Elements of the constants the graph's nodes read, and of its Constant nodes, subgraphs included."""
    return _count(graph)[1]


def _count(graph: gs.Graph) -> tuple[int, int]:
    """(nodes, parameter elements) of the graph, subgraphs included, in one walk (`_count_params` says what counts).

    It runs twice per plan over every node, so it is written for speed: only a node with attributes can
    hold a Constant (a `value`) or a subgraph among them, and a constant's size is counted once per graph.
    """
    constants: dict[int, gs.Constant] = {}
    nodes, params = len(graph.nodes), 0
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                constants[id(tensor)] = tensor
        if node.attrs:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant):
                    constants[id(value)] = value
                elif isinstance(value, gs.Graph):
                    sub_nodes, sub_params = _count(value)
                    nodes += sub_nodes
                    params += sub_params
    return nodes, params + sum(math.prod(t.shape) for t in constants.values())  # math, not numpy: per tensor
