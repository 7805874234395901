"""Conv ⇄ affine chain, both directions.

Into the producer (Conv → chain): the weight ``[C_out, C_in/g, k…]`` has its output channel on axis 0
whatever the groups, so ``W' = s ⊙₀ W`` and ``b' = s·b + t`` (b = 0 where the Conv has no bias).

From the consumer (chain → Conv): input channel ``c`` of group ``j`` is column ``c − j·C_in/g`` of
the weights of group j's outputs, so ``W'[o, i] = W[o, i]·s[c]`` and ``b'[o] = b[o] + Σ_{i,k} W[o, i, k]·t[c]``.
Exact only when the Conv adds no padding: padded zeros would reach it without passing the chain.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.affine import Affine
from bnfold.onnx.chain import display
from bnfold.onnx.rules.base import (
    IntoConsumer,
    IntoProducer,
    LayerPlan,
    PlanContext,
    fit,
    overflow_refused,
    refuse,
    rounded,
    weights,
)
from bnfold.report import Reason


class ConvIntoProducer(IntoProducer):
    name = "conv"
    ops = ("Conv",)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        w, b = weights(node, ctx)
        a = fit(affine, w.shape[0], node)
        bias_dtype = b.dtype if b is not None else w.dtype
        with overflow_refused():  # blocked float64 fold, rounded once per block (the weights can be large)
            nw, nb, flushed = A.fold_into_conv_rounded(w, b, a, w.dtype, bias_dtype, f"'{display(node)}'", dry_run=ctx.dry_run)
        return LayerPlan(node, params={1: nw, 2: nb}, flushed=flushed)


class ConvFromConsumer(IntoConsumer):
    name = "conv"
    ops = ("Conv",)

    def values(self, node: gs.Node, affine: Affine, ctx: PlanContext) -> LayerPlan:
        refuse_padding(node)
        w, b = weights(node, ctx)
        groups = int(node.attrs.get("group", 1))
        a = fit(affine, groups * w.shape[1], node)
        nw, nb = A.fold_into_conv_input(w, b, a, groups)
        bias_dtype = b.dtype if b is not None else w.dtype
        return rounded(LayerPlan(node), {1: (nw, w.dtype, "weight"), 2: (nb, bias_dtype, "bias")})


def refuse_padding(node: gs.Node) -> None:
    """A padded Conv sees raw zeros at the border, not the chain's shift ``t``: no exact fold."""
    pads = [int(p) for p in node.attrs.get("pads", [])]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        what = f"pads={pads}" if any(pads) else f"auto_pad={auto_pad}"
        refuse(
            Reason.PADDING,
            f"Conv '{display(node)}' pads its input ({what}); the padded zeros would not pass through the BatchNorm",
        )


RULES = (ConvIntoProducer(), ConvFromConsumer())
