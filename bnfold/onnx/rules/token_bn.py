"""MatMul/Gemm (→ Add bias) → Reshape/Flatten → affine chain: a BatchNorm over tokens, into the producer.

Transformer blocks with a BatchNorm1d over tokens (LeViT and the like) compute ``z = X·W (+ b)`` of
shape ``[N, L, C]``, flatten it to ``[N·L, C]``, normalise and reshape back. Row-major, a reshape whose
output is ``[M, C]`` with ``C`` the input's last dimension maps element ``(m, c)`` to flat index
``m·C + c``, and the input's element ``(…, c)`` has a flat index ≡ c (mod C): column c of the flat tensor
is exactly feature c of ``z``. So the chain ``y = s·x + t`` on axis 1 of the flat tensor is the same map
on the *last* axis of ``z``, and it folds into the layer's output columns like a rank-2 fold::

    s ⊙_col (X·W + b) + t  =  X·(W·diag(s)) + (s·b + t)

* MatMul with a constant ``W[K, C]``: ``W' = W·diag(s)``; the bias Add (a constant that is per-feature on
  the last axis, either operand order) becomes ``b' = s·b + t``; without one, an Add of ``t`` follows
  the MatMul (`GraphEdit.add_bias_after`), still before the Reshape.
* Gemm (rank-2 output ``[M, N]``): the usual Gemm fold (`gemm.py`), ``C' = s·C + t/β``.

The Reshape/Flatten then produces the chain's output tensor; the reshape back, if any, is untouched.

Preconditions, each refused with its reason when the pattern is there but cannot be proved:
the weight is a constant rank-2 matrix (``shape-mismatch`` / ``not-constant``); the layer's output, the
bias Add's output and the flat tensor each feed only the next node of the pattern — readers of the shape
alone (``Shape``, ``Size``, as TorchScript's ``reshape_as`` adds) do not see values and are allowed — and
none is a graph output (``other-consumer`` / ``graph-output``); the Reshape/Flatten provably gives
``[M, C]``: Flatten with ``axis = rank − 1``, or a constant target ``[a, b]`` whose second output
dimension is C (``b = C``; ``b = −1`` with the total size static; ``b = 0`` copying a static dimension
when ``allowzero = 0``) — anything else, such as a target that merges the feature axis, is
``shape-mismatch``.

A target computed at run time (dynamo with a dynamic batch: ``Concat(Mul(Shape(x)…), [C])``) is proved
by the chain instead, when the target's length is statically 2 and the chain has exactly C channels
(BatchNorm parameters of length C): the output is then rank 2, and BatchNormalization requires its
axis 1 to be as long as its parameters, so wherever the original model runs that axis is C. Otherwise
``not-constant``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.onnx.chain import display
from bnfold.onnx.fold import GraphEdit
from bnfold.onnx.rules.base import (
    INTO_PRODUCER,
    Chain,
    Fold,
    LayerPlan,
    PlanContext,
    Rule,
    Site,
    fit,
    is_standard,
    refuse,
    rounded,
    with_bias_after,
)
from bnfold.onnx.rules.gemm import GemmIntoProducer
from bnfold.report import Reason

SHAPE_ONLY = ("Shape", "Size")
"""Readers of a tensor's shape alone: the fold changes values, never shapes, so they may stay."""


@dataclass
class TokenSite(Site):
    """`target` (MatMul/Gemm) → `bias_add` (optional, its constant at input `bias_index`) → `reshape` → chain."""

    reshape: gs.Node | None = None
    bias_add: gs.Node | None = None
    bias_index: int = 1


class TokenBatchNorm(Rule):
    name = "token-bn"
    direction = INTO_PRODUCER
    priority = 120

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        flat = chain.x
        if not flat.inputs:
            return None
        reshape = flat.inputs[0]
        if reshape.op not in ("Reshape", "Flatten") or not is_standard(reshape) or not reshape.inputs:
            return None
        z = reshape.inputs[0]
        if not z.inputs:
            return None
        layer, bias_add, bias_index = z.inputs[0], None, 1
        if layer.op == "Add" and is_standard(layer) and len(layer.inputs) == 2:
            bias_index = _constant_operand(layer, ctx)
            if bias_index is None:
                return None
            bias_add, mm_out = layer, layer.inputs[1 - bias_index]
            if not mm_out.inputs or mm_out.inputs[0].op != "MatMul":
                return None
            layer = mm_out.inputs[0]
        if layer.op not in ("MatMul", "Gemm") or not is_standard(layer) or len(layer.outputs) != 1:
            return None
        if layer.op == "Gemm" and bias_add is not None:
            return None  # a Gemm has its own bias input; Gemm → Add is not an exporter's pattern
        if layer.op == "MatMul" and (
            len(layer.inputs) != 2 or layer.inputs[0] is layer.inputs[1] or ctx.resolver.resolve(layer.inputs[0]).ok
        ):
            return None  # W·X multiplies from the left: its features are not z's last axis
        # the pattern is there: from here on, what stops it is a refusal
        path = [layer] + ([bias_add] if bias_add is not None else []) + [reshape]
        for node, reader in zip(path, path[1:]):
            _refuse_other_readers(node, reader, ctx)
        _refuse_other_readers(reshape, chain.steps[0].node, ctx)
        if any(t is z for t in reshape.inputs[1:]):
            refuse(Reason.UNSUPPORTED, f"{reshape.op} '{display(reshape)}' reads '{z.name}' as its shape too")
        return TokenSite(layer, reshape=reshape, bias_add=bias_add, bias_index=bias_index)

    def plan(self, chain: Chain, site: Site, ctx: PlanContext) -> Fold:
        assert isinstance(site, TokenSite) and site.reshape is not None
        layer = site.target
        if layer.op == "Gemm":
            bm = ctx.const(layer, 1, "B")
            if bm is None or bm.ndim != 2:
                refuse(Reason.SHAPE_MISMATCH, f"Gemm '{display(layer)}' B is not a constant matrix")
            c = bm.shape[0] if int(layer.attrs.get("transB", 0)) else bm.shape[1]
            _prove_features_on_axis_1(site.reshape, c, chain.affine.channels, ctx)
            return Fold(self, chain, site, [GemmIntoProducer().values(layer, chain.affine, ctx)])
        w = ctx.const(layer, 1, "weight")
        if w is None or w.ndim != 2:
            refuse(Reason.SHAPE_MISMATCH, f"MatMul '{display(layer)}' weight is not a constant rank-2 [K, C] matrix")
        c = w.shape[1]
        _prove_features_on_axis_1(site.reshape, c, chain.affine.channels, ctx)
        a = fit(chain.affine, c, layer)
        if site.bias_add is None:
            nw, bias = A.fold_into_matmul(w, None, a)
            plan = rounded(LayerPlan(layer), {1: (nw, w.dtype, "weight")})
            return Fold(self, chain, site, [with_bias_after(plan, bias, w.dtype)])
        b = ctx.const(site.bias_add, site.bias_index, "bias")
        assert b is not None  # match found it constant
        vec = _per_feature(np.asarray(b), c)
        if vec is None:
            refuse(
                Reason.SHAPE_MISMATCH,
                f"Add '{display(site.bias_add)}' adds a constant of shape {list(np.shape(b))}, not one bias per "
                f"feature of the last axis ({c})",
            )
        nw, nb = A.fold_into_matmul(w, vec, a)
        new_shape = (1,) * (np.ndim(b) - 1) + (c,)  # b's rank kept: it broadcasts as before
        return Fold(
            self,
            chain,
            site,
            [
                rounded(LayerPlan(layer), {1: (nw, w.dtype, "weight")}),
                rounded(LayerPlan(site.bias_add), {site.bias_index: (nb.reshape(new_shape), b.dtype, "bias")}),
            ],
        )

    def apply(self, fold: Fold, edit: GraphEdit) -> None:
        site, chain = fold.site, fold.chain
        assert isinstance(site, TokenSite) and site.reshape is not None
        for layer in fold.layers:
            edit.write_params(layer.node, layer.params, layer.attrs)
        chain.steps[-1].node.outputs.clear()
        site.reshape.outputs = [chain.y]  # graph-output names survive; the reshape back reads it as before
        edit.add_bias_after(fold.layers[0].node, fold.layers[0].bias_after)
        edit.remove_dead(chain.nodes)


def _constant_operand(add: gs.Node, ctx: PlanContext) -> int | None:
    """The index of the Add's one constant operand (the bias), or None when not exactly one is constant."""
    const = [ctx.resolver.resolve(t).ok for t in add.inputs]
    if const.count(True) != 1:
        return None
    return const.index(True)


def _refuse_other_readers(node: gs.Node, reader: gs.Node, ctx: PlanContext) -> None:
    """`node`'s output must reach only `reader` (shape-only readers aside) and not be a graph output."""
    out = node.outputs[0]
    if ctx.is_output(out):
        refuse(Reason.GRAPH_OUTPUT, f"{node.op} '{display(node)}' output '{out.name}' is also a graph output")
    others = [n for n in out.outputs if n is not reader and not (n.op in SHAPE_ONLY and is_standard(n))]
    if others:
        names = ", ".join(f"{n.op} '{display(n)}'" for n in others[:4])
        refuse(Reason.OTHER_CONSUMER, f"{node.op} '{display(node)}' output '{out.name}' also feeds {names}")


def _per_feature(b: np.ndarray, c: int) -> np.ndarray | None:
    """The bias as a vector over the last axis (length c), or None when it varies along another axis."""
    if b.ndim == 0:
        return np.full(c, b.item(), dtype=b.dtype)
    if any(d != 1 for d in b.shape[:-1]) or b.shape[-1] not in (1, c):
        return None
    return np.broadcast_to(b.reshape(-1), (c,))


def _prove_features_on_axis_1(node: gs.Node, c: int, channels: int, ctx: PlanContext) -> None:
    """Refuse unless `node` (Reshape/Flatten) provably turns [..., c] into [M, c] (the last axis kept as axis 1).

    ``channels``: how many channels the chain after it has (its BatchNorm's parameter length).
    """
    z = node.inputs[0]
    shape = ctx.static_shape(z)
    rank = ctx.rank_of(z)
    what = f"{node.op} '{display(node)}'"
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        if rank is None:
            refuse(
                Reason.SHAPE_MISMATCH, f"{what}: the rank of '{z.name}' is unknown, so axis={axis} is not provably its last"
            )
        if axis < 0:
            axis += rank
        if axis != rank - 1:
            refuse(
                Reason.SHAPE_MISMATCH,
                f"{what} with axis={axis} of a rank-{rank} tensor does not keep the last axis ({c} features) as "
                f"axis 1 (that needs axis={rank - 1})",
            )
        return
    if len(node.inputs) > 1 and not ctx.resolver.resolve(node.inputs[1]).ok:
        if ctx.static_shape(node.inputs[1]) == [2] and channels == c:
            return  # rank 2, and the BatchNorm itself requires axis 1 to be c long (see the module docstring)
    target = ctx.const(node, 1, "shape")
    t = [int(v) for v in np.asarray(target).reshape(-1)] if target is not None else []
    if len(t) != 2:
        refuse(Reason.SHAPE_MISMATCH, f"{what} to {t} does not give a rank-2 [M, {c}] tensor")
    allowzero = int(node.attrs.get("allowzero", 0))
    full = shape if shape is not None and all(d is not None for d in shape) else None
    total = int(np.prod(full)) if full is not None else None

    def copied(i: int) -> int | None:  # a 0 in the target copies the input's dimension i (allowzero = 0)
        if allowzero:
            return 0
        return shape[i] if shape is not None and i < len(shape) else None

    t0, t1 = t
    out1: int | None
    if t1 > 0:
        out1 = t1
    elif t1 == 0:
        out1 = copied(1)
    elif t1 == -1:
        first = t0 if t0 > 0 else copied(0) if t0 == 0 else None
        out1 = total // first if total is not None and first and total % first == 0 else None
    else:
        out1 = None
    if out1 != c:
        got = "an unknown size" if out1 is None else str(out1)
        refuse(
            Reason.SHAPE_MISMATCH,
            f"{what} to {t} gives axis 1 of {got}, not provably the {c} features of '{z.name}''s last axis",
        )


RULES = (TokenBatchNorm(),)
