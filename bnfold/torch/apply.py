"""The module-level rewrite: fold values computed in float64, rounded once, written into the producer.

The producer keeps its Parameter objects (values are copied in place, so dtype, device and
``requires_grad`` stay, and so do references an optimizer may hold); a conv or Linear without bias gets
a new one. The BatchNorm is replaced by ``nn.Identity`` under every name it is registered under.
`compute` raises before anything is written, so a refused fold (fp16 overflow) leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bnfold.affine import BFLOAT16, Affine, fold_into_conv, fold_into_conv_transpose, round_to_dtype
from bnfold.torch.kinds import ModuleInfo, bn_affine

_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


@dataclass
class FoldValues:
    """What a fold will write: new weight and bias as tensors of the producer's dtype and device."""

    weight: torch.Tensor
    bias: torch.Tensor
    notes: list[str] = field(default_factory=list)


def compute(producer: ModuleInfo, bn: ModuleInfo) -> FoldValues:
    """The folded weight and bias; raises ``FoldOverflowError`` when they do not fit the dtype."""
    m = producer.module
    a: Affine = bn_affine(bn.module, bn.kind)
    w = _to_np(m.weight)
    b = _to_np(m.bias) if m.bias is not None else None
    if producer.kind == "conv_transpose":
        new_w, new_b = fold_into_conv_transpose(w, b, a, int(m.groups))
    else:  # conv and Linear: the output channel is axis 0 of the weight
        new_w, new_b = fold_into_conv(w, b, a)
    bias_like = m.bias if m.bias is not None else m.weight
    weight_t, fw = to_torch(new_w, m.weight.dtype, m.weight.device, f"{producer.name}.weight")
    bias_t, fb = to_torch(new_b, bias_like.dtype, bias_like.device, f"{producer.name}.bias")
    notes = [f"{bn.name}: {n}" for n in a.notes]
    if fw or fb:
        notes.append(f"{producer.name}: {fw + fb} folded value(s) below the smallest normal {m.weight.dtype} flushed to zero")
    return FoldValues(weight_t, bias_t, notes)


@dataclass
class Undo:
    """Enough to put one fold back (used when a post-fold check fails on an in-place fold)."""

    producer: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    bn: nn.Module
    parents: list[tuple[nn.Module, str]]

    def restore(self) -> None:
        with torch.no_grad():
            self.producer.weight.copy_(self.weight)
            if self.bias is None:
                self.producer.bias = None
            else:
                self.producer.bias.copy_(self.bias)
        for parent, attr in self.parents:
            setattr(parent, attr, self.bn)


def write(model: nn.Module, producer: ModuleInfo, bn: ModuleInfo, values: FoldValues) -> Undo:
    """Write the folded values and replace the BatchNorm by ``nn.Identity`` wherever it is registered."""
    m = producer.module
    undo = Undo(m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone(), bn.module, [])
    with torch.no_grad():
        m.weight.copy_(values.weight)
        if m.bias is None:
            m.bias = nn.Parameter(values.bias, requires_grad=m.weight.requires_grad)
        else:
            m.bias.copy_(values.bias)
    for name, sub in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(sub._modules.items()):
            if child is bn.module:
                setattr(sub, attr, nn.Identity())
                undo.parents.append((sub, attr))
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
