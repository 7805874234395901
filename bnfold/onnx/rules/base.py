"""What a fold rule is: one pattern, its preconditions, a pure plan and a rewrite.

The math every rule shares (DESIGN §1). A chain of BatchNorm and per-channel Mul/Add/Sub/Div steps is one
map ``y = s·x + t`` on axis 1 (``chain.py``). Folding it into a linear layer is exact in real arithmetic:

* into the producer (layer → chain), per *output* channel:  ``W' = s ⊙_out W,  b' = s·b + t``
* into the consumer (chain → layer), per *input* channel, only where the layer adds no padding:
  ``W' = W ⊙_in s,  b' = b + Σ_{in,k} W[out, in, k]·t[in]``

A rule splits the work the way onnxruntime's fusions split ``SatisfyCondition`` from ``Apply``:

``match(chain, ctx) -> Site | None``
    Structural preconditions only: which nodes the pattern covers. ``None`` means "not my pattern" and
    the pass asks the next rule; a pattern that is there but cannot fold *raises* a `Refusal`.
``plan(chain, site, ctx) -> Fold``
    Pure: reads constants and shapes, computes every new value in float64 and rounds it once
    (`bnfold.affine`), so overflow and shape refusals happen here, before anything changes.
``apply(fold, edit) -> None``
    Rewrites the graph through onnx-graphsurgeon with the values the plan computed; it never refuses.

`IntoProducer` and `IntoConsumer` implement match and apply for the two directions; a per-op rule
(like onnxscript's ``_fuse_batchnorm`` subclasses) only names its ops and overrides `values`, the
weight axis and scaling. A rule that covers several layers (a Concat of producers, a re-parameterised
block) returns a `Site` subclass naming them, one `LayerPlan` per layer, and overrides `apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NoReturn

import numpy as np
import onnx_graphsurgeon as gs

from bnfold.affine import Affine, FoldOverflowError, round_to_dtype
from bnfold.onnx.chain import (
    AffineStep,
    PrecomputedAffine,
    batchnorm_affines,
    batchnorm_step,
    compose,
    display,
    elementwise_step,
    is_graph_output,
)
from bnfold.onnx.constants import ConstantResolver
from bnfold.onnx.fold import GraphEdit
from bnfold.report import Reason, SkipReason

INTO_PRODUCER = "into-producer"
INTO_CONSUMER = "into-consumer"


class Refusal(Exception):
    """A pattern that is there but cannot fold exactly; carries the reason the report shows."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = SkipReason(code, message)


class Later(Refusal):
    """A pattern whose neighbours must fold first: the pass plans this chain again after the rest of its graph.

    A RepVGG block exported as ``BN(x), Conv1(x)→BN, Conv3(x)→BN, Add, Add`` meets its identity BatchNorm
    before the branch BatchNorms that fold into the convs. The second time, a `Later` is the refusal it carries.
    """


def refuse(code: Reason, message: str) -> NoReturn:
    """Stop planning this rule for this chain; the pass records `code` and `message` (with its hint)."""
    raise Refusal(code, message)


def is_standard(node: gs.Node) -> bool:
    """An operator of the default ONNX domain (a custom domain's Conv is not ours to rewrite)."""
    return (node.domain or "") in ("", "ai.onnx")


@dataclass
class PlanContext:
    """What a rule may read beside the nodes themselves: the graph, its constants and its shapes."""

    graph: gs.Graph
    resolver: ConstantResolver
    shapes: dict[str, tuple[list[int | None], int]]
    dry_run: bool = False  # a check: a rule may skip computing a value whose decisions it can prove without it
    # the graph's plain BatchNorms done at once (`chain.batchnorm_affines`), on the first one asked for; not
    # carried to another graph by `for_graph`
    _batchnorms: dict[int, PrecomputedAffine] | None = field(default=None, init=False, repr=False, compare=False)

    def for_graph(self, graph: gs.Graph) -> "PlanContext":
        return replace(self, graph=graph)

    def is_output(self, tensor: gs.Tensor) -> bool:
        return is_graph_output(tensor, self.graph)

    def rank_of(self, tensor: gs.Tensor) -> int | None:
        if isinstance(tensor, gs.Constant):
            return len(tensor.shape)
        info = self.shapes.get(tensor.name)
        if info is not None and info[0] is not None:
            return len(info[0])
        return len(tensor.shape) if tensor.shape is not None else None

    def static_shape(self, tensor: gs.Tensor) -> list[int | None] | None:
        info = self.shapes.get(tensor.name)
        shape = info[0] if info else tensor.shape
        if shape is None:
            return None
        return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]

    def affine_step(self, node: gs.Node) -> AffineStep | SkipReason | None:
        """`node` as a per-channel affine step, the reason a BatchNorm is not one, or None."""
        if not is_standard(node):
            return None
        if node.op == "BatchNormalization":
            if self._batchnorms is None:
                self._batchnorms = batchnorm_affines(self.graph.nodes, self.resolver)
            return batchnorm_step(node, self.resolver, self._batchnorms)
        return elementwise_step(node, self.resolver, self.rank_of, self.static_shape)

    def const(self, node: gs.Node, index: int, label: str) -> np.ndarray | None:
        """The constant at input `index`; None if that optional input is absent; refuses if not constant."""
        if index >= len(node.inputs) or (isinstance(node.inputs[index], gs.Variable) and not node.inputs[index].name):
            return None
        r = self.resolver.resolve(node.inputs[index])
        if not r.ok:
            assert r.reason is not None
            refuse(r.reason.code, f"{node.op} '{display(node)}' {label}: {r.reason.message}")
        return r.value


@dataclass
class Chain:
    """A run of affine steps that composes into one map; `x` feeds it, `y` is what it produces."""

    steps: list[AffineStep]
    x: gs.Tensor
    y: gs.Tensor
    affine: Affine

    @classmethod
    def of(cls, steps: list[AffineStep]) -> "Chain":
        return cls(steps, steps[0].data, steps[-1].node.outputs[0], compose(steps))

    @property
    def batchnorms(self) -> list[gs.Node]:
        return [s.node for s in self.steps if s.node.op == "BatchNormalization"]

    @property
    def nodes(self) -> list[gs.Node]:
        return [s.node for s in self.steps]


@dataclass
class Site:
    """Where a rule folds: the layer it rewrites, and what lies between it and the chain."""

    target: gs.Node
    through: gs.Node | None = None  # a Flatten/Reshape between the chain and a consumer head
    repeat: int = 1  # features per channel after `through` (a Flatten of [N, C, H, W] gives H·W)

    def names(self) -> tuple[str, str]:
        """(op, name) the report gives the layer folded into; a several-layer site names every layer."""
        return self.target.op, display(self.target)


@dataclass
class LayerPlan:
    """New values for some of a node's inputs (by index), new attributes, and an optional bias Add."""

    node: gs.Node
    params: dict[int, Any] = field(default_factory=dict)  # rounded arrays; once written, how they are held
    attrs: dict[str, Any] = field(default_factory=dict)
    bias_after: np.ndarray | None = None  # MatMul has no bias input: an Add follows it
    flushed: int = 0  # values that rounded to subnormal and were flushed to zero


@dataclass
class Fold:
    """One planned fold: the rule, the chain it removes, where it goes, and every value it writes."""

    rule: "Rule"
    chain: Chain
    site: Site
    layers: list[LayerPlan]
    notes: list[str] = field(default_factory=list)  # for the report ("3 branches → 1 Conv (conv)")

    @property
    def flushed(self) -> int:
        return sum(layer.flushed for layer in self.layers)


class Rule(ABC):
    """One foldable pattern. Subclass, set the class attributes, implement match/plan/apply.

    A rule that only explains (its `match` refuses or returns None, never a site) needs no plan/apply:
    the pass calls them only for a site `match` returned.

    ``name``: stable, shown in the report and JSON (``conv``, ``flatten-head``); with ``direction`` it
    identifies the rule. ``priority``: the registry tries rules in ascending order and takes the first
    that plans a fold; producer-side rules (100s) come before consumer-side ones (200s), as before.
    """

    name: ClassVar[str]
    direction: ClassVar[str]
    priority: ClassVar[int]

    @abstractmethod
    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        """The nodes this pattern covers around `chain`, or None when the pattern is not there.

        Structure only (ops, domains, single readers, graph outputs); raise with `refuse` when the
        pattern is there but cannot fold.
        """

    def plan(self, chain: Chain, site: Site, ctx: PlanContext) -> Fold:
        """Every new value for the layers of `site`, in float64 rounded once; may refuse; writes nothing."""
        raise TypeError(f"{self!r} returned a site from match but defines no plan")

    def worthwhile(self, fold: Fold) -> bool:
        """False: the fold would gain nothing, so the chain is left as it is and not reported."""
        return True

    def apply(self, fold: Fold, edit: GraphEdit) -> None:
        """Rewrite `edit.graph` with the planned values; never refuses.

        Runs while planning (in place, or on a scratch copy that is later replayed on the real graph),
        so it must be deterministic and refer only to nodes and tensors that existed before planning.
        """
        raise TypeError(f"{self!r} planned a fold but defines no apply")

    def __repr__(self) -> str:
        return f"<rule {self.name} ({self.direction})>"


# ---------------------------------------------------------------------------------------------
# the two directions
# ---------------------------------------------------------------------------------------------
class IntoProducer(Rule):
    """Layer → chain: the layer takes over the chain's output tensor (graph-output names survive)."""

    direction = INTO_PRODUCER
    priority = 100
    ops: ClassVar[tuple[str, ...]]

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        if not chain.x.inputs:
            return None
        producer = chain.x.inputs[0]
        if producer.op not in self.ops or not is_standard(producer):
            return None
        refuse_shared_output(chain, producer, ctx)
        if len(producer.outputs) != 1:
            refuse(Reason.UNSUPPORTED, f"{producer.op} '{display(producer)}' has several outputs")
        return Site(producer)

    def plan(self, chain: Chain, site: Site, ctx: PlanContext) -> Fold:
        return Fold(self, chain, site, [self.values(site.target, chain.affine, ctx)])

    @abstractmethod
    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        """The layer's new parameters with `affine` applied to its output channels (the per-op math)."""

    def apply(self, fold: Fold, edit: GraphEdit) -> None:
        layer, chain = fold.layers[0], fold.chain
        edit.write_params(layer.node, layer.params, layer.attrs)
        chain.steps[-1].node.outputs.clear()
        layer.node.outputs = [chain.y]
        edit.add_bias_after(layer.node, layer.bias_after)
        edit.remove_dead(chain.nodes)


class IntoConsumer(Rule):
    """Chain → layer: the layer (or the node before it, `site.through`) reads the chain's input instead."""

    direction = INTO_CONSUMER
    priority = 200
    ops: ClassVar[tuple[str, ...]]

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        consumer = sole_consumer(chain.y, self.ops, ctx)
        if consumer is None or not is_standard(consumer) or not reads_once_as_data(consumer, chain.y):
            return None
        return Site(consumer)

    def plan(self, chain: Chain, site: Site, ctx: PlanContext) -> Fold:
        return Fold(self, chain, site, [self.values(site.target, repeated(chain.affine, site.repeat), ctx)])

    @abstractmethod
    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        """The layer's new parameters with `affine` applied to its input channels (the per-op math)."""

    def apply(self, fold: Fold, edit: GraphEdit) -> None:
        layer, chain = fold.layers[0], fold.chain
        edit.write_params(layer.node, layer.params, layer.attrs)
        reader = fold.site.through if fold.site.through is not None else layer.node
        reader.inputs[0] = chain.x
        edit.add_bias_after(layer.node, layer.bias_after)
        edit.remove_dead(chain.nodes)


# ---------------------------------------------------------------------------------------------
# helpers rules share: each refuses by raising, so a rule reads as its list of preconditions
# ---------------------------------------------------------------------------------------------
def refuse_shared_output(chain: Chain, producer: gs.Node, ctx: PlanContext) -> None:
    """A fold into the producer is exact only when the chain is the sole reader of its output."""
    x = chain.x
    if ctx.is_output(x):
        refuse(Reason.GRAPH_OUTPUT, f"{producer.op} '{display(producer)}' output '{x.name}' is also a graph output")
    others = [n for n in x.outputs if n is not chain.steps[0].node]
    if others:
        names = ", ".join(f"{n.op} '{display(n)}'" for n in others[:4])
        refuse(Reason.OTHER_CONSUMER, f"{producer.op} '{display(producer)}' output '{x.name}' also feeds {names}")


def sole_consumer(y: gs.Tensor, ops: tuple[str, ...], ctx: PlanContext) -> gs.Node | None:
    """The one node reading `y` if its op is in `ops`; refuses when `y` feeds such a node and others."""
    if ctx.is_output(y) or len(y.outputs) != 1:
        if len(y.outputs) > 1 and any(n.op in ops for n in y.outputs):
            names = ", ".join(f"{n.op} '{display(n)}'" for n in y.outputs[:4])
            refuse(Reason.OTHER_CONSUMER, f"output '{y.name}' feeds several nodes ({names})")
        return None
    consumer = y.outputs[0]
    return consumer if consumer.op in ops else None


def reads_once_as_data(node: gs.Node, tensor: gs.Tensor) -> bool:
    """`tensor` is the node's data input (input 0) and nothing else of it (not also its weight)."""
    return bool(node.inputs) and node.inputs[0] is tensor and sum(t is tensor for t in node.inputs) == 1


def repeated(affine: Affine, repeat: int) -> Affine:
    """Each channel spanning `repeat` consecutive features (a Flatten of [N, C, H, W])."""
    if repeat == 1:
        return affine
    return Affine(np.repeat(affine.scale, repeat), np.repeat(affine.shift, repeat), affine.notes)


def fit(affine: Affine, channels: int, node: gs.Node) -> Affine:
    """Broadcast a scalar-like map to `channels`; refuse when the channel counts differ."""
    n = affine.scale.shape[0]
    if n == channels:
        return affine
    if n == 1:
        return Affine(np.full(channels, affine.scale[0]), np.full(channels, affine.shift[0]), affine.notes)
    refuse(Reason.SHAPE_MISMATCH, f"{n} BatchNorm channels but {node.op} '{display(node)}' has {channels} channels on that axis")


def weights(node: gs.Node, ctx: PlanContext, bias_index: int | None = 2) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's constant weight (input 1) and optional bias; refuses when the weight is missing."""
    w = ctx.const(node, 1, "weight")
    if w is None:
        refuse(Reason.NOT_CONSTANT, f"{node.op} '{display(node)}' has no weight input")
    b = ctx.const(node, bias_index, "bias") if bias_index is not None else None
    return w, b


def rounded(plan: LayerPlan, values: dict[int, tuple[np.ndarray, np.dtype, str]]) -> LayerPlan:
    """Round each float64 value once to its dtype into `plan.params`; refuse on overflow."""
    with overflow_refused():
        for index, (vals, dtype, what) in values.items():
            plan.params[index], flushed = round_to_dtype(vals, dtype, f"{what} of '{display(plan.node)}'")
            plan.flushed += flushed
    return plan


def with_bias_after(plan: LayerPlan, bias: np.ndarray, dtype: np.dtype) -> LayerPlan:
    """MatMul has no bias input: a non-zero folded bias becomes an Add after it."""
    if np.any(bias != 0):
        with overflow_refused():
            plan.bias_after, flushed = round_to_dtype(bias, dtype, f"bias of '{display(plan.node)}'")
        plan.flushed += flushed
    return plan


class _OverflowRefused:
    """`overflow_refused` as a plain context manager: entered once per fold, where a generator-based one
    (contextlib) costs a few microseconds more than the rest of the bookkeeping around it."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, FoldOverflowError):
            refuse(Reason.FP16_OVERFLOW, str(exc))
        return False


_OVERFLOW_REFUSED = _OverflowRefused()


def overflow_refused() -> _OverflowRefused:
    """Turn `FoldOverflowError` from the rounding into a refusal with the `overflow` code."""
    return _OVERFLOW_REFUSED
