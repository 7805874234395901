"""Eager CPU latency: the original, `bnfold.fold_torch`'s fold, and `torch.fx.experimental.optimization.fuse`.

Models are built here, nothing is downloaded, torchvision is not needed:

* ``resnet50``: Bottleneck blocks [3, 4, 6, 3], ~25.6M parameters, 53 BatchNorm2d;
* ``efficientnet``: MBConv blocks whose BatchNorms are timm-style ``BatchNormAct2d`` (a BatchNorm2d
  subclass with its own forward; `sample_models/torch_library.py`): fx ``fuse`` matches only
  Conv→BatchNorm module pairs, so it folds none of them.

fx ``fuse`` is timed where fx can trace the model (it returns an ``fx.GraphModule``, not the user's
class). The models run interleaved (A B C A B C …) after a warm-up, so drifting clocks and caches hit
all alike; the thread count is fixed and printed. Prints the config and a Markdown table of medians
with p10/p90, and bnfold's median against fx fuse's. A script, not a timed test.

    python benchmarks/torch_eager.py                # resnet50, batch 1, 224×224, 30 runs each, 2 threads
    python benchmarks/torch_eager.py --model efficientnet --repeats 10 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(seed: int) -> nn.Module:
    """ResNet-50 with non-trivial BatchNorm statistics (moderate, so 50 layers stay finite)."""
    torch.manual_seed(seed)
    model = ResNet50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.randn(c) * 0.2 + 0.5)
                m.bias.copy_(torch.randn(c) * 0.1)
                m.running_mean.copy_(torch.randn(c) * 0.1)
                m.running_var.copy_(torch.rand(c) + 0.5)
    return model.eval()


def build_efficientnet(seed: int) -> nn.Module:
    """An EfficientNet-like net of timm-style BatchNormAct2d layers with trained-like statistics."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sample_models.torch_library import EfficientNetLike, trained_like

    torch.manual_seed(seed)
    return trained_like(EfficientNetLike(width=32, blocks=8, classes=1000), (2, 3, 64, 64), seed=seed)


def fx_fuse(model: nn.Module) -> tuple[nn.Module | None, str]:
    """``torch.fx.experimental.optimization.fuse`` on a copy, or None and why fx cannot."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model, inplace=False)
    except Exception as exc:  # fx cannot trace the forward
        return None, f"fx fuse failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return fused, f"fx fuse: returns {type(fused).__name__}"


def batchnorm_ops(model: nn.Module, x: torch.Tensor) -> int:
    """BatchNorm ops that run in ``model(x)``, counted at the dispatch level."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "batch_norm" in func.__name__:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Count():
        model(x)
    return Count.n


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("resnet50", "efficientnet"), default="resnet50")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=30, help="timed runs of each model")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs of each model first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import bnfold

    torch.set_num_threads(args.threads)
    original = build(args.seed) if args.model == "resnet50" else build_efficientnet(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size)
    folded, report = bnfold.fold_torch(original, (x,))
    fused, fuse_words = fx_fuse(original)
    with torch.inference_mode():
        ref = original(x)
        got = folded(x)
    max_diff = float((ref - got).abs().max())
    scale = float(ref.abs().max())

    models = {"original": original, "bnfold": folded}
    if fused is not None:
        models["fx fuse"] = fused
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for m in models.values():
                m(x)
        for _ in range(args.repeats):
            for name, m in models.items():  # interleaved: A B C A B C …
                t0 = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - t0) * 1e3)

    params = sum(p.numel() for p in original.parameters())
    print("## Config\n")
    print(f"- model: {args.model} built in the script, {params / 1e6:.2f}M parameters, {report.found} BatchNorm calls")
    print(f"- bnfold: {report.folded} folded, {report.left} left, {report.seconds:.2f}s ({report.analysis}), class {type(folded).__name__}")
    print(f"- {fuse_words}" + (f", {batchnorm_ops(fused, x)} BatchNorm ops still run" if fused is not None else ""))
    print(f"- BatchNorm ops that run: original {batchnorm_ops(original, x)}, bnfold {batchnorm_ops(folded, x)}")
    print(f"- input: {args.batch}×3×{args.size}×{args.size} float32, eager, torch.inference_mode()")
    print(f"- torch {torch.__version__}, threads {torch.get_num_threads()} (torch.set_num_threads), "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"- runs: {args.warmup} warm-up + {args.repeats} timed per model, interleaved")
    print(f"- bnfold vs original output: max abs diff {max_diff:.3g} (output max {scale:.3g})\n")
    print("| model | median ms | p10 ms | p90 ms |")
    print("|---|---:|---:|---:|")
    for name in models:
        t = times[name]
        print(f"| {name} | {statistics.median(t):.2f} | {percentile(t, 0.1):.2f} | {percentile(t, 0.9):.2f} |")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nspeed-up over the original (median): bnfold {med['original'] / med['bnfold']:.2f}×"
          + (f", fx fuse {med['original'] / med['fx fuse']:.2f}×" if "fx fuse" in med else ""))
    if "fx fuse" in med:
        print(f"bnfold median / fx fuse median: {med['bnfold'] / med['fx fuse']:.3f} (≤ 1: bnfold's fold is not slower)")

if __name__ == "__main__":
    main()
