"""Small PyTorch models and helpers for the fold_torch tests, built at test time."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics that hide no bug: negative γ, variances 1e-4..1e2, non-zero means."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        rm = getattr(m, "running_mean", None)
        if not isinstance(rm, torch.Tensor):
            continue
        c = rm.shape[0]
        with torch.no_grad():
            m.running_mean.copy_(torch.randn(c, generator=gen) * 2)
            m.running_var.copy_(torch.exp(torch.empty(c).uniform_(-9.2, 4.6, generator=gen)))
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                g = torch.randn(c, generator=gen) * 1.5
                g[0] = -g[0].abs() - 0.5
                m.weight.copy_(g)
                m.bias.copy_(torch.randn(c, generator=gen))
    return model


def outputs_close(a: nn.Module, b: nn.Module, *args, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Max abs difference; asserts it is float32 noise relative to the output's magnitude."""
    with torch.no_grad():
        ya, yb = a(*args), b(*args)
    scale = float(ya.abs().max())
    diff = float((ya.double() - yb.double()).abs().max())
    assert diff <= atol * max(1.0, scale) + rtol * scale, f"outputs differ by {diff} (scale {scale})"
    return diff


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


class Seq(nn.Module):
    """producer → BatchNorm → (optional tail), a user class with its own attribute and method."""

    def __init__(self, producer: nn.Module, bn: nn.Module, tail: nn.Module | None = None) -> None:
        super().__init__()
        self.producer = producer
        self.bn = bn
        self.tail = tail if tail is not None else nn.Identity()
        self.tag = "mine"

    def describe(self) -> str:
        return f"Seq({self.tag})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.bn(self.producer(x)))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, written out (torchvision is not a dependency)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class FakeFrozen(FrozenBatchNorm2d):
    """Same buffers, but ignores the statistics: must not be taken for a BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class ShapeBranch(nn.Module):
    """Branches on the input's shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, groups=2)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = x * 0.5
        y = F.relu(self.bn(self.conv(x)))
        return self.bn2(self.conv2(y))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class TinyResNet(nn.Module):
    """ResNet-style: stem conv+BN, basic blocks with downsample branches, pooled Linear head."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def bn_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if "BatchNorm" in type(m).__name__)


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights are torch's; random BN statistics; eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(model, seed).eval()


def deep(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
