"""The module-level rewrite: fold values computed in float64, rounded once, written into the layers.

A layer keeps its Parameter objects (values are copied in place, so dtype, device and
``requires_grad`` stay, and so do references an optimizer may hold); a conv or Linear without bias gets
a new one. The BatchNorm module is replaced under every name it is registered under: by ``nn.Identity``
when its forward is torch's, by the rest of its own forward when it is a subclass (`bnfold.torch.rest`).
`compute` raises before anything is written, so a refused fold (fp16 overflow) leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bnfold.affine import (
    BFLOAT16,
    Affine,
    batchnorm_affine,
    channel_slice,
    fold_into_conv,
    fold_into_conv_input,
    fold_into_conv_transpose,
    fold_into_linear_input,
    repeat_channels,
    round_to_dtype,
)
from bnfold.torch.kinds import bn_affine
from bnfold.torch.pairs import Pairing, Target

_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


@dataclass
class FoldValues:
    """What one fold writes into one layer: weight and bias as tensors of its dtype and device."""

    target: Target
    weight: torch.Tensor
    bias: torch.Tensor
    notes: list[str] = field(default_factory=list)


def pairing_affine(model: nn.Module, p: Pairing) -> Affine:
    """The BatchNorm's ``(s, t)`` in float64 from the tensors its call reads (γ = 1, β = 0 where None)."""
    if p.bn is not None and p.bn.kind == "frozen":
        return bn_affine(p.bn.module, "frozen")
    state = p.call.state
    mean = _tensor(model, state["running_mean"])
    var = _tensor(model, state["running_var"])
    assert mean is not None and var is not None and p.call.eps is not None
    c = int(mean.shape[0])
    w, b = _tensor(model, state["weight"]), _tensor(model, state["bias"])
    gamma = _to_np(w) if w is not None else np.ones(c)
    beta = _to_np(b) if b is not None else np.zeros(c)
    return batchnorm_affine(gamma, beta, _to_np(mean), _to_np(var), p.call.eps)


def _tensor(model: nn.Module, qual: str | None) -> torch.Tensor | None:
    if qual is None:
        return None
    mod, _, attr = qual.rpartition(".")
    return getattr(model.get_submodule(mod) if mod else model, attr)


def compute(model: nn.Module, p: Pairing) -> list[FoldValues]:
    """The folded weight and bias of every target; raises ``FoldOverflowError`` when they do not fit the dtype."""
    a = pairing_affine(model, p)
    out = []
    for t in p.targets:
        m = t.info.module
        w = _to_np(m.weight)
        b = _to_np(m.bias) if m.bias is not None else None
        part = channel_slice(a, *t.channels) if t.channels is not None else a
        if t.direction == "into-consumer":
            if t.info.kind == "linear":
                new_w, new_b = fold_into_linear_input(w, b, repeat_channels(part, t.repeat))
            else:
                new_w, new_b = fold_into_conv_input(w, b, part, int(m.groups))
        elif t.info.kind == "conv_transpose":
            new_w, new_b = fold_into_conv_transpose(w, b, part, int(m.groups))
        else:  # conv and Linear: the output channel is axis 0 of the weight
            new_w, new_b = fold_into_conv(w, b, part)
        bias_like = m.bias if m.bias is not None else m.weight
        weight_t, fw = to_torch(new_w, m.weight.dtype, m.weight.device, f"{t.info.name}.weight")
        bias_t, fb = to_torch(new_b, bias_like.dtype, bias_like.device, f"{t.info.name}.bias")
        notes = [f"{p.name}: {n}" for n in a.notes] if not out else []
        if fw or fb:
            notes.append(f"{t.info.name}: {fw + fb} folded value(s) below the smallest normal {m.weight.dtype} flushed to zero")
        out.append(FoldValues(t, weight_t, bias_t, notes))
    return out


@dataclass
class Undo:
    """Enough to put one fold back (used when the post-fold check fails on an in-place fold)."""

    tensors: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    modules: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def restore(self) -> None:
        with torch.no_grad():
            for m, weight, bias in reversed(self.tensors):
                m.weight.copy_(weight)
                if bias is None:
                    m.bias = None
                else:
                    m.bias.copy_(bias)
        for parent, attr, child in reversed(self.modules):
            setattr(parent, attr, child)


def write(model: nn.Module, p: Pairing, values: list[FoldValues]) -> Undo:
    """Write the folded values, then replace the BatchNorm module wherever it is registered."""
    undo = Undo()
    for v in values:
        m = v.target.info.module
        undo.tensors.append((m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()))
        with torch.no_grad():
            m.weight.copy_(v.weight)
            if m.bias is None:
                m.bias = nn.Parameter(v.bias, requires_grad=m.weight.requires_grad)
            else:
                m.bias.copy_(v.bias)
    assert p.bn is not None
    for _, sub in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(sub._modules.items()):
            if child is p.bn.module:
                setattr(sub, attr, p.replacement if p.replacement is not None else nn.Identity())
                undo.modules.append((sub, attr, child))
    return undo


def _to_np(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy of a parameter (every supported dtype widens exactly)."""
    return t.detach().cpu().to(torch.float64).numpy()


def to_torch(values: np.ndarray, dtype: torch.dtype, device: torch.device, what: str) -> tuple[torch.Tensor, int]:
    """Round float64 ``values`` once to ``dtype`` (bfloat16 via its exact bit pattern) on ``device``."""
    if dtype == torch.bfloat16:
        arr, flushed = round_to_dtype(values, BFLOAT16, what)
        bits = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy())
        return bits.view(torch.bfloat16).to(device), flushed
    arr, flushed = round_to_dtype(values, np.dtype(_NP_DTYPE[dtype]), what)
    return torch.from_numpy(np.ascontiguousarray(arr).copy()).to(device=device), flushed
