"""A BatchNorm *after* a re-parameterisable sum: ``BN(Σ_i Conv_i(x) [+ x])`` (RepViT's RepVggDw).

timm's RepViT token mixer computes ``bn(conv(x) + conv1(x) + x)``: a depthwise 3x3 conv (its own BN
already folded by `conv`), a depthwise 1x1 conv with bias, and the bare input x, summed, *then*
normalised. Found on ``repvit_m0_9`` (all three exporters): 23 of its BatchNorms were left,
``no-linear-neighbour`` (fed by an Add) or ``other-consumer`` (the BN's output feeds the channel mixer
and the residual). Both are the same pattern, and it folds exactly:

* the sum is one conv, exactly as in `reparam`: ``W = Σ_i embed(W_i) + identity(1)``, ``b = Σ_i b_i``
  (the bare x is the identity kernel with s = 1, t = 0; `bnfold.affine.merge_branches`);
* the BatchNorm ``s·y + t`` then folds into that conv like any Conv → BN: ``W'[o] = s[o]·W[o]``,
  ``b' = s·b + t``.

All in float64, rounded once. The merged conv takes over the BatchNorm chain's output tensor, so the
BatchNorm's other readers (the channel mixer, the residual Add) read the same values as before.

Preconditions (else ``None`` or a refusal): the chain's input is the root of an Add tree whose
intermediate sums each have one reader; every term is a bare standard Conv on the same tensor x (at
least one) or x itself (at most once); the Add tree and each conv output are read only by the tree
(``other-consumer`` / ``graph-output``); the geometry of `reparam` (stride 1, odd centred kernels, the
same groups and dilations); with an x term, C_in = C_out = the BatchNorm's channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from bnfold import affine as A
from bnfold.onnx.chain import display
from bnfold.onnx.fold import GraphEdit
from bnfold.onnx.rules.base import INTO_PRODUCER, Chain, Fold, LayerPlan, PlanContext, Rule, Site, fit, refuse, rounded
from bnfold.onnx.rules.reparam import (
    _conv_on,
    _is_add,
    _kernel_volume,
    _refuse_shared,
    _shared_dilations,
    _wait_for_branch_fold,
    mergeable_branches,
)
from bnfold.report import Reason


@dataclass
class SumSite(Site):
    """The convs on x (``target`` becomes the merged conv), the Add tree, and whether x itself is a term."""

    convs: list[gs.Node] = field(default_factory=list)
    adds: list[gs.Node] = field(default_factory=list)  # children first; the last is the root (feeds the chain)
    identity: bool = False


class ReparamSum(Rule):
    name = "reparam-sum"
    direction = INTO_PRODUCER  # the sum's branches merge into one conv, the BatchNorm into it
    priority = 155  # after `reparam` (150): a bare-BN identity branch is its pattern, not this one

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        x_sum = chain.x
        if not x_sum.inputs or not _is_add(x_sum.inputs[0]):
            return None
        adds: list[gs.Node] = []
        terms = _terms(x_sum, ctx, adds)
        if len(terms) < 2:
            return None
        convs_out = [t for t in terms if t.inputs and t.inputs[0].op == "Conv"]
        if not convs_out:
            return None
        x = convs_out[0].inputs[0].inputs[0]
        plain = [t for t in terms if t is x]
        if len(plain) > 1:
            return None
        for t in terms:
            if t is not x and not _conv_on(t, x):
                _wait_for_branch_fold(t, x, ctx)
                return None
        convs = [t.inputs[0] for t in terms if t is not x]
        if len({id(c) for c in convs}) != len(convs):
            return None
        if ctx.is_output(x_sum) or len(x_sum.outputs) != 1:
            _refuse_shared(x_sum.inputs[0], ctx)
        for add in adds[:-1]:
            _refuse_shared(add, ctx)
        for conv in convs:
            _refuse_shared(conv, ctx)
        target = max(convs, key=lambda c: _kernel_volume(c, ctx))
        return SumSite(target, convs=convs, adds=adds, identity=bool(plain))

    def plan(self, chain: Chain, site: Site, ctx: PlanContext) -> Fold:
        assert isinstance(site, SumSite)
        params, g, c_out, in_per_group = mergeable_branches(site.convs, ctx)
        if site.identity and g * in_per_group != c_out:
            refuse(Reason.SHAPE_MISMATCH, f"Conv '{display(site.target)}' maps {g * in_per_group} channels to {c_out}: "
                   "the bare input in the sum needs C_in = C_out")
        bn = fit(chain.affine, c_out, site.target)
        kernel = tuple(max(w.shape[2 + i] for w, _ in params) for i in range(params[0][0].ndim - 2))
        dilations = _shared_dilations(site.convs, [w for w, _ in params], kernel)
        one = A.Affine(np.ones(c_out), np.zeros(c_out)) if site.identity else None
        w, b = A.merge_branches([w for w, _ in params], [b for _, b in params], kernel, one)
        w = w * bn.scale.reshape((-1,) + (1,) * (w.ndim - 1))
        b = b * bn.scale + bn.shift
        target_w, target_b = params[site.convs.index(site.target)]
        bias_dtype = target_b.dtype if target_b is not None else target_w.dtype
        layer = rounded(LayerPlan(site.target), {1: (w, target_w.dtype, "weight"), 2: (b, bias_dtype, "bias")})
        if tuple(target_w.shape[2:]) != kernel:
            layer.attrs = {
                "kernel_shape": list(kernel),
                "dilations": list(dilations),
                "pads": [d * (k - 1) // 2 for d, k in zip(dilations, kernel)] * 2,
                "auto_pad": "NOTSET",
            }
        n = len(site.convs) + int(site.identity)
        notes = [f"{n} branches + BatchNorm → 1 Conv ({display(site.target)})"]
        return Fold(self, chain, site, [layer], notes=notes)

    def apply(self, fold: Fold, edit: GraphEdit) -> None:
        site, layer = fold.site, fold.layers[0]
        assert isinstance(site, SumSite)
        edit.write_params(layer.node, layer.params, layer.attrs)
        out = fold.chain.y
        fold.chain.nodes[-1].outputs.clear()
        site.target.outputs.clear()
        site.target.outputs.append(out)
        others = [c for c in site.convs if c is not site.target]
        edit.remove_dead([*site.adds, *others, *fold.chain.nodes])


def _terms(t: gs.Tensor, ctx: PlanContext, adds: list[gs.Node]) -> list[gs.Tensor]:
    """The terms of the sum ``t``, through Adds whose output is read only by the next Add (children first
    in ``adds``). A tensor read elsewhere (x itself, a residual) is a term, never descended into."""
    node = t.inputs[0]
    found: list[gs.Tensor] = []
    for u in node.inputs:
        inner = u.inputs[0] if u.inputs else None
        if inner is not None and _is_add(inner) and len(u.outputs) == 1 and not ctx.is_output(u):
            found += _terms(u, ctx, adds)
        else:
            found.append(u)
    adds.append(node)
    return found


RULES = (ReparamSum(),)
