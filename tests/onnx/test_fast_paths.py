"""The planner's fast paths give exactly what the general code gives.

`constants._values` reads plain inline data itself instead of through `onnx.numpy_helper.to_array`.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from bnfold.onnx import constants

def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 1)])
def test_values_of_inline_raw_data_equal_to_array(dtype, shape) -> None:
    array = (np.arange(int(np.prod(shape))) - 2).astype(dtype).reshape(shape)
    proto = onnx.numpy_helper.from_array(array, "t")
    assert proto.HasField("raw_data")
    got = constants._values(gs.Constant("t", gs.ir.tensor.LazyValues(proto)))
    want = onnx.numpy_helper.to_array(proto)
    assert same_bits(got, want)


def test_values_of_other_encodings_still_go_through_onnx() -> None:
    as_floats = onnx.helper.make_tensor("f", onnx.TensorProto.FLOAT, [2], [1.5, -2.0])  # float_data, not raw
    assert not as_floats.HasField("raw_data")
    assert same_bits(constants._values(gs.Constant("f", gs.ir.tensor.LazyValues(as_floats))), np.array([1.5, -2.0], np.float32))
    import ml_dtypes

    bf16 = onnx.numpy_helper.from_array(np.array([1.0, -3.0], ml_dtypes.bfloat16), "b")
    got = constants._values(gs.Constant("b", gs.ir.tensor.LazyValues(bf16)))
    assert got.dtype == ml_dtypes.bfloat16 and got.tolist() == [1.0, -3.0]
