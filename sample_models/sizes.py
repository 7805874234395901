"""Benchmark-size models with the topologies of MobileNetV2, ShuffleNetV2 and Inception-v3 (no downloads).

Like `zoo.resnet50_size`, these rebuild the published architectures layer by layer with random
weights, so `benchmarks/fold_time.py` can time bnfold on the node counts and weight sizes real models
have (per-node overhead dominates small models, weight bytes dominate large ones) without fetching
anything. Every BatchNormalization gets non-default statistics (`zoo.random_bn_stats`, variances in
[0.5, 2] so that the per-layer gains do not compound to inf over ~50-100 layers). They are too big for
the test suite: build them in memory, do not commit them.

    mobilenet_v2_size     ~3.5 M parameters, 52 BN, depthwise 3x3, Clip (ReLU6), residual Add  (~14 MB)
    shufflenet_v2_size    ~2.3 M parameters, 56 BN, Split, Concat, channel shuffle via
                          Reshape/Transpose/Reshape                                           (~9 MB)
    inception_v3_size     ~23.8 M parameters, 94 BN, four-branch blocks joined by Concat,
                          1x7/7x1 and 1x3/3x1 kernels, AveragePool branches                   (~95 MB)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from sample_models.zoo import _bn, _bn_inits, _doc, _init, _model, _weight, random_bn_stats

__all__ = ["mobilenet_v2_size", "shufflenet_v2_size", "inception_v3_size", "SIZES"]

VAR_RANGE = (0.5, 2.0)


class _Builder:
    """Nodes and initializers of one network; `conv_bn` is the Conv → BN (→ activation) every one of them repeats."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._clip_bounds = False

    def conv_bn(
        self,
        name: str,
        x: str,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        pads: Sequence[int] | None = None,
        groups: int = 1,
        act: str | None = "relu",
        epsilon: float | None = None,
    ) -> str:
        """Conv (no bias, as torchvision exports these) → BatchNormalization → Relu / Clip(0, 6) / nothing."""
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        w = _weight(self.rng, (c_out, c_in // groups, kh, kw), (c_in // groups) * kh * kw, np.float32)
        self.inits.append(_init(f"{name}.weight", w))
        attrs: dict[str, object] = {"kernel_shape": [kh, kw], "pads": list(pads) if pads is not None else [kh // 2, kw // 2] * 2}
        if stride != 1:
            attrs["strides"] = [stride, stride]
        if groups != 1:
            attrs["group"] = groups
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.weight"], [f"{name}_out"], name=name, **attrs))
        names, bn_inits = _bn_inits(f"{name}.bn", random_bn_stats(c_out, self.rng, np.float32, VAR_RANGE))
        self.inits += bn_inits
        self.nodes.append(_bn(f"{name}.bn", f"{name}_out", f"{name}.bn_out", names, **({} if epsilon is None else {"epsilon": epsilon})))
        out = f"{name}.bn_out"
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [out], [f"{name}.relu_out"], name=f"{name}.relu"))
            return f"{name}.relu_out"
        if act == "relu6":  # torch exports ReLU6 as Clip(x, 0, 6) with constant bounds (opset ≥ 11)
            if not self._clip_bounds:
                self.inits += [_init("relu6.min", np.array(0.0, np.float32)), _init("relu6.max", np.array(6.0, np.float32))]
                self._clip_bounds = True
            self.nodes.append(helper.make_node("Clip", [out, "relu6.min", "relu6.max"], [f"{name}.clip_out"], name=f"{name}.clip"))
            return f"{name}.clip_out"
        return out

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, **attrs: object) -> list[str]:
        outs = [f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def const(self, name: str, values: Sequence[int]) -> str:
        self.inits.append(_init(name, np.array(values, np.int64)))
        return name

    def head(self, x: str, c: int, classes: int = 1000) -> None:
        """GlobalAveragePool → Flatten → Gemm, the classifier all three share."""
        (pooled,) = self.node("GlobalAveragePool", [x], "avgpool")
        (flat,) = self.node("Flatten", [pooled], "flatten", axis=1)
        self.inits.append(_init("fc.weight", _weight(self.rng, (classes, c), c, np.float32)))
        self.inits.append(_init("fc.bias", self.rng.normal(0, 0.01, classes).astype(np.float32)))
        self.nodes.append(helper.make_node("Gemm", [flat, "fc.weight", "fc.bias"], ["output"], name="fc", transB=1))

    def model(self, name: str, input_size: int, doc: str | None) -> onnx.ModelProto:
        return _model(name, self.nodes, [("input", TensorProto.FLOAT, (1, 3, input_size, input_size))], ["output"], self.inits, doc=_doc(doc))


# ----------------------------------------------------------------------------------------------
def mobilenet_v2_size(seed: int = 0, input_size: int = 224) -> onnx.ModelProto:
    """The MobileNetV2 topology (width 1.0: ~3.5 M parameters, 52 BNs) with random weights, for the benchmark.

    Stem 3x3/2 conv-bn-relu6 (32); 17 inverted residual blocks (t, c, n, s) = (1,16,1,1) (6,24,2,2)
    (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1): 1x1 expand-bn-relu6 (t > 1), 3x3 depthwise
    conv-bn-relu6, 1x1 project-bn, residual Add where stride 1 and widths match; 1x1 conv-bn-relu6 (1280);
    GlobalAveragePool, Flatten, Gemm 1000.
    """
    net = _Builder(seed)
    x = net.conv_bn("features.0", "input", 3, 32, 3, stride=2, act="relu6")
    c_in, k = 32, 1
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride = s if i == 0 else 1
            p, hidden = f"features.{k}", c_in * t
            y = x if t == 1 else net.conv_bn(f"{p}.expand", x, c_in, hidden, 1, act="relu6")
            y = net.conv_bn(f"{p}.dw", y, hidden, hidden, 3, stride=stride, groups=hidden, act="relu6")
            y = net.conv_bn(f"{p}.project", y, hidden, c, 1, act=None)
            if stride == 1 and c_in == c:
                (y,) = net.node("Add", [x, y], f"{p}.add")
            x, c_in, k = y, c, k + 1
    x = net.conv_bn(f"features.{k}", x, c_in, 1280, 1, act="relu6")
    net.head(x, 1280)
    return net.model("mobilenet_v2_size", input_size, mobilenet_v2_size.__doc__)


def shufflenet_v2_size(seed: int = 0, input_size: int = 224) -> onnx.ModelProto:
    """The ShuffleNetV2 x1.0 topology (~2.3 M parameters, 56 BNs) with random weights, for the benchmark.

    Stem 3x3/2 conv-bn-relu (24) + 3x3/2 MaxPool; stages of [4, 8, 4] units with widths 116/232/464.
    A stride-2 unit: branch 1 = depthwise 3x3/2-bn, 1x1-bn-relu; branch 2 = 1x1-bn-relu, depthwise
    3x3/2-bn, 1x1-bn-relu; Concat. A stride-1 unit Splits the input in two halves, runs branch 2 on the
    second, Concats. Each ends in the channel shuffle as torch exports it: Reshape [1, 2, C/2, H, W],
    Transpose (0, 2, 1, 3, 4), Reshape [1, C, H, W]. Then 1x1 conv-bn-relu (1024), GlobalAveragePool,
    Flatten, Gemm 1000.
    """
    net = _Builder(seed)
    x = net.conv_bn("conv1", "input", 3, 24, 3, stride=2)
    (x,) = net.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    size, c_in = input_size // 4, 24
    for stage, (units, c) in enumerate(zip((4, 8, 4), (116, 232, 464)), start=2):
        size //= 2
        half = c // 2
        for i in range(units):
            p = f"stage{stage}.{i}"
            if i == 0:
                a = net.conv_bn(f"{p}.branch1.0", x, c_in, c_in, 3, stride=2, groups=c_in, act=None)
                a = net.conv_bn(f"{p}.branch1.2", a, c_in, half, 1)
                b_in, b_c = x, c_in
            else:
                split = net.const(f"{p}.split", [half, half])
                a, b_in = net.node("Split", [x, split], f"{p}.split", n_out=2, axis=1)
                b_c = half
            b = net.conv_bn(f"{p}.branch2.0", b_in, b_c, half, 1)
            b = net.conv_bn(f"{p}.branch2.3", b, half, half, 3, stride=2 if i == 0 else 1, groups=half, act=None)
            b = net.conv_bn(f"{p}.branch2.5", b, half, half, 1)
            (y,) = net.node("Concat", [a, b], f"{p}.concat", axis=1)
            (y,) = net.node("Reshape", [y, net.const(f"{p}.shape5", [1, 2, half, size, size])], f"{p}.shuffle_reshape1")
            (y,) = net.node("Transpose", [y], f"{p}.shuffle_transpose", perm=[0, 2, 1, 3, 4])
            (x,) = net.node("Reshape", [y, net.const(f"{p}.shape4", [1, c, size, size])], f"{p}.shuffle_reshape2")
            c_in = c
    x = net.conv_bn("conv5", x, c_in, 1024, 1)
    net.head(x, 1024)
    return net.model("shufflenet_v2_size", input_size, shufflenet_v2_size.__doc__)


def inception_v3_size(seed: int = 0, input_size: int = 299) -> onnx.ModelProto:
    """The Inception-v3 topology (no aux head: ~23.8 M parameters, 94 BNs) with random weights, for the benchmark.

    Stem of five conv-bn-relu (BN epsilon 1e-3 throughout, as torchvision) and two 3x3/2 MaxPools;
    Mixed_5b..5d (InceptionA: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | AveragePool→1x1), Mixed_6a (InceptionB),
    Mixed_6b..6e (InceptionC: 1x7/7x1 factorised branches), Mixed_7a (InceptionD), Mixed_7b..7c
    (InceptionE: branches that split into a 1x3 and a 3x1 conv, themselves Concat'ed); every block
    joins its branches with a Concat on the channel axis. GlobalAveragePool, Flatten, Gemm 1000.
    """
    net = _Builder(seed)

    def cbr(name: str, x: str, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1, pad: bool = True) -> str:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        pads = [kh // 2, kw // 2] * 2 if pad else [0, 0, 0, 0]
        return net.conv_bn(name, x, c_in, c_out, (kh, kw), stride=stride, pads=pads, epsilon=1e-3)

    def pool(name: str, x: str, op: str, stride: int) -> str:
        pads = [1, 1, 1, 1] if op == "AveragePool" else [0, 0, 0, 0]
        extra = {"count_include_pad": 1} if op == "AveragePool" else {}
        return net.node(op, [x], name, kernel_shape=[3, 3], strides=[stride, stride], pads=pads, **extra)[0]

    def concat(name: str, parts: list[str]) -> str:
        return net.node("Concat", parts, name, axis=1)[0]

    x = cbr("Conv2d_1a_3x3", "input", 3, 32, 3, stride=2, pad=False)
    x = cbr("Conv2d_2a_3x3", x, 32, 32, 3, pad=False)
    x = cbr("Conv2d_2b_3x3", x, 32, 64, 3)
    x = pool("maxpool1", x, "MaxPool", 2)
    x = cbr("Conv2d_3b_1x1", x, 64, 80, 1)
    x = cbr("Conv2d_4a_3x3", x, 80, 192, 3, pad=False)
    x = pool("maxpool2", x, "MaxPool", 2)
    c = 192
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):  # InceptionA
        b1 = cbr(f"{name}.branch1x1", x, c, 64, 1)
        b5 = cbr(f"{name}.branch5x5_2", cbr(f"{name}.branch5x5_1", x, c, 48, 1), 48, 64, 5)
        b3 = cbr(f"{name}.branch3x3dbl_1", x, c, 64, 1)
        b3 = cbr(f"{name}.branch3x3dbl_3", cbr(f"{name}.branch3x3dbl_2", b3, 64, 96, 3), 96, 96, 3)
        bp = cbr(f"{name}.branch_pool", pool(f"{name}.avgpool", x, "AveragePool", 1), c, pool_features, 1)
        x, c = concat(f"{name}.concat", [b1, b5, b3, bp]), 224 + pool_features
    b3 = cbr("Mixed_6a.branch3x3", x, c, 384, 3, stride=2, pad=False)  # InceptionB
    bd = cbr("Mixed_6a.branch3x3dbl_2", cbr("Mixed_6a.branch3x3dbl_1", x, c, 64, 1), 64, 96, 3)
    bd = cbr("Mixed_6a.branch3x3dbl_3", bd, 96, 96, 3, stride=2, pad=False)
    x, c = concat("Mixed_6a.concat", [b3, bd, pool("Mixed_6a.maxpool", x, "MaxPool", 2)]), 384 + 96 + c
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):  # InceptionC
        b1 = cbr(f"{name}.branch1x1", x, c, 192, 1)
        b7 = cbr(f"{name}.branch7x7_1", x, c, c7, 1)
        b7 = cbr(f"{name}.branch7x7_3", cbr(f"{name}.branch7x7_2", b7, c7, c7, (1, 7)), c7, 192, (7, 1))
        bd = cbr(f"{name}.branch7x7dbl_1", x, c, c7, 1)
        for j, (k, c_out) in enumerate((((7, 1), c7), ((1, 7), c7), ((7, 1), c7), ((1, 7), 192)), start=2):
            bd = cbr(f"{name}.branch7x7dbl_{j}", bd, c7, c_out, k)
        bp = cbr(f"{name}.branch_pool", pool(f"{name}.avgpool", x, "AveragePool", 1), c, 192, 1)
        x, c = concat(f"{name}.concat", [b1, b7, bd, bp]), 768
    b3 = cbr("Mixed_7a.branch3x3_2", cbr("Mixed_7a.branch3x3_1", x, c, 192, 1), 192, 320, 3, stride=2, pad=False)  # InceptionD
    b7 = cbr("Mixed_7a.branch7x7x3_1", x, c, 192, 1)
    b7 = cbr("Mixed_7a.branch7x7x3_3", cbr("Mixed_7a.branch7x7x3_2", b7, 192, 192, (1, 7)), 192, 192, (7, 1))
    b7 = cbr("Mixed_7a.branch7x7x3_4", b7, 192, 192, 3, stride=2, pad=False)
    x, c = concat("Mixed_7a.concat", [b3, b7, pool("Mixed_7a.maxpool", x, "MaxPool", 2)]), 320 + 192 + c
    for name in ("Mixed_7b", "Mixed_7c"):  # InceptionE
        b1 = cbr(f"{name}.branch1x1", x, c, 320, 1)
        b3 = cbr(f"{name}.branch3x3_1", x, c, 384, 1)
        b3 = concat(f"{name}.branch3x3", [cbr(f"{name}.branch3x3_2a", b3, 384, 384, (1, 3)), cbr(f"{name}.branch3x3_2b", b3, 384, 384, (3, 1))])
        bd = cbr(f"{name}.branch3x3dbl_2", cbr(f"{name}.branch3x3dbl_1", x, c, 448, 1), 448, 384, 3)
        bd = concat(f"{name}.branch3x3dbl", [cbr(f"{name}.branch3x3dbl_3a", bd, 384, 384, (1, 3)), cbr(f"{name}.branch3x3dbl_3b", bd, 384, 384, (3, 1))])
        bp = cbr(f"{name}.branch_pool", pool(f"{name}.avgpool", x, "AveragePool", 1), c, 192, 1)
        x, c = concat(f"{name}.concat", [b1, b3, bd, bp]), 2048
    net.head(x, c)
    return net.model("inception_v3_size", input_size, inception_v3_size.__doc__)


def _resnet50_size(seed: int = 0) -> onnx.ModelProto:
    from sample_models.zoo import resnet50_size

    return resnet50_size(seed=seed)


SIZES = {
    "mobilenet_v2": mobilenet_v2_size,
    "shufflenet_v2": shufflenet_v2_size,
    "resnet50": _resnet50_size,
    "inception_v3": inception_v3_size,
}
"""The benchmark's models by short name, smallest file first (`benchmarks/fold_time.py --models`)."""
