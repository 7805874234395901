"""Each producer folds exactly: Conv/ConvTranspose 1-3d (groups, with and without bias), Linear, BN kinds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.report import Status  # noqa: E402
from tests.torch.models import (  # noqa: E402
    FrozenBatchNorm2d,
    Seq,
    assert_untouched,
    outputs_close,
    randomize_bn,
    snapshot,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 3)}


def _fold_and_check(model: nn.Module, x: torch.Tensor, *, with_inputs: bool = True):
    before = snapshot(model)
    folded, report = bnfold.fold_torch(model, x if with_inputs else None)
    assert report.frontend == "torch" and report.analysis == "torch.fx"
    assert report.folded == 1, str(report)
    assert isinstance(folded, type(model)) and folded is not model
    assert isinstance(folded.bn, nn.Identity)
    assert not isinstance(model.bn, nn.Identity)
    assert_untouched(model, before)
    outputs_close(model, folded, x)
    return folded, report


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv(dims, groups, bias):
    torch.manual_seed(dims * 10 + groups)
    model = randomize_bn(Seq(CONV[dims](4, 6, 3, groups=groups, bias=bias), BN[dims](6)), dims).eval()
    x = torch.randn(2, 4, *SPATIAL[dims])
    folded, report = _fold_and_check(model, x)
    assert folded.producer.bias is not None
    c = report.candidates[0]
    assert (c.node, c.op_type, c.target, c.target_op, c.direction) == (
        "bn", f"BatchNorm{dims}d", "producer", f"Conv{dims}d", "into-producer"
    )
    assert report.params_after == report.params_before - 12 + (0 if bias else 6)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose(dims, groups, bias):
    """Grouped ConvTranspose: weight [C_in, C_out/g, k…], output channel j·(C_out/g)+k."""
    torch.manual_seed(dims * 10 + groups)
    producer = CONV_T[dims](6, 9, 3, stride=2, groups=groups, bias=bias)
    model = randomize_bn(Seq(producer, BN[dims](9)), dims).eval()
    _fold_and_check(model, torch.randn(2, 6, *SPATIAL[dims]))


def test_grouped_conv_transpose_on_the_wrong_axis_is_caught(monkeypatch):
    """Guard for the test above: scaling axis 1 of the ungrouped weight (a known bug) breaks equality."""
    import numpy as np

    import bnfold.torch.apply as apply
    from bnfold.affine import fold_into_conv_transpose

    def wrong_axis(weight, bias, a, groups):
        """Scales axis 1 by the first group's factors: right for groups=1, wrong otherwise."""
        _, new_b = fold_into_conv_transpose(weight, bias, a, groups)
        w = np.asarray(weight, np.float64)
        return w * a.scale[: w.shape[1]].reshape(1, -1, *([1] * (w.ndim - 2))), new_b

    monkeypatch.setattr(apply, "fold_into_conv_transpose", wrong_axis)
    torch.manual_seed(0)
    model = randomize_bn(Seq(nn.ConvTranspose2d(6, 9, 3, groups=3), nn.BatchNorm2d(9)), 1).eval()
    x = torch.randn(2, 6, 5, 5)
    folded, _ = bnfold.fold_torch(model)  # no inputs: no internal check, the test's own must fail
    with pytest.raises(AssertionError, match="outputs differ"):
        outputs_close(model, folded, x)
    with pytest.raises(bnfold.errors.VerificationError):  # with inputs, fold_torch's own guard refuses
        bnfold.fold_torch(model, x)


def test_linear_rank2():
    torch.manual_seed(1)
    model = randomize_bn(Seq(nn.Linear(7, 5), nn.BatchNorm1d(5)), 2).eval()
    folded, report = _fold_and_check(model, torch.randn(4, 7))
    assert report.candidates[0].target_op == "Linear"


def test_linear_without_bias():
    torch.manual_seed(1)
    model = randomize_bn(Seq(nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5)), 2).eval()
    folded, _ = _fold_and_check(model, torch.randn(4, 7))
    assert folded.producer.bias.shape == (5,)


def test_bn_without_affine():
    torch.manual_seed(2)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), 3).eval()
    _fold_and_check(model, torch.randn(2, 3, 6, 6))


def test_sync_batchnorm_in_eval():
    torch.manual_seed(3)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), 4).eval()
    folded, report = _fold_and_check(model, torch.randn(2, 3, 6, 6))
    assert report.candidates[0].op_type == "SyncBatchNorm"


def test_frozen_batchnorm():
    torch.manual_seed(4)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4, eps=1e-3)), 5).eval()
    folded, report = _fold_and_check(model, torch.randn(2, 3, 6, 6))
    assert report.candidates[0].op_type == "FrozenBatchNorm2d"


def test_frozen_batchnorm_needs_shapes_for_the_rank():
    """An unbatched conv output [C, H, W] would broadcast to [1, C, H, W]: without shapes, refuse."""
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)), 5).eval()
    _, report = bnfold.fold_torch(model)
    assert report.folded == 0
    assert report.candidates[0].reasons[0].code.value == "needs-example-inputs"
    assert "example_inputs" in report.candidates[0].reasons[0].message


def test_conv2d_batchnorm2d_needs_no_inputs():
    """BatchNorm2d raises on anything but 4-D input, which proves the conv ran batched."""
    torch.manual_seed(5)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 6).eval()
    _fold_and_check(model, torch.randn(2, 3, 6, 6), with_inputs=False)


def test_conv1d_batchnorm1d_without_inputs_is_refused_then_folds_with_them():
    """BatchNorm1d takes 2-D input too: an unbatched Conv1d output [C, L] would be normalised over L."""
    torch.manual_seed(6)
    model = randomize_bn(Seq(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), 7).eval()
    _, report = bnfold.fold_torch(model)
    assert report.folded == 0 and report.candidates[0].status is Status.SKIPPED
    _fold_and_check(model, torch.randn(2, 3, 9))


def test_result_keeps_class_methods_and_attributes():
    torch.manual_seed(7)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 8).eval()
    model.extra = [1, 2]
    folded, _ = bnfold.fold_torch(model)
    assert type(folded) is Seq and folded.describe() == "Seq(mine)" and folded.extra == [1, 2]


def test_inplace_returns_the_same_object():
    torch.manual_seed(8)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 9).eval()
    reference = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    reference.load_state_dict(model.state_dict())
    weight = model.producer.weight
    folded, report = bnfold.fold_torch(model, inplace=True)
    assert folded is model and report.folded == 1
    assert model.producer.weight is weight  # the same Parameter object, new values
    assert isinstance(model.bn, nn.Identity)
    outputs_close(reference, model, torch.randn(2, 3, 6, 6))
