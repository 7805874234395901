"""float32/float16/bfloat16/float64: folded in float64, rounded once to the layer's dtype and device."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.affine import BFLOAT16, round_to_dtype  # noqa: E402
from tests.torch.models import Seq, randomize_bn  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _expected(model: Seq) -> tuple[np.ndarray, np.ndarray]:
    """An independent float64 fold (torch ops, not bnfold.affine): W·s per output channel, s·b + t."""
    conv, bn = model.producer, model.bn
    d = torch.float64
    s = bn.weight.detach().to(d) / torch.sqrt(bn.running_var.to(d) + bn.eps)
    t = bn.bias.detach().to(d) - s * bn.running_mean.to(d)
    w = conv.weight.detach().to(d) * s.view(-1, 1, 1, 1)
    b = s * conv.bias.detach().to(d) + t
    return w.cpu().numpy(), b.cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_rounded_once_dtype_device_requires_grad_buffers(dtype, device):
    torch.manual_seed(0)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 1).eval()
    model.register_buffer("extra", torch.arange(3.0))
    model = model.to(device=device, dtype=dtype)
    model.producer.weight.requires_grad_(False)
    exp_w, exp_b = _expected(model)

    folded, report = bnfold.fold_torch(model)
    assert report.folded == 1
    w, b = folded.producer.weight, folded.producer.bias
    assert w.dtype == dtype and b.dtype == dtype and w.device.type == device and b.device.type == device
    assert not w.requires_grad and b.requires_grad  # each parameter keeps its own flag
    assert torch.equal(folded.extra, model.extra)
    if dtype == torch.bfloat16:
        want_w = round_to_dtype(exp_w, BFLOAT16, "w")[0].view(np.int16)
        want_b = round_to_dtype(exp_b, BFLOAT16, "b")[0].view(np.int16)
        got_w = w.detach().cpu().view(torch.int16).numpy()
        got_b = b.detach().cpu().view(torch.int16).numpy()
    else:
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}[dtype]
        want_w, want_b = exp_w.astype(np_dtype), exp_b.astype(np_dtype)  # numpy rounds float64 once
        got_w, got_b = w.detach().cpu().numpy(), b.detach().cpu().numpy()
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_b, want_b)

    x = torch.randn(2, 3, 6, 6, device=device, dtype=dtype)
    with torch.no_grad():
        ya, yb = model(x).double(), folded(x).double()
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert float((ya - yb).abs().max()) <= tol * max(1.0, float(ya.abs().max()))


def test_bfloat16_bit_transfer_is_exact():
    from bnfold.torch.apply import to_torch

    values = np.array([1 + 2**-8 + 2**-30, -3.0e38, 1e-40, 0.1, -0.0])
    arr, _ = round_to_dtype(values, BFLOAT16, "v")
    t, _ = to_torch(values, torch.bfloat16, torch.device("cpu"), "v")
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.view(torch.int16).numpy(), arr.view(np.int16))
    assert float(t[0]) == 1 + 2**-7  # rounded once from float64, not through float32
