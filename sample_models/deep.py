"""Small but deep PyTorch networks with trained-like BatchNorm statistics, and their ONNX exports.

Why these exist: the other samples are shallow and tame (every BN's output has a scale near 1), and on
those a correct float32 fold differs from the original by ~1e-7 of the output's scale. Real exported
networks (timm, ultralytics, torchvision) are 30-100 layers deep and their BatchNorms hold statistics
that training left behind — variances down to 1e-8, negative γ, means far from zero — and there a
*correct* fold differs by 1e-5..3e-4, as much as onnxruntime's own optimised graph of the original does.
Verification has to tell right from wrong on networks like these, so the tests need some.

Four architectures, each 30+ layers, input ``input`` of shape [1, 3, 32, 32] (a few ms per run):

- ``resnet``: conv-BN-ReLU stem, 8 basic residual blocks (two with a strided 1x1 conv-BN shortcut),
  global average pool, BatchNorm1d, Linear head.
- ``mobilenet``: inverted residual blocks (1x1 expand, 3x3 *depthwise*, 1x1 project, each with BN),
  Hardswish head conv, Linear classifier.
- ``detector``: a YOLO-like backbone of conv-BN-SiLU with a C2f-style split/concat, an upsampling neck,
  and a head whose two outputs are raw convolutions (``boxes`` scaled by the stride, ``scores`` as
  logits): *unbounded* outputs, like a detection head's.
- ``levit``: a LeViT-like attention network: conv-BN-Hardswish patch embedding, then attention and MLP
  blocks whose Linears are followed by a ``BatchNorm1d`` over tokens (``bn(x.flatten(0, 1)).reshape_as(x)``).

`trained_like` gives every BN statistics like those of a trained network, without training: it
calibrates the running statistics on random batches in train mode (so every BN normalises what it
actually sees), then redraws each variance log-uniform in [1e-8, 10], flips the sign of about a quarter
of the γ, and shifts each mean by ``N(0, 30²)`` standard deviations of what the BN sees (the cancellation
that makes real networks' float32 noise reach 1e-5 of the output's scale) — and folds each change into γ and β so
that the network still computes a sensible, finite function (``γ' = ±γ·√(v'+ε)/√(v+ε)``,
``β' = β + γ'·δ/√(v'+ε)``). Deterministic for a seed.

`export_torchscript` and `export_dynamo` write the ONNX files with the BatchNorms still in them
(TorchScript: ``do_constant_folding=False``, ``training=PRESERVE`` on an eval-mode model; dynamo:
``optimize=False``, since its default optimiser fuses plain Conv+BN itself). `export_all(folder)` writes
every network with both exporters; ``python -m sample_models.deep FOLDER`` does the same.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["NETS", "INPUT_SHAPE", "build", "trained_like", "export_torchscript", "export_dynamo", "export_all"]

INPUT_SHAPE = (1, 3, 32, 32)
SHIFT = 30.0  # scale of the mean shift, in standard deviations of what the BN sees (see trained_like)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# -- ResNet ---------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 3, stride), _conv_bn(cout, cout, 3, act=None))
        self.short = _conv_bn(cin, cout, 1, stride, act=None) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class DeepResNet(nn.Module):
    """17 conv-BN pairs on the main path, 2 on shortcuts, BatchNorm1d + Linear head: 40 layers."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = _conv_bn(3, w)
        self.blocks = nn.Sequential(
            BasicBlock(w, w), BasicBlock(w, w), BasicBlock(w, w),
            BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w), BasicBlock(2 * w, 2 * w),
            BasicBlock(2 * w, 2 * w, 2), BasicBlock(2 * w, 2 * w),
        )
        self.head_bn, self.fc = nn.BatchNorm1d(2 * w), nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x)).mean((2, 3))
        return self.fc(self.head_bn(x))


# -- MobileNet ------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            _conv_bn(cin, mid, 1, act=nn.ReLU6),
            _conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU6),  # depthwise
            _conv_bn(mid, cout, 1, act=None),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class DeepMobileNet(nn.Module):
    """Stem, 7 inverted residual blocks (21 conv-BN), a 1x1 head conv-BN: 23 conv-BN pairs, 46+ layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, 2, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16), InvertedResidual(16, 16), InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24), InvertedResidual(24, 24), InvertedResidual(24, 32, 2),
            InvertedResidual(32, 32),
        )
        self.head = _conv_bn(32, 64, 1, act=nn.Hardswish)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


# -- Detector -------------------------------------------------------------------------------------
class C2f(nn.Module):
    """ultralytics' C2f, reduced: 1x1 conv-BN-SiLU, split in two, n bottlenecks on one half, concat all, 1x1."""

    def __init__(self, cin: int, cout: int, n: int = 2) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = _conv_bn(cin, 2 * self.c, 1, act=nn.SiLU)
        self.m = nn.ModuleList(nn.Sequential(_conv_bn(self.c, self.c, 3, act=nn.SiLU), _conv_bn(self.c, self.c, 3, act=nn.SiLU)) for _ in range(n))
        self.cv2 = _conv_bn((2 + n) * self.c, cout, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            ys.append(ys[-1] + m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class DeepDetector(nn.Module):
    """YOLO-like: backbone (stride 8 and 16 features), upsampling neck, and per-scale heads whose last
    1x1 convs are the outputs: ``boxes`` (×stride, like a decoded regression) and ``scores`` (logits)."""

    def __init__(self, classes: int = 5, reg: int = 4) -> None:
        super().__init__()
        self.b1 = nn.Sequential(_conv_bn(3, 16, 3, 2, act=nn.SiLU), _conv_bn(16, 32, 3, 2, act=nn.SiLU), C2f(32, 32))
        self.b2 = nn.Sequential(_conv_bn(32, 48, 3, 2, act=nn.SiLU), C2f(48, 48))
        self.b3 = nn.Sequential(_conv_bn(48, 64, 3, 2, act=nn.SiLU), C2f(64, 64))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.n1 = C2f(64 + 48, 48, n=1)
        self.box = nn.ModuleList(nn.Sequential(_conv_bn(c, 32, 3, act=nn.SiLU), _conv_bn(32, 32, 3, act=nn.SiLU), nn.Conv2d(32, reg, 1)) for c in (48, 64))
        self.cls = nn.ModuleList(nn.Sequential(_conv_bn(c, 32, 3, act=nn.SiLU), nn.Conv2d(32, classes, 1)) for c in (48, 64))
        self.strides = (8.0, 16.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.b2(self.b1(x))
        p4 = self.b3(p3)
        p3 = self.n1(torch.cat([self.up(p4), p3], 1))
        boxes = torch.cat([(self.box[i](f) * s).flatten(2) for i, (f, s) in enumerate(zip((p3, p4), self.strides))], 2)
        scores = torch.cat([self.cls[i](f).flatten(2) for i, f in enumerate((p3, p4))], 2)
        return boxes, scores


# -- LeViT-like attention -------------------------------------------------------------------------
class LinearBN(nn.Module):
    """LeViT's Linear_BN: a bias-free Linear, then BatchNorm1d over every token (``[N·L, C]``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.l, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.l(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2, key: int = 8) -> None:
        super().__init__()
        self.heads, self.key, self.scale = heads, key, key**-0.5
        self.qkv = LinearBN(dim, heads * 3 * key)
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(heads * key, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).view(n, length, self.heads, 3, self.key).permute(3, 0, 2, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, length, self.heads * self.key))


class DeepLeViT(nn.Module):
    """Patch embedding (3 conv-BN-Hardswish, stride 8), 4 attention + MLP blocks with LinearBN (16 LinearBN),
    BatchNorm1d + Linear head: 40+ layers."""

    def __init__(self, dim: int = 32, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Sequential(_conv_bn(3, 8, 3, 2, act=nn.Hardswish), _conv_bn(8, 16, 3, 2, act=nn.Hardswish), _conv_bn(16, dim, 3, 2, act=None))
        self.attn = nn.ModuleList(Attention(dim) for _ in range(blocks))
        self.mlp = nn.ModuleList(nn.Sequential(LinearBN(dim, 2 * dim), nn.Hardswish(), LinearBN(2 * dim, dim)) for _ in range(blocks))
        self.head_bn, self.fc = nn.BatchNorm1d(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # [N, L, C]
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x)
            x = x + mlp(x)
        return self.fc(self.head_bn(x.mean(1)))


NETS: dict[str, Callable[[], nn.Module]] = {
    "resnet": DeepResNet,
    "mobilenet": DeepMobileNet,
    "detector": DeepDetector,
    "levit": DeepLeViT,
}

OUTPUT_NAMES: dict[str, list[str]] = {"detector": ["boxes", "scores"]}


# -- statistics -----------------------------------------------------------------------------------
@torch.no_grad()
def trained_like(net: nn.Module, seed: int = 0, batches: int = 4, batch_size: int = 8, min_var: float = 1e-8) -> nn.Module:
    """Give every BatchNorm trained-like statistics (see the module docstring); returns ``net`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():  # weights and γ/β off their defaults, so that no layer is an identity
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (m.weight.std() + 1e-3))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.copy_(torch.empty(m.num_features).uniform_(0.5, 1.5, generator=g))
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    for _ in range(batches):
        net(torch.randn((batch_size, *INPUT_SHAPE[1:]), generator=g))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
            c, eps = m.num_features, m.eps
            var, mean = m.running_var.clone(), m.running_mean.clone()
            new_var = torch.exp(torch.empty(c).uniform_(float(torch.log(torch.tensor(min_var))), float(torch.log(torch.tensor(10.0))), generator=g))
            sign = torch.where(torch.rand(c, generator=g) < 0.25, -1.0, 1.0)
            shift = torch.randn(c, generator=g) * SHIFT * var.sqrt()
            gamma = sign * m.weight * torch.sqrt(new_var + eps) / torch.sqrt(var + eps)
            m.running_var.copy_(new_var)
            m.running_mean.copy_(mean + shift)
            m.weight.copy_(gamma)
            m.bias.add_(gamma * shift / torch.sqrt(new_var + eps))
    return net.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Network ``name`` with trained-like statistics, in eval mode, and a seeded example input."""
    torch.manual_seed(seed)
    net = trained_like(NETS[name](), seed)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    return net, x


# -- export ---------------------------------------------------------------------------------------
def export_torchscript(net: nn.Module, x: torch.Tensor, path: str | os.PathLike[str], outputs: list[str] | None = None) -> Path:
    """TorchScript exporter, BatchNorms kept (no constant folding, training mode preserved = eval)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (x,), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=outputs,
                          opset_version=17)
    return Path(path)


def export_dynamo(net: nn.Module, x: torch.Tensor, path: str | os.PathLike[str], outputs: list[str] | None = None) -> Path:
    """Dynamo exporter without its optimiser (which would fuse plain Conv+BN itself)."""
    quiet = logging.getLogger("torch.onnx")  # it logs one line per torchvision op it cannot register
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net.eval(), (x,), str(path), dynamo=True, optimize=False, verbose=False,
                              input_names=["input"], output_names=outputs)
    finally:
        quiet.setLevel(level)
    return Path(path)


EXPORTERS: dict[str, Callable[..., Path]] = {"torchscript": export_torchscript, "dynamo": export_dynamo}


def export(name: str, exporter: str, folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build network ``name`` and write ``FOLDER/deep_{name}_{exporter}.onnx``."""
    net, x = build(name, seed)
    path = Path(folder) / f"deep_{name}_{exporter}.onnx"
    return EXPORTERS[exporter](net, x, path, OUTPUT_NAMES.get(name))


def export_all(folder: str | os.PathLike[str], seed: int = 0) -> list[Path]:
    """Every network with both exporters."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [export(n, e, folder, seed) for n in NETS for e in EXPORTERS]


if __name__ == "__main__":
    import sys

    for p in export_all(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
