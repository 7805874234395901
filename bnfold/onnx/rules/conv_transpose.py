"""ConvTranspose → affine chain (into the producer).

The weight is ``[C_in, C_out/g, k…]``: output channel ``j·(C_out/g) + k`` is column k of group j. Viewed
as ``[g, C_in/g, C_out/g, k…]`` the fold scales axis 2 by ``s`` viewed as ``[g, C_out/g]``;
``b' = s·b + t``. (Several tools scale axis 1 of the unreshaped weight, wrong for g > 1.)
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.affine import Affine
from bnfold.onnx.chain import display
from bnfold.onnx.rules.base import IntoProducer, LayerPlan, PlanContext, fit, refuse, rounded, weights
from bnfold.report import Reason


class ConvTransposeIntoProducer(IntoProducer):
    name = "conv-transpose"
    ops = ("ConvTranspose",)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        w, b = weights(node, ctx)
        groups = int(node.attrs.get("group", 1))
        if w.shape[0] % groups:
            refuse(Reason.SHAPE_MISMATCH, f"ConvTranspose '{display(node)}' weight does not split into {groups} groups")
        a = fit(affine, groups * w.shape[1], node)
        nw, nb = A.fold_into_conv_transpose(w, b, a, groups)
        bias_dtype = b.dtype if b is not None else w.dtype
        return rounded(LayerPlan(node), {1: (nw, w.dtype, "weight"), 2: (nb, bias_dtype, "bias")})


RULES = (ConvTransposeIntoProducer(),)
