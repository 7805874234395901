"""Per-op fold plans: what folding an affine map into one Conv/ConvTranspose/Gemm/MatMul writes.

A plan is computed completely — float64 math, rounding to the layer's dtype, overflow check — before
anything in the graph changes, so a refusal leaves the graph untouched. Each planner returns either a
`LayerPlan` or a `SkipReason` a user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.affine import Affine, FoldOverflowError, round_to_dtype
from bnfold.onnx.chain import display
from bnfold.onnx.constants import ConstantResolver
from bnfold.report import Reason, SkipReason

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONSUMERS = ("Conv", "Gemm", "MatMul")


@dataclass
class LayerPlan:
    """New values for some of a node's inputs (by index), new attributes, and an optional bias Add."""

    node: gs.Node
    params: dict[int, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    bias_after: np.ndarray | None = None  # MatMul has no bias input: an Add follows it
    flushed: int = 0  # values that rounded to subnormal and were flushed to zero


class Planner:
    """Shared helpers: constant lookups and rounding with refusal on overflow."""

    def __init__(self, resolver: ConstantResolver, rank_of: Callable[[gs.Tensor], int | None]) -> None:
        self.resolver = resolver
        self.rank_of = rank_of

    def const(self, node: gs.Node, index: int, label: str) -> np.ndarray | SkipReason | None:
        """The constant at input `index` (None if the optional input is absent)."""
        if index >= len(node.inputs) or (isinstance(node.inputs[index], gs.Variable) and not node.inputs[index].name):
            return None
        r = self.resolver.resolve(node.inputs[index])
        if not r.ok:
            assert r.reason is not None
            return SkipReason(r.reason.code, f"{node.op} '{display(node)}' {label}: {r.reason.message}")
        return r.value

    @staticmethod
    def round_all(plan: LayerPlan, values: dict[int, tuple[np.ndarray, np.dtype, str]]) -> LayerPlan | SkipReason:
        try:
            for index, (vals, dtype, what) in values.items():
                rounded, flushed = round_to_dtype(vals, dtype, f"{what} of '{display(plan.node)}'")
                plan.params[index] = rounded
                plan.flushed += flushed
        except FoldOverflowError as exc:
            return SkipReason(Reason.FP16_OVERFLOW, str(exc))
        return plan

    @staticmethod
    def with_bias_after(plan: LayerPlan, bias: np.ndarray, dtype: np.dtype) -> LayerPlan | SkipReason:
        """MatMul has no bias input: a non-zero folded bias becomes an Add after it."""
        if np.any(bias != 0):
            try:
                plan.bias_after, flushed = round_to_dtype(bias, dtype, f"bias of '{display(plan.node)}'")
            except FoldOverflowError as exc:
                return SkipReason(Reason.FP16_OVERFLOW, str(exc))
            plan.flushed += flushed
        return plan

    @staticmethod
    def fit(affine: Affine, channels: int, node: gs.Node) -> Affine | SkipReason:
        """Broadcast a scalar-like map to `channels`, or refuse when the channel counts differ."""
        n = affine.scale.shape[0]
        if n == channels:
            return affine
        if n == 1:
            return Affine(np.full(channels, affine.scale[0]), np.full(channels, affine.shift[0]), affine.notes)
        return SkipReason(
            Reason.SHAPE_MISMATCH,
            f"{n} BatchNorm channels but {node.op} '{display(node)}' has {channels} channels on that axis",
        )

    # ------------------------------------------------------------------------------------------
    # into the producer
    # ------------------------------------------------------------------------------------------
    def producer(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        return getattr(self, f"_producer_{node.op.lower()}")(node, affine)

    def _weights(self, node: gs.Node, bias_index: int | None) -> tuple[np.ndarray, np.ndarray | None] | SkipReason:
        w = self.const(node, 1, "weight")
        if isinstance(w, SkipReason):
            return w
        if w is None:
            return SkipReason(Reason.NOT_CONSTANT, f"{node.op} '{display(node)}' has no weight input")
        b = self.const(node, bias_index, "bias") if bias_index is not None else None
        if isinstance(b, SkipReason):
            return b
        return w, b

    def _producer_conv(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        wb = self._weights(node, 2)
        if isinstance(wb, SkipReason):
            return wb
        w, b = wb
        a = self.fit(affine, w.shape[0], node)
        if isinstance(a, SkipReason):
            return a
        bias_dtype = b.dtype if b is not None else w.dtype
        try:
            nw, nb, flushed = A.fold_into_conv_rounded(w, b, a, w.dtype, bias_dtype, f"'{display(node)}'")
        except FoldOverflowError as exc:
            return SkipReason(Reason.FP16_OVERFLOW, str(exc))
        return LayerPlan(node, params={1: nw, 2: nb}, flushed=flushed)

    def _producer_convtranspose(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        wb = self._weights(node, 2)
        if isinstance(wb, SkipReason):
            return wb
        w, b = wb
        groups = int(node.attrs.get("group", 1))
        if w.shape[0] % groups:
            return SkipReason(Reason.SHAPE_MISMATCH, f"ConvTranspose '{display(node)}' weight does not split into {groups} groups")
        a = self.fit(affine, groups * w.shape[1], node)
        if isinstance(a, SkipReason):
            return a
        nw, nb = A.fold_into_conv_transpose(w, b, a, groups)
        bias_dtype = b.dtype if b is not None else w.dtype
        return self.round_all(LayerPlan(node), {1: (nw, w.dtype, "weight"), 2: (nb, bias_dtype, "bias")})

    def _producer_gemm(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        wb = self._weights(node, 2)
        if isinstance(wb, SkipReason):
            return wb
        bm, c = wb
        if bm.ndim != 2:
            return SkipReason(Reason.SHAPE_MISMATCH, f"Gemm '{display(node)}' B is not a matrix")
        trans_b = bool(int(node.attrs.get("transB", 0)))
        beta = float(node.attrs.get("beta", 1.0))
        n = bm.shape[0] if trans_b else bm.shape[1]
        a = self.fit(affine, n, node)
        if isinstance(a, SkipReason):
            return a
        nb, nc, new_beta = A.fold_into_gemm(bm, c, a, trans_b=trans_b, beta=beta)
        plan = LayerPlan(node)
        if new_beta != beta:
            plan.attrs["beta"] = new_beta
        c_dtype = c.dtype if c is not None else bm.dtype
        return self.round_all(plan, {1: (nb, bm.dtype, "B"), 2: (nc, c_dtype, "C")})

    def _producer_matmul(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        bm = self.const(node, 1, "weight")
        if isinstance(bm, SkipReason):
            return bm
        if bm is None or bm.ndim != 2:
            return SkipReason(
                Reason.SHAPE_MISMATCH, f"MatMul '{display(node)}' weight is not a constant rank-2 [K, N] matrix"
            )
        rank = self.rank_of(node.outputs[0])
        if rank != 2:
            what = "unknown" if rank is None else str(rank)
            return SkipReason(
                Reason.SHAPE_MISMATCH,
                f"MatMul '{display(node)}' output rank is {what}; BatchNorm's channel axis 1 is the MatMul's "
                "feature axis only for rank-2 outputs",
            )
        a = self.fit(affine, bm.shape[1], node)
        if isinstance(a, SkipReason):
            return a
        nb, bias = A.fold_into_matmul(bm, None, a)
        plan = self.round_all(LayerPlan(node), {1: (nb, bm.dtype, "weight")})
        if isinstance(plan, SkipReason):
            return plan
        return self.with_bias_after(plan, bias, bm.dtype)

    # ------------------------------------------------------------------------------------------
    # into the consumer
    # ------------------------------------------------------------------------------------------
    def consumer(self, node: gs.Node, affine: Affine, repeat: int = 1) -> LayerPlan | SkipReason:
        """`repeat`: each channel spans this many consecutive features (a Flatten of [N, C, H, W])."""
        if repeat > 1:
            affine = Affine(np.repeat(affine.scale, repeat), np.repeat(affine.shift, repeat), affine.notes)
        return getattr(self, f"_consumer_{node.op.lower()}")(node, affine)

    def _consumer_conv(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        pads = [int(p) for p in node.attrs.get("pads", [])]
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            what = f"pads={pads}" if any(pads) else f"auto_pad={auto_pad}"
            return SkipReason(
                Reason.PADDING,
                f"Conv '{display(node)}' pads its input ({what}); the padded zeros would not pass through the BatchNorm",
            )
        wb = self._weights(node, 2)
        if isinstance(wb, SkipReason):
            return wb
        w, b = wb
        groups = int(node.attrs.get("group", 1))
        a = self.fit(affine, groups * w.shape[1], node)
        if isinstance(a, SkipReason):
            return a
        nw, nb = A.fold_into_conv_input(w, b, a, groups)
        bias_dtype = b.dtype if b is not None else w.dtype
        return self.round_all(LayerPlan(node), {1: (nw, w.dtype, "weight"), 2: (nb, bias_dtype, "bias")})

    def _consumer_gemm(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        if int(node.attrs.get("transA", 0)):
            return SkipReason(
                Reason.SHAPE_MISMATCH,
                f"Gemm '{display(node)}' has transA=1: the BatchNorm channels become its rows, not its inputs",
            )
        wb = self._weights(node, 2)
        if isinstance(wb, SkipReason):
            return wb
        bm, c = wb
        trans_b = bool(int(node.attrs.get("transB", 0)))
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        k = bm.shape[1] if trans_b else bm.shape[0]
        a = self.fit(affine, k, node)
        if isinstance(a, SkipReason):
            return a
        nb, nc, new_beta = A.fold_into_gemm_input(bm, c, a, trans_b=trans_b, alpha=alpha, beta=beta)
        plan = LayerPlan(node)
        if new_beta != beta:
            plan.attrs["beta"] = new_beta
        c_dtype = c.dtype if c is not None else bm.dtype
        return self.round_all(plan, {1: (nb, bm.dtype, "B"), 2: (nc, c_dtype, "C")})

    def _consumer_matmul(self, node: gs.Node, affine: Affine) -> LayerPlan | SkipReason:
        bm = self.const(node, 1, "weight")
        if isinstance(bm, SkipReason):
            return bm
        if bm is None or bm.ndim != 2 or self.rank_of(node.inputs[0]) != 2:
            return SkipReason(
                Reason.SHAPE_MISMATCH, f"MatMul '{display(node)}' is not a rank-2 input times a constant [K, N] matrix"
            )
        a = self.fit(affine, bm.shape[0], node)
        if isinstance(a, SkipReason):
            return a
        nb, bias = A.fold_into_matmul_input(bm, None, a)
        plan = self.round_all(LayerPlan(node), {1: (nb, bm.dtype, "weight")})
        if isinstance(plan, SkipReason):
            return plan
        return self.with_bias_after(plan, bias, bm.dtype)
