"""Small modules reproducing how libraries hide BatchNorms (timm, LeViT, MixNet, RepVGG, DenseNet).

Nothing is downloaded and timm is not imported: `BatchNormAct2d` is a minimal faithful copy of timm's
``layers/norm_act.py`` class (a ``nn.BatchNorm2d`` subclass whose forward is torch's BatchNorm forward
cut and pasted, then ``self.drop`` and ``self.act``). `trained_like` gives statistics like a trained
network's: calibrated on random batches, then variances redrawn log-uniform down to 1e-8 and some γ
negative, γ rescaled so that the function stays what calibration made it (finite at any depth).
`count_batchnorm_ops` counts the BatchNorm ops that actually run, at the dispatch level.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode


# ---------------------------------------------------------------------------------------------
# timm's BatchNormAct2d (layers/norm_act.py), minimal and faithful
# ---------------------------------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + activation, inheriting from BatchNorm2d so trained weights load unchanged (as timm)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if (act_layer is not None and apply_act) else nn.Identity()

    def forward(self, x):
        # cut & paste of torch.nn.BatchNorm2d.forward, as timm does
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class ConvBnAct(nn.Module):
    """timm's ConvNormAct: conv, then a BatchNormAct2d."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=True, act_layer=nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=act, act_layer=act_layer)

    def forward(self, x):
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    def __init__(self, c, rd):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, rd, 1)
        self.conv_expand = nn.Conv2d(rd, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(s))))


class InvertedResidual(nn.Module):
    """EfficientNet's MBConv: expand, depthwise, SE, project (no act), residual."""

    def __init__(self, cin, cout, expand=4, stride=1):
        super().__init__()
        mid = cin * expand
        self.conv_pw = ConvBnAct(cin, mid, 1)
        self.conv_dw = ConvBnAct(mid, mid, 3, stride, groups=mid)
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.conv_pwl = ConvBnAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + y if self.residual else y


class EfficientNetLike(nn.Module):
    """Stem, MBConv blocks, head conv, pooled classifier: every BatchNorm a BatchNormAct2d."""

    def __init__(self, width=8, blocks=4, classes=5):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(width, act_layer=nn.SiLU)
        layers = [InvertedResidual(width, width, stride=1 if i % 2 else 2) if i == 0 else InvertedResidual(width, width) for i in range(blocks)]
        self.blocks = nn.Sequential(*layers)
        self.conv_head = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn2 = BatchNormAct2d(4 * width, act_layer=nn.SiLU)
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# LeViT: token BatchNorm through flatten(0, 1), BatchNorm → Linear head
# ---------------------------------------------------------------------------------------------
class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: Linear, then BatchNorm1d over the flattened tokens."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """timm LeViT's head: BatchNorm1d, dropout, Linear."""

    def __init__(self, cin, cout, drop=0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class LeViTLike(nn.Module):
    """Conv stem (conv+BN), tokens, LinearNorm MLP with a residual, mean-pooled NormLinear head."""

    def __init__(self, dim=16, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim))
        self.ln1 = LinearNorm(dim, 2 * dim)
        self.ln2 = LinearNorm(2 * dim, dim)
        self.head = NormLinear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)  # [B, N, C]
        x = x + self.ln2(F.hardswish(self.ln1(x)))
        return self.head(x.mean(1))


# ---------------------------------------------------------------------------------------------
# MixNet: concat of convs → BatchNorm; BN2d → flatten → Linear head
# ---------------------------------------------------------------------------------------------
class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: split the channels, one conv per split (different kernels), concatenate."""

    def __init__(self, cin, cout, kernels=(3, 5, 7)):
        super().__init__()
        n = len(kernels)
        self.splits_in = [cin // n + (1 if i < cin % n else 0) for i in range(n)]
        splits_out = [cout // n + (1 if i < cout % n else 0) for i in range(n)]
        for i, (k, ci, co) in enumerate(zip(kernels, self.splits_in, splits_out)):
            self.add_module(str(i), nn.Conv2d(ci, co, k, padding=k // 2, bias=False))

    def forward(self, x):
        parts = torch.split(x, self.splits_in, 1)
        return torch.cat([c(parts[i]) for i, c in enumerate(self.values())], 1)


class MixNetLike(nn.Module):
    def __init__(self, c=12, classes=5):
        super().__init__()
        self.stem = ConvBnAct(3, c, 3, 2)
        self.mix = MixedConv2d(c, 2 * c)
        self.bn = BatchNormAct2d(2 * c, act_layer=nn.ReLU)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head_bn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c * 4, classes)

    def forward(self, x):
        x = self.pool(self.bn(self.mix(self.stem(x))))
        return self.fc(torch.flatten(self.head_bn(x), 1))  # BN2d → flatten → Linear: into the consumer


# ---------------------------------------------------------------------------------------------
# What must be left, each with a reason
# ---------------------------------------------------------------------------------------------
class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: conv3x3+BN + conv1x1+BN + a bare BN identity branch."""

    def __init__(self, c):
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_kxk = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.conv_1x1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(self.conv_kxk(x) + self.conv_1x1(x) + self.identity(x))


class RepVGGLike(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = ConvBnAct(3, c, 3, 2, act_layer=nn.ReLU)
        self.block = RepVGGBlock(c)

    def forward(self, x):
        return self.block(self.stem(x))


class DenseLayer(nn.Module):
    """DenseNet: BN → ReLU → 1×1 conv over the concatenation of every earlier feature map."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = self.norm1(torch.cat(features, 1))
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(x)))))


class DenseNetLike(nn.Module):
    def __init__(self, c=8, growth=4, layers=3):
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 3, 2, 1, bias=False)
        self.norm0 = nn.BatchNorm2d(c)
        self.layers = nn.ModuleList(DenseLayer(c + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [F.max_pool2d(F.relu(self.norm0(self.conv0(x))), 2)]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class PreActPaddedConv(nn.Module):
    """BN after an activation, before a padded conv (left: padding) and before an unpadded one (folds)."""

    def __init__(self, c=6):
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 3)
        self.bn_padded = nn.BatchNorm2d(c)
        self.conv_padded = nn.Conv2d(c, c, 3, padding=1)
        self.bn_valid = nn.BatchNorm2d(c)
        self.conv_valid = nn.Conv2d(c, c, 3, groups=2)

    def forward(self, x):
        x = self.conv_padded(self.bn_padded(F.relu(self.conv0(x))))
        return self.conv_valid(self.bn_valid(F.relu(x)))


class FunctionalNorm(nn.Module):
    """A module that is not a BatchNorm calling F.batch_norm with buffers of its own (left, counted)."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3)
        self.register_buffer("mu", torch.randn(c))
        self.register_buffer("var", torch.rand(c) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mu, self.var, training=False, eps=1e-3)


# ---------------------------------------------------------------------------------------------
# Statistics and counting
# ---------------------------------------------------------------------------------------------
def trained_like(model: nn.Module, *input_shapes: tuple[int, ...], seed: int = 0, batches: int = 3) -> nn.Module:
    """Statistics like a trained network's, with outputs that stay finite at any depth.

    Calibrate running statistics on random batches in train mode (cumulative average), then per
    channel redraw σ² log-uniform in [1e-8, 10], make ~1/4 of γ negative and rescale γ by
    √(σ²_new+ε)/√(σ²_cal+ε) so each channel's scale γ/√(σ²+ε) stays what calibration gave (up to sign):
    the function stays well-conditioned while the stored values are as extreme as trained ones.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.8 + 0.6)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
        model.train()
        for _ in range(batches):
            model(*[torch.randn(*s, generator=gen) for s in input_shapes])
        for m in bns:
            c = m.num_features
            var_cal = m.running_var.clone()
            var_new = torch.exp(torch.empty(c, dtype=torch.float64).uniform_(math.log(1e-8), math.log(10.0), generator=gen)).float()
            sign = torch.where(torch.rand(c, generator=gen) < 0.25, -1.0, 1.0)
            sign[0] = -1.0
            m.running_var.copy_(var_new)
            if m.affine:
                m.weight.mul_(sign * torch.sqrt(var_new + m.eps) / torch.sqrt(var_cal + m.eps))
            m.momentum = 0.1
    return model.eval()


class _CountBatchNorm(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "batch_norm" in func.__name__:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_batchnorm_ops(model, *args) -> int:
    """BatchNorm ops that actually run in ``model(*args)``, counted at the dispatch level (aten)."""
    with torch.no_grad(), _CountBatchNorm() as counter:
        model(*args)
    return counter.count


class ConcatReused(nn.Module):
    """cat of two convs → BN, but one conv's output is also used elsewhere: the slice fold would change it."""

    def __init__(self, c=4):
        super().__init__()
        self.conv_a = nn.Conv2d(3, c, 3, padding=1)
        self.conv_b = nn.Conv2d(3, c, 1)
        self.bn = nn.BatchNorm2d(2 * c)

    def forward(self, x):
        a = self.conv_a(x)
        y = self.bn(torch.cat([a, self.conv_b(x)], 1))
        return y[:, :4] + a


class DeepPlain(nn.Module):
    """A deep conv-BN-ReLU stack with residuals: the noise of a correct float32 fold grows with depth."""

    def __init__(self, c=16, depth=40):
        super().__init__()
        self.stem = ConvBnAct(3, c, 3, act_layer=nn.ReLU)
        self.layers = nn.ModuleList(ConvBnAct(c, c, 3, act_layer=nn.ReLU) for _ in range(depth))

    def forward(self, x):
        x = self.stem(x)
        for i, layer in enumerate(self.layers):
            x = layer(x) + x if i % 2 else layer(x)
        return x
