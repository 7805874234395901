"""Per-channel affine nodes and the chains they form.

A BatchNormalization at inference, and a Mul/Add/Sub/Div by a constant that is provably per-channel on
axis 1, are each a map ``y = s·x + t``. A run of them in which every intermediate tensor has exactly one
consumer composes into one (s, t) and folds as one. "Provably per-channel" means the constant,
right-aligned against the data's rank, is 1 on every axis but axis 1: a ``[C]`` constant multiplied onto
``[N, C, H, W]`` broadcasts along the width and is *not* per-channel, even when W == C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from bnfold.affine import F64, FRAGILE_SCALE, Affine, as_f64, batchnorm_affine
from bnfold.onnx.constants import ConstantResolver
from bnfold.report import Reason, SkipReason

FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


@dataclass
class AffineStep:
    node: gs.Node
    affine: Affine
    data: gs.Tensor  # the input that carries the activations


def display(node: gs.Node) -> str:
    """A node's name, or a stand-in naming its op and first output when it has none."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"<{node.op} → {out}>"


def is_graph_output(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    for t in graph.outputs:  # by identity (gs compares tensors by value); a loop, not any(): it runs per step and rule
        if t is tensor:
            return True
    return False


def batchnorm_step(
    node: gs.Node, resolver: ConstantResolver, precomputed: dict[int, PrecomputedAffine] | None = None
) -> AffineStep | SkipReason:
    """A BatchNormalization as an affine step, or the reason it cannot be one.

    ``precomputed``: the graph's plain BatchNorms done at once (`batchnorm_affines`); a node found there
    with the same parameter tensors, holding the same values, takes its (s, t) from it.
    """
    name = display(node)
    refusal = _batchnorm_refusal(node, resolver, name)
    if refusal is not None:
        return refusal
    entry = precomputed.get(id(node)) if precomputed else None
    if entry is not None and entry.matches(node):
        affine = Affine(entry.affine.scale, entry.affine.shift, [f"{name}: {n}" for n in entry.affine.notes])
        return AffineStep(node, affine, node.inputs[0])
    params = []
    for label, tensor in zip(("scale", "B", "mean", "var"), node.inputs[1:5]):
        r = resolver.resolve(tensor)
        if not r.ok:
            assert r.reason is not None
            return SkipReason(r.reason.code, f"'{name}' {label}: {r.reason.message}")
        params.append(r.value)
    if len(params) != 4:
        return SkipReason(Reason.UNSUPPORTED, f"'{name}' lacks some of its 4 parameters")
    sizes = {int(np.asarray(p).size) for p in params}
    if len(sizes) != 1:
        return SkipReason(Reason.SHAPE_MISMATCH, f"'{name}' parameters have different lengths {sorted(sizes)}")
    affine = batchnorm_affine(*params, epsilon=_epsilon(node))
    affine.notes = [f"{name}: {n}" for n in affine.notes]
    return AffineStep(node, affine, node.inputs[0])


def _batchnorm_refusal(node: gs.Node, resolver: ConstantResolver, name: str) -> SkipReason | None:
    """Why `node` is no affine step whatever its parameters (training mode, per-element statistics)."""
    extra = [o for o in node.outputs[1:] if o.name]
    if int(node.attrs.get("training_mode", 0)) == 1 or extra:
        what = "training_mode=1" if int(node.attrs.get("training_mode", 0)) == 1 else "it has the training outputs"
        return SkipReason(Reason.TRAINING_MODE, f"'{name}' is in training mode ({what})")
    if resolver.opset < 7 and int(node.attrs.get("is_test", 0)) == 0:
        return SkipReason(
            Reason.TRAINING_MODE, f"'{name}' is in training mode (is_test=0, the default before opset 7)"
        )
    if int(node.attrs.get("spatial", 1)) == 0:
        return SkipReason(
            Reason.UNSUPPORTED,
            f"'{name}' has spatial=0 (per-element statistics, opset < 9); only per-channel BatchNorm folds",
        )
    return None


def _epsilon(node: gs.Node) -> float:
    # The attribute is a float32: absent, it is float32(1e-5) = 9.99999974738e-06, as every runtime reads it.
    return float(node.attrs.get("epsilon", np.float32(1e-5)))


@dataclass
class PrecomputedAffine:
    """A BatchNorm's map as `batchnorm_affines` found it, and what it was computed from."""

    node: gs.Node
    tensors: tuple[gs.Tensor, ...]  # its four parameter inputs
    values: tuple[object, ...]  # what each held (`Constant._values`): a value written since does not match
    affine: Affine  # notes without the node's name

    def matches(self, node: gs.Node) -> bool:
        params = node.inputs[1:5]
        return (
            self.node is node
            and len(params) == 4
            and all(p is t and t._values is v for p, t, v in zip(params, self.tensors, self.values))
        )


NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def batchnorm_affines(nodes: list[gs.Node], resolver: ConstantResolver) -> dict[int, PrecomputedAffine]:
    """The (s, t) of every BatchNorm among `nodes` whose parameters are plain constants, in one pass.

    Planning computes one map per BatchNorm, on arrays of a few hundred channels, where numpy's per-call
    overhead is the cost, not the arithmetic. Here the parameters of all of them are concatenated and
    the same float64 operations run once over the lot (elementwise, so every (s, t) has the bits
    `batchnorm_affine` gives it), with its notes' conditions checked per element; a BatchNorm with any
    channel to note is done again by `batchnorm_affine` itself, which writes the notes. Taken: standard
    BatchNorms `batchnorm_step` would read the parameters of (not in training mode, not spatial=0), whose
    four parameters are constants no caller overrides (`ConstantResolver.plain`), of one length and a
    float16/32/64 type. Any other BatchNorm, or one whose parameters fail to read, is left to
    `batchnorm_step`'s own reading, which meets the same failure at the same point.
    """
    picked: list[tuple[gs.Node, tuple[gs.Tensor, ...], list[np.ndarray], float]] = []
    for node in nodes:
        if node.op != "BatchNormalization" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) != 5:
            continue
        tensors = tuple(node.inputs[1:5])
        try:
            if _batchnorm_refusal(node, resolver, "") is not None:
                continue
            params = [resolver.plain(t) for t in tensors]
            if any(p is None or p.dtype not in NATIVE_FLOATS for p in params):
                continue
            epsilon = _epsilon(node)
        except Exception:  # odd attributes or unreadable data: batchnorm_step meets it again, as it always did
            continue
        size = params[0].size
        if size == 0 or any(p.size != size for p in params):
            continue
        picked.append((node, tensors, params, epsilon))
    if not picked:
        return {}
    sizes = np.array([p[2][0].size for p in picked])
    gamma, beta, mean, var = (np.concatenate([p[2][k].reshape(-1) for p in picked], dtype=F64) for k in range(4))
    epsilons = np.repeat(np.array([p[3] for p in picked], F64), sizes)
    with np.errstate(all="ignore"):  # a BatchNorm that would warn has a channel to note: done again below
        scale = gamma / np.sqrt(var + epsilons)
        shift = beta - scale * mean
        magnitude = np.abs(scale)
        # `batchnorm_affine`'s notes need a channel with |s| > FRAGILE_SCALE or NaN, s = 0 (γ = 0), σ² = 0
        # (or NaN, or negative), or a NaN/infinite t (a non-finite β, μ or γ, or σ²+ε <= 0 making s so)
        remarkable = ~((magnitude <= FRAGILE_SCALE) & (magnitude > 0) & (var > 0) & np.isfinite(shift))
    ends = np.cumsum(sizes)
    counts = np.concatenate(([0], np.cumsum(remarkable)))
    flagged = (counts[ends] - counts[ends - sizes]).tolist()
    table: dict[int, PrecomputedAffine] = {}
    for (node, tensors, params, eps), stop, size, notes in zip(picked, ends.tolist(), sizes.tolist(), flagged):
        if notes:
            affine = batchnorm_affine(*params, epsilon=eps)
        else:
            affine = Affine(scale[stop - size : stop], shift[stop - size : stop])
        table[id(node)] = PrecomputedAffine(node, tensors, tuple(t._values for t in tensors), affine)
    return table


def elementwise_step(
    node: gs.Node,
    resolver: ConstantResolver,
    rank_of: Callable[[gs.Tensor], int | None],
    shape_of: Callable[[gs.Tensor], list[int | None] | None] | None = None,
) -> AffineStep | None:
    """Mul/Add/Sub/Div by a per-channel constant as an affine step; None when it is anything else."""
    if node.op not in ELEMENTWISE or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    ra, rb = resolver.resolve(a), resolver.resolve(b)
    if ra.ok == rb.ok:  # both constant (a constant subexpression) or neither
        return None
    data, const, const_first = (b, ra.value, True) if ra.ok else (a, rb.value, False)
    assert const is not None
    if np.asarray(const).dtype not in FLOAT_DTYPES and not _is_bfloat16(const):
        return None
    vec = per_channel_vector(np.asarray(const), rank_of(data))
    if vec is None:
        return None
    if vec.size > 1:  # [N, 1, H, W] · [1, C, 1, 1] broadcasts the data up to C channels: not a map on x's channels
        shape = shape_of(data) if shape_of is not None else None
        if not shape or len(shape) < 2 or shape[1] != vec.size:
            return None
    c = as_f64(vec)
    if node.op == "Mul":
        return AffineStep(node, Affine(c, np.zeros_like(c)), data)
    if node.op == "Add":
        return AffineStep(node, Affine(np.ones_like(c), c), data)
    if node.op == "Sub":
        if const_first:  # c - x
            return AffineStep(node, Affine(-np.ones_like(c), c), data)
        return AffineStep(node, Affine(np.ones_like(c), -c), data)
    if const_first:  # c / x is not affine
        return None
    if np.any(c == 0):
        return None
    return AffineStep(node, Affine(1.0 / c, np.zeros_like(c)), data)


def per_channel_vector(const: np.ndarray, data_rank: int | None) -> np.ndarray | None:
    """The constant as a vector over axis 1 (length C or 1), or None if it is not per-channel.

    Right-align the constant's shape against the data's rank (numpy/ONNX broadcasting): every axis but
    axis 1 must be 1. With the data's rank unknown only a scalar-like constant (rank ≤ 1, size 1) is safe.
    """
    shape = list(const.shape)
    if data_rank is None:
        return const.reshape(1) if const.size == 1 and len(shape) <= 1 else None
    if len(shape) > data_rank or data_rank < 2:
        return None
    aligned = [1] * (data_rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(aligned) if i != 1):
        return None
    return const.reshape(-1)


def _is_bfloat16(value: np.ndarray) -> bool:
    return np.asarray(value).dtype.name == "bfloat16"


def compose(steps: list[AffineStep]) -> Affine:
    """The steps applied in order, as one affine map (lengths C or 1 broadcast)."""
    total = steps[0].affine
    for step in steps[1:]:
        total = total.then(step.affine)
    return total
