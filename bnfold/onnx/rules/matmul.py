"""MatMul ⇄ affine chain, both directions, with the bias Add it needs.

MatMul ``X[M, K] · B[K, N]`` with a constant rank-2 B. Into the producer: the chain's channel axis 1 is
the MatMul's feature axis only for rank-2 outputs; ``B' = B·diag(s)``, bias ``t``. From the consumer
(rank-2 input): ``B' = diag(s)·B``, bias ``tᵀ·B``. MatMul has no bias input, so a non-zero bias
becomes an ``Add`` after it; a per-channel ``Add`` already there is simply part of the chain (chain.py),
which is how an exported ``Linear`` (MatMul → Add(bias) → BatchNorm) folds as one.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.affine import Affine
from bnfold.onnx.chain import display
from bnfold.onnx.rules.base import (
    Fold,
    IntoConsumer,
    IntoProducer,
    LayerPlan,
    PlanContext,
    fit,
    refuse,
    rounded,
    with_bias_after,
)
from bnfold.report import Reason


class MatMulIntoProducer(IntoProducer):
    name = "matmul"
    ops = ("MatMul",)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        bm = ctx.const(node, 1, "weight")
        if bm is None or bm.ndim != 2:
            refuse(Reason.SHAPE_MISMATCH, f"MatMul '{display(node)}' weight is not a constant rank-2 [K, N] matrix")
        rank = ctx.rank_of(node.outputs[0])
        if rank != 2:
            what = "unknown" if rank is None else str(rank)
            refuse(
                Reason.SHAPE_MISMATCH,
                f"MatMul '{display(node)}' output rank is {what}; BatchNorm's channel axis 1 is the MatMul's "
                "feature axis only for rank-2 outputs",
            )
        nb, bias = A.fold_into_matmul(bm, None, fit(affine, bm.shape[1], node))
        return with_bias_after(rounded(LayerPlan(node), {1: (nb, bm.dtype, "weight")}), bias, bm.dtype)

    def worthwhile(self, fold: Fold) -> bool:
        """MatMul → Add(bias) with no BatchNorm: folding would only replace the Add with an Add."""
        steps = fold.chain.steps
        pointless = fold.layers[0].bias_after is not None and len(steps) == 1 and steps[0].node.op == "Add"
        return not pointless


class MatMulFromConsumer(IntoConsumer):
    name = "matmul"
    ops = ("MatMul",)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        bm = ctx.const(node, 1, "weight")
        if bm is None or bm.ndim != 2 or ctx.rank_of(node.inputs[0]) != 2:
            refuse(Reason.SHAPE_MISMATCH, f"MatMul '{display(node)}' is not a rank-2 input times a constant [K, N] matrix")
        nb, bias = A.fold_into_matmul_input(bm, None, fit(affine, bm.shape[0], node))
        return with_bias_after(rounded(LayerPlan(node), {1: (nb, bm.dtype, "weight")}), bias, bm.dtype)


RULES = (MatMulIntoProducer(), MatMulFromConsumer())
