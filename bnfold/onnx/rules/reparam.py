"""The identity branch of a re-parameterisable block, merged into its sibling convs (RepVGG, MobileOne, RepConv).

RepVGG / MobileOne / FastViT / YOLOv6-v7 RepConv blocks sum branches over the same input x::

    y = Conv_3x3(x) + Conv_1x1(x) + BN(x)          (the convs' own BatchNorms already folded by `conv`)

The bare ``BN(x) = s·x + t`` is a convolution too: the identity kernel times s, plus t. With C_in = C_out
= C and g groups, ``W_id[o, o mod (C/g), centre] = s[o]``. A conv with stride 1, dilation d, an odd
kernel k and pads ``d·(k−1)/2`` on every side reads ``x[p]`` at its centre tap for output position p,
so every such branch produces the same output grid as x, and the sum of the branches is one conv::

    W = Σ_i embed(W_i) + W_id,     b = Σ_i b_i + t

where ``embed`` zero-pads a kernel, centred, to the largest one (a 1x1's value lands at ``[1, 1]`` of
the 3x3). The Add tree and all but one conv disappear: 3 branches → 1 Conv, which onnxruntime does not
do by itself, so the merged block is also faster at ORT_ENABLE_ALL. The merged conv takes over the last
Add's output tensor (its name survives). Math: `bnfold.affine.merge_branches`.

FastViT's RepMixer *subtracts* the bare BatchNorm instead: ``y = Mixer(x) − Norm(x)``, where the
mixer is a MobileOne block (its branches merge into one conv first) and the norm is a bare ``BN(x)``.
``Σ_i Conv_i(x) − (s·x + t)`` is the same merge with the identity branch negated, ``(−s, −t)``; the Sub
is the root, its output the merged conv's. (Only the BatchNorm as the subtrahend: as the minuend the
convs would have to be negated.)

Preconditions (the pattern is there but the merge is not exact → refusal with a reason):

* every branch conv reads x as its data input, and its output is read only by the Add tree, which is
  not a graph output on the way (``other-consumer`` / ``graph-output``);
* stride 1 (a strided conv's output grid is not x's: the identity cannot be a kernel), odd kernels with
  centred pads, the same groups and the same dilation where kernels are wider than 1, C_in = C_out =
  the BatchNorm's channels (``shape-mismatch``);
* the branch convs no longer carry BatchNorms of their own: when the identity BN comes first in the
  graph, the chain waits (`Later`) until the branch folds are planned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.onnx.chain import AffineStep, display
from bnfold.onnx.rules.base import (
    INTO_PRODUCER,
    Chain,
    Fold,
    LayerPlan,
    Later,
    PlanContext,
    Rule,
    Site,
    fit,
    is_standard,
    refuse,
    rounded,
    weights,
)
from bnfold.onnx.fold import GraphEdit
from bnfold.report import Reason


@dataclass
class BranchSite(Site):
    """The branch convs on x (``target`` among them: it becomes the merged conv) and the Add tree summing them."""

    convs: list[gs.Node] = field(default_factory=list)
    adds: list[gs.Node] = field(default_factory=list)  # every Add of the tree; the last is the root
    out: gs.Tensor | None = None  # the root Add's output: the merged conv's output
    negate: bool = False  # the root is ``Sub(Σ convs, BN(x))``: the identity branch enters with a minus sign


class ReparamBranches(Rule):
    name = "reparam"
    direction = INTO_PRODUCER  # "merged into branch conv"
    priority = 150  # after the plain producer rules (a Conv→BN fold first), before the consumer rules

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        x, y = chain.x, chain.y
        if ctx.is_output(y) or len(y.outputs) != 1:
            return None
        first = y.outputs[0]
        if _is_sub_of(first, y):
            return self._match_subtracted(chain, first, ctx)
        if not _is_add(first) or sum(t is y for t in first.inputs) != 1:
            return None
        root = first  # climb while the parent Add's other operand is a sum of branches on x
        while True:
            out = root.outputs[0]
            if ctx.is_output(out) or len(out.outputs) != 1 or not _is_add(out.outputs[0]):
                break
            parent = out.outputs[0]
            others = [t for t in parent.inputs if t is not out]
            if len(others) != 1 or not all(_conv_on(leaf, x) for leaf in _leaves(others[0], y, [])):
                break
            root = parent
        adds: list[gs.Node] = []
        leaves = [t for t in root.inputs for t in _leaves(t, y, adds)]
        adds.append(root)
        branches = [t for t in leaves if t is not y]
        if leaves.count(y) != 1 or not branches:
            return None
        for t in branches:
            if not _conv_on(t, x):
                _wait_for_branch_fold(t, x, ctx)
                return None
        convs = [t.inputs[0] for t in branches]
        if len({id(c) for c in convs}) != len(convs):
            return None
        for add in adds[:-1]:  # an inner sum read elsewhere would lose its value
            _refuse_shared(add, ctx)
        for conv in convs:
            _refuse_shared(conv, ctx)
        target = max(convs, key=lambda c: _kernel_volume(c, ctx))
        return BranchSite(target, convs=convs, adds=adds, out=root.outputs[0])

    def _match_subtracted(self, chain: Chain, sub: gs.Node, ctx: PlanContext) -> Site | None:
        """``Sub(Σ_i Conv_i(x), chain(x))`` (FastViT RepMixer: ``mixer(x) − norm(x)``)."""
        x, y = chain.x, chain.y
        adds: list[gs.Node] = []
        branches = _leaves(sub.inputs[0], y, adds)
        adds.append(sub)
        if any(t is y for t in branches):
            return None
        for t in branches:
            if not _conv_on(t, x):
                _wait_for_branch_fold(t, x, ctx)
                producer = t.inputs[0] if t.inputs else None
                what = f"{producer.op} '{display(producer)}'" if producer is not None else f"'{t.name}'"
                raise Later(
                    Reason.NO_LINEAR_NEIGHBOUR,
                    f"it is subtracted from a sum whose term {what} is not a Conv on the same input "
                    "(the identity branch merges only into bare sibling convs)",
                )
        convs = [t.inputs[0] for t in branches]
        if len({id(c) for c in convs}) != len(convs):
            return None
        for add in adds[:-1]:
            _refuse_shared(add, ctx)
        for conv in convs:
            _refuse_shared(conv, ctx)
        target = max(convs, key=lambda c: _kernel_volume(c, ctx))
        return BranchSite(target, convs=convs, adds=adds, out=sub.outputs[0], negate=True)

    def plan(self, chain: Chain, site: Site, ctx: PlanContext) -> Fold:
        assert isinstance(site, BranchSite)
        params, g, c_out, in_per_group = mergeable_branches(site.convs, ctx)
        if g * in_per_group != c_out:
            refuse(
                Reason.SHAPE_MISMATCH,
                f"Conv '{display(site.target)}' maps {g * in_per_group} channels to {c_out}: "
                "an identity branch needs C_in = C_out",
            )
        affine = fit(chain.affine, c_out, site.target)
        if site.negate:
            affine = A.Affine(-affine.scale, -affine.shift, list(affine.notes))
        kernel = tuple(max(w.shape[2 + i] for w, _ in params) for i in range(params[0][0].ndim - 2))
        dilations = _shared_dilations(site.convs, [w for w, _ in params], kernel)
        nw, nb = A.merge_branches([w for w, _ in params], [b for _, b in params], kernel, affine)
        target_w, target_b = params[site.convs.index(site.target)]
        bias_dtype = target_b.dtype if target_b is not None else target_w.dtype
        layer = rounded(LayerPlan(site.target), {1: (nw, target_w.dtype, "weight"), 2: (nb, bias_dtype, "bias")})
        if tuple(target_w.shape[2:]) != kernel:  # no branch has the merged kernel (a 1x3 and a 3x1): take its geometry
            layer.attrs = {
                "kernel_shape": list(kernel),
                "dilations": list(dilations),
                "pads": [d * (k - 1) // 2 for d, k in zip(dilations, kernel)] * 2,
                "auto_pad": "NOTSET",
            }
        n = len(site.convs) + 1
        notes = [f"{n} branches → 1 Conv ({display(site.target)})"]
        return Fold(self, chain, site, [layer], notes=notes)

    def apply(self, fold: Fold, edit: GraphEdit) -> None:
        site, layer = fold.site, fold.layers[0]
        assert isinstance(site, BranchSite) and site.out is not None
        edit.write_params(layer.node, layer.params, layer.attrs)
        site.adds[-1].outputs.clear()
        site.target.outputs.clear()
        site.target.outputs.append(site.out)
        others = [c for c in site.convs if c is not site.target]
        edit.remove_dead([*site.adds, *others, *fold.chain.nodes])


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------
def _is_add(node: gs.Node) -> bool:
    return node.op == "Add" and is_standard(node) and len(node.inputs) == 2 and len(node.outputs) == 1


def _is_sub_of(node: gs.Node, y: gs.Tensor) -> bool:
    """``node`` is a standard two-input Sub with ``y`` as its subtrahend only."""
    return (
        node.op == "Sub" and is_standard(node) and len(node.inputs) == 2 and len(node.outputs) == 1
        and node.inputs[1] is y and node.inputs[0] is not y
    )


def _leaves(t: gs.Tensor, y: gs.Tensor, adds: list[gs.Node]) -> list[gs.Tensor]:
    """The terms of the sum `t` (through nested Adds), collecting those Adds in `adds` (children first)."""
    if t is y or not t.inputs or not _is_add(t.inputs[0]):
        return [t]
    node = t.inputs[0]
    found = [leaf for u in node.inputs for leaf in _leaves(u, y, adds)]
    adds.append(node)
    return found


def _conv_on(t: gs.Tensor, x: gs.Tensor) -> bool:
    """`t` is the sole output of a standard Conv whose data input is x (and only its data input)."""
    if not t.inputs:
        return False
    conv = t.inputs[0]
    return (
        conv.op == "Conv"
        and is_standard(conv)
        and len(conv.outputs) == 1
        and bool(conv.inputs)
        and conv.inputs[0] is x
        and sum(u is x for u in conv.inputs) == 1
    )


def _wait_for_branch_fold(t: gs.Tensor, x: gs.Tensor, ctx: PlanContext) -> None:
    """A branch still `Conv(x) → BatchNorm/Mul/Add`: plan once the branch's own fold is done (`Later`)."""
    tail = t
    while tail.inputs:
        node = tail.inputs[0]
        step = ctx.affine_step(node)
        if not isinstance(step, AffineStep):
            return
        tail = step.data
        if _conv_on(tail, x):
            raise Later(
                Reason.NO_LINEAR_NEIGHBOUR,
                f"its sibling branch Conv '{display(tail.inputs[0])}' is still followed by {node.op} "
                f"'{display(node)}', which stays (see its reason); the identity branch merges only into bare convs",
            )


def _refuse_shared(node: gs.Node, ctx: PlanContext) -> None:
    """The branch's value must reach only the sum: merging removes it."""
    out = node.outputs[0]
    if ctx.is_output(out):
        refuse(Reason.GRAPH_OUTPUT, f"{node.op} '{display(node)}' output '{out.name}' is a graph output; merging the branches removes it")
    if len(out.outputs) != 1:
        readers = ", ".join(f"{n.op} '{display(n)}'" for n in out.outputs[:4])
        refuse(Reason.OTHER_CONSUMER, f"{node.op} '{display(node)}' output '{out.name}' feeds {readers}; merging the branches would change it")


def _names(nodes: list[gs.Node]) -> str:
    return ", ".join(f"'{display(n)}'" for n in nodes)


def _kernel_volume(conv: gs.Node, ctx: PlanContext) -> int:
    w = conv.inputs[1] if len(conv.inputs) > 1 else None
    shape = w.shape if isinstance(w, gs.Constant) else None
    if shape is None and w is not None:
        shape = ctx.static_shape(w)
    if shape is None and "kernel_shape" in conv.attrs:
        shape = [0, 0, *conv.attrs["kernel_shape"]]
    volume = 1
    for k in (shape or [])[2:]:
        volume *= k if isinstance(k, int) and k > 0 else 1
    return volume


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def _dilations(conv: gs.Node, n: int) -> list[int]:
    return [int(d) for d in conv.attrs.get("dilations", [1] * n)]



def mergeable_branches(
    convs: list[gs.Node], ctx: PlanContext
) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], int, int, int]:
    """The branch convs' (weight, bias), and their shared groups, C_out and C_in/groups — or a refusal.

    Convs merge into one only with the same groups, channels, rank and dtype, each with a centred
    kernel (`_refuse_geometry`): shared by `reparam` and `reparam_sum`.
    """
    params = [weights(conv, ctx) for conv in convs]
    groups = {int(conv.attrs.get("group", 1)) for conv in convs}
    if len(groups) != 1:
        refuse(Reason.SHAPE_MISMATCH, f"branch convs {_names(convs)} have different groups {sorted(groups)}: they cannot merge")
    for conv, (w, _) in zip(convs, params):
        _refuse_geometry(conv, w)
    shapes = {(w.shape[0], w.shape[1]) for w, _ in params}
    if len(shapes) != 1 or len({w.dtype for w, _ in params}) != 1 or len({w.ndim for w, _ in params}) != 1:
        refuse(Reason.SHAPE_MISMATCH, f"branch convs {_names(convs)} differ in channels, rank or dtype: they cannot merge")
    c_out, in_per_group = shapes.pop()
    return params, groups.pop(), c_out, in_per_group

def _refuse_geometry(conv: gs.Node, w) -> None:
    """Stride 1, odd kernel, pads ``d·(k−1)/2`` on both sides: output position p reads x[p] at the centre tap."""
    n = w.ndim - 2
    kernel = list(w.shape[2:])
    strides = [int(s) for s in conv.attrs.get("strides", [1] * n)]
    dil = _dilations(conv, n)
    name = f"Conv '{display(conv)}'"
    if any(s != 1 for s in strides):
        refuse(
            Reason.SHAPE_MISMATCH,
            f"{name} has stride {max(strides)}: the identity branch cannot be a kernel "
            f"(strides {strides}: the conv's output grid is not its input's)",
        )
    if any(k % 2 == 0 for k in kernel):
        refuse(Reason.SHAPE_MISMATCH, f"{name} has an even kernel {kernel}: no centre tap for the identity branch")
    centred = [d * (k - 1) // 2 for d, k in zip(dil, kernel)]
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return  # stride 1, odd kernel: SAME pads d·(k−1)/2 on both sides
    pads = [0] * (2 * n) if auto_pad == "VALID" else [int(p) for p in conv.attrs.get("pads", [0] * (2 * n))]
    if pads != centred * 2:
        refuse(
            Reason.SHAPE_MISMATCH,
            f"{name} pads {pads} (auto_pad {auto_pad}) do not centre its {'x'.join(map(str, kernel))} kernel "
            f"(needs {centred * 2}): its output p does not read x[p] at the centre tap, so the branches cannot merge",
        )


def _shared_dilations(convs: list[gs.Node], ws: list, kernel: tuple[int, ...]) -> list[int]:
    """One dilation per axis, shared by every conv whose kernel is wider than 1 there (a 1-wide axis has none)."""
    out = []
    for i, big in enumerate(kernel):
        used = {_dilations(c, len(kernel))[i] for c, w in zip(convs, ws) if w.shape[2 + i] > 1}
        if len(used) > 1:
            refuse(Reason.SHAPE_MISMATCH, f"branch convs {_names(convs)} have different dilations {sorted(used)}: they cannot merge")
        out.append(used.pop() if used else 1)
    return out


RULES = (ReparamBranches(),)
