"""Which modules bnfold knows: the linear producers and the BatchNorm kinds, recognised by behaviour.

A module counts as a producer or a BatchNorm only where its forward is the one whose math the fold
assumes: the exact torch class or a subclass that does not override ``forward`` (a weight-standardised
conv subclass computes something else; folding into it would be wrong). torchvision's
``FrozenBatchNorm2d`` is recognised without importing torchvision, by its buffers and by running a
float64 copy of it on random statistics and checking that it computes ``x·s + t`` on axis 1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnfold.affine import Affine, batchnorm_affine

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _unmodified(m: nn.Module, base: type, methods: tuple[str, ...]) -> bool:
    """``m`` is an instance of ``base`` whose class keeps ``base``'s implementation of ``methods``."""
    return isinstance(m, base) and all(getattr(type(m), name) is getattr(base, name) for name in methods)


def producer_kind(m: nn.Module) -> str | None:
    """'conv', 'conv_transpose' or 'linear' where ``m`` computes exactly that layer, else None."""
    for base in CONV:
        if _unmodified(m, base, ("forward", "_conv_forward")):
            return "conv"
    for base in CONV_T:
        if _unmodified(m, base, ("forward",)):
            return "conv_transpose"
    if _unmodified(m, nn.Linear, ("forward",)):
        return "linear"
    return None


def spatial_dims(m: nn.Module) -> int:
    """Spatial dimensions of a conv (1, 2, 3) or 0 for Linear: the batched output rank is this + 2."""
    for n, (c, ct) in enumerate(zip(CONV, CONV_T), start=1):
        if isinstance(m, (c, ct)):
            return n
    return 0


def out_channels(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def bn_kind(m: nn.Module) -> str | None:
    """What kind of BatchNorm ``m`` is, or None.

    'batchnorm': torch's BatchNorm1d/2d/3d/SyncBatchNorm (or a subclass keeping their forward);
    'subclass': a BatchNorm subclass with its own ``forward`` (timm's ``BatchNormAct2d``: normalise, then
    dropout and an activation), whose BatchNorm call is found in the traced graph, not assumed;
    'frozen': a FrozenBatchNorm2d.
    """
    for base in _BN:
        if _unmodified(m, base, ("forward",)):
            return "batchnorm"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "subclass"
    if looks_frozen(m):
        return "frozen"
    return None


def enforced_rank(m: nn.Module) -> int | None:
    """The input rank a BatchNorm class itself insists on (it raises otherwise), or None if it accepts several.

    Without traced shapes this is what proves that the producer ran batched, so that BatchNorm's
    axis 1 is the producer's channel axis.
    """
    for base, rank in ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5)):
        if _unmodified(m, base, ("forward", "_check_input_dim")):
            return rank
    return None


def looks_frozen(m: nn.Module) -> bool:
    """Structure of torchvision's FrozenBatchNorm2d: four 1-D buffers of one length, a float eps, nothing else."""
    if list(m.children()) or list(m.parameters(recurse=False)):
        return False
    buffers = dict(m.named_buffers(recurse=False))
    if any(name not in buffers or buffers[name] is None for name in FROZEN_BUFFERS):
        return False
    shapes = {tuple(buffers[name].shape) for name in FROZEN_BUFFERS}
    eps = getattr(m, "eps", None)
    return len(shapes) == 1 and len(next(iter(shapes))) == 1 and isinstance(eps, float) and not isinstance(eps, bool)


def frozen_computes_affine(m: nn.Module, probe_shape: tuple[int, ...]) -> str | None:
    """Run a float64 copy of ``m`` with random statistics; None if it computes ``x·s + t`` on axis 1, else why not.

    Random statistics (negative γ, small variances, non-zero means) so that an identity or a module
    that ignores a buffer cannot pass by chance.
    """
    try:
        probe = copy.deepcopy(m).to(torch.float64)
    except Exception as exc:  # pragma: no cover - exotic modules
        return f"cannot copy it to probe what it computes ({exc})"
    c = int(probe.running_mean.shape[0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        probe.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        probe.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        probe.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 4 + 0.01)
        x = torch.randn(*probe_shape, generator=gen, dtype=torch.float64)
        try:
            y = probe(x)
        except Exception as exc:
            return f"it fails on a {list(probe_shape)} input ({type(exc).__name__}: {exc})"
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return "its output does not have its input's shape"
    a = bn_affine(probe, "frozen")
    view = [1, c] + [1] * (x.dim() - 2)
    expected = x * torch.from_numpy(a.scale).view(view) + torch.from_numpy(a.shift).view(view)
    if not torch.allclose(y, expected, rtol=1e-9, atol=1e-9):
        return "it does not compute x·weight/√(running_var+eps) + (bias − running_mean·weight/√(running_var+eps))"
    return None


def bn_affine(m: nn.Module, kind: str) -> Affine:
    """The BatchNorm's ``(s, t)`` in float64 from its stored parameters (γ = 1, β = 0 where affine=False)."""
    c = int(m.running_mean.shape[0])
    gamma = _np(m.weight) if getattr(m, "weight", None) is not None else np.ones(c)
    beta = _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros(c)
    return batchnorm_affine(gamma, beta, _np(m.running_mean), _np(m.running_var), float(m.eps))


def bn_channels(m: nn.Module) -> int | None:
    rm = getattr(m, "running_mean", None)
    if rm is not None:
        return int(rm.shape[0])
    nf = getattr(m, "num_features", None)
    return int(nf) if nf is not None else None


def _np(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy (every supported dtype widens exactly)."""
    return t.detach().cpu().to(torch.float64).numpy()


@dataclass(frozen=True)
class ModuleInfo:
    """A recognised module under its canonical (first registered) name."""

    name: str
    module: nn.Module
    role: str  # "producer" | "batchnorm"
    kind: str  # conv | conv_transpose | linear | batchnorm | subclass | frozen

    @property
    def class_name(self) -> str:
        return type(self.module).__name__


def recognise(model: nn.Module) -> dict[int, ModuleInfo]:
    """Every producer and BatchNorm in ``model``, keyed by ``id(module)``."""
    found: dict[int, ModuleInfo] = {}
    for name, m in model.named_modules():
        kind = producer_kind(m)
        if kind is not None:
            found[id(m)] = ModuleInfo(name, m, "producer", kind)
            continue
        kind = bn_kind(m)
        if kind is not None:
            found[id(m)] = ModuleInfo(name, m, "batchnorm", kind)
    return found
