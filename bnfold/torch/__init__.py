"""The PyTorch front-end: fold BatchNorm modules into the Conv/ConvTranspose/Linear modules feeding them.

Never imported by the ONNX path (`bnfold.onnx` does not import torch).
"""

from __future__ import annotations

from bnfold.torch.api import fold_torch

__all__ = ["fold_torch"]
