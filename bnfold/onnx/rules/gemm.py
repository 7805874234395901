"""Gemm ⇄ affine chain, both directions.

``Y = α·A'·B' + β·C``. Into the producer: scale B's output columns (axis 0 of B when ``transB``, else
axis 1); the bias lives in C *times β*, so ``C' = s·C + t/β``, or ``C' = t`` with ``β' = 1`` when C is
absent or β = 0. C may be scalar, ``[N]``, ``[1, N]``, ``[M, 1]`` or ``[M, N]``.

From the consumer (``transA = 0`` only: with transA the chain's channels are A's rows):
``B'' = diag(s)·B'`` and the bias gains ``α·(tᵀ·B')/β``. A Gemm never pads, so this is always exact.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.affine import Affine
from bnfold.onnx.chain import display
from bnfold.onnx.rules.base import IntoConsumer, IntoProducer, LayerPlan, PlanContext, fit, refuse, rounded, weights
from bnfold.report import Reason


class GemmIntoProducer(IntoProducer):
    name = "gemm"
    ops = ("Gemm",)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        bm, c = weights(node, ctx)
        if bm.ndim != 2:
            refuse(Reason.SHAPE_MISMATCH, f"Gemm '{display(node)}' B is not a matrix")
        trans_b = bool(int(node.attrs.get("transB", 0)))
        beta = float(node.attrs.get("beta", 1.0))
        a = fit(affine, bm.shape[0] if trans_b else bm.shape[1], node)
        nb, nc, new_beta = A.fold_into_gemm(bm, c, a, trans_b=trans_b, beta=beta)
        return _gemm_plan(node, bm, c, nb, nc, beta, new_beta)


class GemmFromConsumer(IntoConsumer):
    name = "gemm"
    ops = ("Gemm",)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        if int(node.attrs.get("transA", 0)):
            refuse(
                Reason.SHAPE_MISMATCH,
                f"Gemm '{display(node)}' has transA=1: the BatchNorm channels become its rows, not its inputs",
            )
        bm, c = weights(node, ctx)
        trans_b = bool(int(node.attrs.get("transB", 0)))
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        a = fit(affine, bm.shape[1] if trans_b else bm.shape[0], node)
        nb, nc, new_beta = A.fold_into_gemm_input(bm, c, a, trans_b=trans_b, alpha=alpha, beta=beta)
        return _gemm_plan(node, bm, c, nb, nc, beta, new_beta)


def _gemm_plan(node: gs.Node, bm, c, nb, nc, beta: float, new_beta: float) -> LayerPlan:
    """B and C rounded to their stored dtypes (C takes B's when the Gemm had none); β only if it changed."""
    plan = LayerPlan(node)
    if new_beta != beta:
        plan.attrs["beta"] = new_beta
    c_dtype = c.dtype if c is not None else bm.dtype
    return rounded(plan, {1: (nb, bm.dtype, "B"), 2: (nc, c_dtype, "C")})


RULES = (GemmIntoProducer(), GemmFromConsumer())
