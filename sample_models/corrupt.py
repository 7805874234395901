"""Wrong folds on purpose: a verification is only worth something if it fails these.

Torch-free; used by `tests/test_verify_deep.py` and `benchmarks/verify_noise.py`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["conv_weights", "scale_channel"]


def conv_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the initializers that are Conv weights, in graph order (each once)."""
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = []
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits and n.input[1] not in names:
            names.append(n.input[1])
    return names


def scale_channel(model: onnx.ModelProto, weight: str, channel: int = 0, factor: float = 1.001) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``weight`` has output channel ``channel`` (axis 0) times
    ``factor``, in its own dtype: a 0.1 % error in one channel of one layer, the smallest mistake a
    fold could plausibly make (one wrong scale)."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    t = next(t for t in bad.graph.initializer if t.name == weight)
    w = numpy_helper.to_array(t).copy()
    w[channel] = (w[channel].astype(np.float64) * factor).astype(w.dtype)
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    return bad
