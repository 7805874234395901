"""Affine chain → Flatten/Reshape → Gemm/MatMul (a classifier head), into the consumer.

A Flatten (axis 1) or a Reshape to ``[N, C·Πd]`` of ``[N, C, d…]`` turns channel c into the ``Πd``
consecutive features ``c·Πd … (c+1)·Πd − 1``, so the chain is the same map on the flat tensor with
``s`` and ``t`` each repeated ``Πd`` times; from there it folds into the head like any consumer fold
(`gemm.py`, `matmul.py`, `conv.py`), and the Flatten/Reshape reads the chain's input instead.
The reshape target must provably be ``[N, C·Πd]``: static trailing dims, a constant target shape.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bnfold.affine import Affine
from bnfold.onnx.rules.base import (
    Chain,
    IntoConsumer,
    LayerPlan,
    PlanContext,
    Refusal,
    Site,
    is_standard,
    reads_once_as_data,
    sole_consumer,
)
from bnfold.onnx.rules.conv import ConvFromConsumer
from bnfold.onnx.rules.gemm import GemmFromConsumer
from bnfold.onnx.rules.matmul import MatMulFromConsumer

HEADS: dict[str, IntoConsumer] = {rule.ops[0]: rule for rule in (ConvFromConsumer(), GemmFromConsumer(), MatMulFromConsumer())}


class FlattenHead(IntoConsumer):
    name = "flatten-head"
    ops = ("Flatten", "Reshape")
    priority = 210

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        flatten = sole_consumer(chain.y, self.ops, ctx)
        if flatten is None:
            return None
        repeat = flatten_repeat(flatten, chain.y, ctx)
        if repeat is None:
            return None
        flat = flatten.outputs[0]
        if len(flat.outputs) != 1 or ctx.is_output(flat):
            return None
        head = flat.outputs[0]
        if head.op not in HEADS or not is_standard(head) or not reads_once_as_data(head, flat):
            return None
        return Site(head, through=flatten, repeat=repeat)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        return HEADS[node.op].values(node, affine, ctx)


def flatten_repeat(node: gs.Node, y: gs.Tensor, ctx: PlanContext) -> int | None:
    """How many features each channel becomes when `node` flattens [N, C, d…] to [N, C·Πd]; None if not provable."""
    shape = ctx.static_shape(y)
    if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    per_channel = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    features = shape[1] * per_channel
    if node.op == "Flatten":
        return per_channel if int(node.attrs.get("axis", 1)) == 1 else None
    try:
        target = ctx.const(node, 1, "shape")
    except Refusal:  # a computed target shape: not provably [N, C·Πd]
        return None
    if target is None:
        return None
    t = [int(v) for v in np.asarray(target).reshape(-1)]
    if len(t) != 2 or int(node.attrs.get("allowzero", 0)):
        return None
    first_ok = t[0] in (0, -1) or (shape[0] is not None and t[0] == shape[0])
    if first_ok and t[1] in (-1, features) and not (t[0] == -1 and t[1] == -1):
        return per_channel
    return None


RULES = (FlattenHead(),)
