"""What must not fold, and the reason given: each test would fail if bnfold folded it anyway."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold.errors import UsageError, VerificationError  # noqa: E402
from bnfold.report import Reason, Status  # noqa: E402
from tests.torch.models import (  # noqa: E402
    FakeFrozen,
    Seq,
    assert_untouched,
    outputs_close,
    randomize_bn,
    snapshot,
)


def _only(report) -> tuple[Reason, str]:
    assert report.folded == 0, str(report)
    (cand,) = [c for c in report.candidates if c.status is Status.SKIPPED]
    return cand.reasons[0].code, cand.reasons[0].message


def _refused(model: nn.Module, x, code: Reason, *, with_inputs: bool = True) -> str:
    before = snapshot(model)
    folded, report = bnfold.fold_torch(model, x if with_inputs else None)
    got, message = _only(report)
    assert got is code, message
    assert not isinstance(folded.bn, nn.Identity)
    outputs_close(model, folded, x)
    assert_untouched(model, before)
    assert_untouched(folded, before)
    return message


class OtherConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ReusedConv(nn.Module):
    """The conv is called twice; only one call feeds the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class ReusedPair(nn.Module):
    """conv→bn called twice: every call site is the same pair, so it folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(F.relu(self.bn(self.conv(x)))))


class SharedBN(nn.Module):
    """One BatchNorm after two different convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv_b = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn(self.conv_b(x))


class ConvTwoBNs(nn.Module):
    """One conv called twice, each call followed by a different BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn_b(self.conv(x + 1))


class ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.abs().mean()


class TiedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.other = nn.Conv2d(3, 4, 3)
        self.other.weight = self.conv.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


class ListCall(nn.Module):
    """Calls the BatchNorm through a plain list too: fx sees one call, the module is used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.hidden = [self.bn]

    def forward(self, x):
        return self.hidden[0](self.conv(x))


def _x():
    return torch.randn(2, 3, 6, 6)


def test_other_consumer():
    msg = _refused(randomize_bn(OtherConsumer()).eval(), _x(), Reason.OTHER_CONSUMER)
    assert "conv" in msg and "add" in msg


def test_reused_conv_module_is_not_folded_at_one_call_site_only():
    model = randomize_bn(ReusedConv()).eval()
    msg = _refused(model, torch.randn(2, 4, 6, 6), Reason.MULTIPLE_CALL_SITES)
    assert "2 sites" in msg


def test_reused_pair_folds_at_every_site():
    torch.manual_seed(0)
    model = randomize_bn(ReusedPair(), 3).eval()
    x = torch.randn(2, 4, 6, 6)
    folded, report = bnfold.fold_torch(model, x)
    assert report.folded == 2 and isinstance(folded.bn, nn.Identity)  # two calls of one module
    outputs_close(model, folded, x)


def test_reused_pair_through_export_fallback(monkeypatch):
    import bnfold.torch.graph as graphs

    def no_fx(*a, **k):
        raise RuntimeError("fx disabled for this test")

    monkeypatch.setattr(graphs, "trace_fx", no_fx)
    torch.manual_seed(0)
    model = randomize_bn(ReusedPair(), 3).eval()
    x = torch.randn(2, 4, 6, 6)
    folded, report = bnfold.fold_torch(model, x)
    assert report.analysis == "torch.export" and report.folded == 2
    outputs_close(model, folded, x)
    _, report = bnfold.fold_torch(randomize_bn(ReusedConv()).eval(), x)
    assert _only(report)[0] is Reason.MULTIPLE_CALL_SITES


def test_bn_after_two_producers():
    _refused(randomize_bn(SharedBN()).eval(), _x(), Reason.MULTIPLE_CALL_SITES)


def test_conv_feeding_two_batchnorms():
    model = randomize_bn(ConvTwoBNs()).eval()
    before = snapshot(model)
    folded, report = bnfold.fold_torch(model, torch.randn(2, 4, 5, 5))
    assert report.folded == 0 and report.left == 2
    assert {c.reasons[0].code for c in report.candidates} == {Reason.MULTIPLE_CALL_SITES}
    assert_untouched(folded, before)


def test_bn_after_nonlinear_op():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model.producer = nn.Sequential(model.producer, nn.ReLU()).eval()
    msg = _refused(model, _x(), Reason.NO_LINEAR_NEIGHBOUR)
    assert "relu" in msg.lower()


def test_forward_reads_the_weight():
    _refused(randomize_bn(ReadsWeight()).eval(), _x(), Reason.OTHER_CONSUMER)


def test_tied_weight():
    msg = _refused(randomize_bn(TiedWeight()).eval(), _x(), Reason.OTHER_CONSUMER)
    assert "other.weight" in msg


def test_no_running_stats():
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    _refused(model, _x(), Reason.NO_RUNNING_STATS)


def test_linear_rank3_is_refused():
    """[N, L, F] with L == F: BatchNorm1d runs, but normalises L, not Linear's features."""
    model = randomize_bn(Seq(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    msg = _refused(model, torch.randn(2, 4, 4), Reason.SHAPE_MISMATCH)
    assert "rank 3" in msg


def test_linear_without_inputs_is_refused():
    model = randomize_bn(Seq(nn.Linear(4, 5), nn.BatchNorm1d(5))).eval()
    msg = _refused(model, torch.randn(3, 4), Reason.NEEDS_EXAMPLE_INPUTS, with_inputs=False)
    assert "example_inputs" in msg


def test_fake_frozen_batchnorm_is_refused():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), FakeFrozen(4))).eval()
    msg = _refused(model, _x(), Reason.UNSUPPORTED)
    assert "does not compute" in msg


def test_hooks_are_refused():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model.producer.register_forward_hook(lambda m, i, o: o * 2)
    _refused(model, _x(), Reason.UNSUPPORTED)


def test_conv_subclass_with_its_own_forward_is_not_a_producer():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias)

    model = randomize_bn(Seq(StdConv(3, 4, 3), nn.BatchNorm2d(4))).eval()
    _refused(model, _x(), Reason.NO_LINEAR_NEIGHBOUR)


def test_fp16_overflow_is_refused_and_nothing_changes():
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.producer.weight.fill_(1000.0)
        model.bn.running_var.fill_(1e-4)
        model.bn.eps = 1e-8
    model = model.half()
    before = snapshot(model)
    folded, report = bnfold.fold_torch(model)
    code, msg = _only(report)
    assert code is Reason.FP16_OVERFLOW and "65504" in msg
    assert_untouched(folded, before)


def test_training_mode_is_an_error():
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UsageError, match=r"\.eval\(\)"):
        bnfold.fold_torch(model)
    model.eval()
    model.bn.train()
    with pytest.raises(UsageError, match="bn"):
        bnfold.fold_torch(model)


def test_untraceable_without_inputs_says_what_to_pass():
    from tests.torch.models import ShapeBranch

    with pytest.raises(UsageError, match="example_inputs"):
        bnfold.fold_torch(ShapeBranch().eval())


def test_hidden_call_is_caught_by_the_output_check_and_inplace_is_undone():
    model = randomize_bn(ListCall()).eval()
    x = _x()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(VerificationError, match="left unchanged"):
        bnfold.fold_torch(model, x, inplace=True)
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_not_a_module():
    with pytest.raises(UsageError):
        bnfold.fold_torch(lambda x: x)
