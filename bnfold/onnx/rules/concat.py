"""Concat of several layers → affine chain: each channel slice folds into its own producer.

MixNet-style grouped kernels (``Split → Conv_k3, Conv_k5 → Concat(axis=1) → BatchNorm``). Concat along
the channel axis 1 puts input ``i``'s ``C_i`` channels at ``o_i … o_i + C_i − 1`` of its output, with
``o_i = C_0 + … + C_{i−1}``. The chain ``y = s·x + t`` is per channel, so on input i's slice it is the
map ``(s[o_i : o_i+C_i], t[o_i : o_i+C_i])`` applied to that input alone, and Concat commutes with it:

    s·concat(x_0, …, x_n) + t  =  concat(s_0·x_0 + t_0, …, s_n·x_n + t_n)

Each ``s_i·x_i + t_i`` then folds into x_i's producer exactly as a plain producer fold does (the per-op
math of `conv.py`, `conv_transpose.py`, `gemm.py`, `matmul.py`, called through their ``values``), and the
Concat stays, taking the chain's output tensor so its name survives.

Exact only when nothing else sees the producers' unfolded outputs or the Concat's: each input tensor is
read by the Concat alone, once (the same tensor twice would need two different slices from one layer),
is not a graph output, and comes from a foldable layer; the Concat's output feeds the chain only.
The channel axis must be 1 (a negative axis is normalised against a known rank), and the static
channel counts of the inputs must add up to the chain's channel count. Everything is planned before
anything is written: one refusal leaves every producer as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from bnfold.affine import Affine
from bnfold.onnx.chain import display
from bnfold.onnx.fold import GraphEdit
from bnfold.onnx.rules.base import (
    INTO_PRODUCER,
    Chain,
    Fold,
    IntoProducer,
    PlanContext,
    Refusal,
    Rule,
    Site,
    is_standard,
    refuse,
    refuse_shared_output,
)
from bnfold.onnx.rules.conv import ConvIntoProducer
from bnfold.onnx.rules.conv_transpose import ConvTransposeIntoProducer
from bnfold.onnx.rules.gemm import GemmIntoProducer
from bnfold.onnx.rules.matmul import MatMulIntoProducer
from bnfold.report import Reason

PRODUCERS: dict[str, IntoProducer] = {
    rule.ops[0]: rule
    for rule in (ConvIntoProducer(), ConvTransposeIntoProducer(), GemmIntoProducer(), MatMulIntoProducer())
}
LAYERS = "/".join(PRODUCERS)


@dataclass
class ConcatSite(Site):
    """The Concat and, in input order, the layer producing each of its inputs (`target` is the first)."""

    concat: gs.Node | None = None
    producers: list[gs.Node] = field(default_factory=list)

    def names(self) -> tuple[str, str]:
        ops = "/".join(dict.fromkeys(p.op for p in self.producers))
        return ops, " + ".join(display(p) for p in self.producers)


class ConcatIntoProducers(Rule):
    name = "concat"
    direction = INTO_PRODUCER
    priority = 150  # after the plain producer rules (a Concat is none of theirs), before the consumer side

    def match(self, chain: Chain, ctx: PlanContext) -> ConcatSite | None:
        if not chain.x.inputs:
            return None
        concat = chain.x.inputs[0]
        if concat.op != "Concat" or not is_standard(concat):
            return None
        refuse_shared_output(chain, concat, ctx)
        where = f"Concat '{display(concat)}'"
        axis = int(concat.attrs.get("axis", 1))
        if axis < 0:
            rank = ctx.rank_of(chain.x)
            if rank is None:
                refuse(Reason.SHAPE_MISMATCH, f"{where} joins along axis {axis} of a tensor of unknown rank: not provably the channel axis 1")
            axis += rank
        if axis != 1:
            refuse(Reason.SHAPE_MISMATCH, f"{where} joins along axis {axis}, not the BatchNorm's channel axis 1")
        inputs: list[gs.Tensor] = list(concat.inputs)
        for i, t in enumerate(inputs):
            again = [j for j, u in enumerate(inputs) if u is t and j != i]
            if again:
                refuse(
                    Reason.OTHER_CONSUMER,
                    f"{where} reads '{t.name}' twice (inputs {i} and {again[0]}): one layer cannot take two different slices of the BatchNorm",
                )
            if ctx.is_output(t):
                refuse(Reason.GRAPH_OUTPUT, f"{where} input {i} '{t.name}' is also a graph output")
            others = [n for n in t.outputs if n is not concat]
            if others:
                names = ", ".join(f"{n.op} '{display(n)}'" for n in others[:4])
                refuse(Reason.OTHER_CONSUMER, f"{where} input {i} '{t.name}' also feeds {names}")
        producers = []
        for i, t in enumerate(inputs):
            producer = t.inputs[0] if t.inputs else None
            if producer is None or producer.op not in PRODUCERS or not is_standard(producer):
                what = "a graph input" if producer is None else f"from {producer.op} '{display(producer)}'"
                refuse(
                    Reason.NO_LINEAR_NEIGHBOUR,
                    f"{where} input {i} '{t.name}' is {what}, not a {LAYERS} layer: a BatchNorm folds through a "
                    "Concat only when every input comes from one",
                )
            if len(producer.outputs) != 1:
                refuse(Reason.UNSUPPORTED, f"{producer.op} '{display(producer)}' has several outputs")
            producers.append(producer)
        return ConcatSite(producers[0], concat=concat, producers=producers)

    def plan(self, chain: Chain, site: Site, ctx: PlanContext) -> Fold:
        assert isinstance(site, ConcatSite) and site.concat is not None
        counts = [channels(p, t, i, site.concat, ctx) for i, (p, t) in enumerate(zip(site.producers, site.concat.inputs))]
        total, n = sum(counts), chain.affine.channels
        if n not in (1, total):
            refuse(
                Reason.SHAPE_MISMATCH,
                f"{n} BatchNorm channels but Concat '{display(site.concat)}' joins {total} ({' + '.join(map(str, counts))})",
            )
        parts = channel_slices(chain.affine, counts)
        return Fold(self, chain, site, [PRODUCERS[p.op].values(p, a, ctx) for p, a in zip(site.producers, parts)])

    def worthwhile(self, fold: Fold) -> bool:
        """A chain of bias Adds alone, spread over MatMul branches, would come back as as many Adds or more."""
        added = sum(layer.bias_after is not None for layer in fold.layers)
        return bool(fold.chain.batchnorms) or added < len(fold.chain.steps)

    def apply(self, fold: Fold, edit: GraphEdit) -> None:
        site, chain = fold.site, fold.chain
        assert isinstance(site, ConcatSite) and site.concat is not None
        for layer in fold.layers:
            edit.write_params(layer.node, layer.params, layer.attrs)
            edit.add_bias_after(layer.node, layer.bias_after)
        chain.steps[-1].node.outputs.clear()
        site.concat.outputs = [chain.y]
        edit.remove_dead(chain.nodes)


def channel_slices(affine: Affine, counts: list[int]) -> list[Affine]:
    """The map on each input of the Concat: channels ``o_i … o_i + C_i − 1`` (a scalar map goes whole)."""
    if affine.channels == 1:
        return [affine] * len(counts)
    parts, offset = [], 0
    for c in counts:
        parts.append(Affine(affine.scale[offset : offset + c], affine.shift[offset : offset + c]))
        offset += c
    return parts


def channels(producer: gs.Node, tensor: gs.Tensor, index: int, concat: gs.Node, ctx: PlanContext) -> int:
    """Input `index`'s channel count: its static shape's axis 1, else what the layer's weight says."""
    shape = ctx.static_shape(tensor)
    if shape is not None and len(shape) > 1 and shape[1] is not None:
        return shape[1]
    try:
        w = ctx.const(producer, 1, "weight")
    except Refusal as exc:
        refuse(
            exc.reason.code,
            f"Concat '{display(concat)}' input {index} '{tensor.name}' has no static channel count, so the "
            f"BatchNorm's channels cannot be split between the inputs ({exc.reason.message})",
        )
    if w is None or w.ndim < 2:
        refuse(Reason.SHAPE_MISMATCH, f"{producer.op} '{display(producer)}' has no weight that gives its channel count")
    if producer.op == "Conv":
        return int(w.shape[0])
    if producer.op == "ConvTranspose":
        return int(producer.attrs.get("group", 1)) * int(w.shape[1])
    if producer.op == "Gemm" and int(producer.attrs.get("transB", 0)):
        return int(w.shape[0])
    return int(w.shape[1])  # Gemm [K, N], MatMul [K, N]


RULES = (ConcatIntoProducers(),)
