"""Write the small sample models of `sample_models/zoo.py` as .onnx files (each well under 200 KB).

    python sample_models/make_samples.py [--out sample_models]

Deterministic: every model comes from a fixed seed, so running this twice gives byte-identical files
(tests/test_samples.py checks the committed files against a fresh run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

if __package__ in (None, ""):  # run as a script: make `sample_models` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sample_models import zoo  # noqa: E402

SAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet_tiny.onnx": lambda: zoo.resnet_tiny(seed=0),
    "conv_bn.onnx": lambda: zoo.conv_bn(dims=2, groups=1, bias=True, seed=0),
    "depthwise_conv_bn.onnx": lambda: zoo.depthwise_conv_bn(dims=2, bias=False, seed=0),
    "conv_transpose_grouped_bn.onnx": lambda: zoo.conv_transpose_bn(dims=2, groups=2, bias=True, seed=0),
    "gemm_bn.onnx": lambda: zoo.gemm_bn(alpha=0.5, beta=2.0, trans_a=0, trans_b=1, c_shape="1N", seed=0),
    "matmul_add_bn.onnx": lambda: zoo.matmul_bn(with_add_bias=True, seed=0),
    "conv_bn_fp16.onnx": lambda: zoo.conv_bn(dims=2, groups=1, bias=True, dtype=np.float16, seed=0),
    "shared_weight_conv_bn.onnx": lambda: zoo.shared_weight_conv_bn(seed=0),
    "unfoldable.onnx": lambda: zoo.unfoldable(seed=0),
}
"""File name → builder. Keep sample_models/README.md's table in step with this."""

MAX_BYTES = 200 * 1024


def write_samples(out: str | Path) -> list[Path]:
    """Write every sample into ``out`` (created if needed); return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in SAMPLES.items():
        data = build().SerializeToString()
        if len(data) > MAX_BYTES:
            raise RuntimeError(f"{name}: {len(data)} bytes, over the {MAX_BYTES}-byte limit for committed samples")
        path = out / name
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder to write into (default: sample_models/)")
    args = parser.parse_args(argv)
    for path in write_samples(args.out):
        print(f"{path}  {path.stat().st_size:>7} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
