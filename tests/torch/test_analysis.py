"""fx and the torch.export fallback: untraceable forwards, ResNet-style models, both analyses agreeing."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from tests.torch.models import (  # noqa: E402
    FrozenBatchNorm2d,
    ShapeBranch,
    TinyResNet,
    assert_untouched,
    bn_count,
    outputs_close,
    randomize_bn,
    snapshot,
)


def test_fx_cannot_trace_the_shape_branch():
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(ShapeBranch().eval())


def test_untraceable_model_folds_through_torch_export():
    torch.manual_seed(0)
    model = randomize_bn(ShapeBranch(), 1).eval()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.analysis == "torch.export"
    assert report.folded == 2 and report.left == 0, str(report)
    assert isinstance(folded, ShapeBranch) and bn_count(folded) == 0
    assert_untouched(model, before)
    outputs_close(model, folded, x)
    small = torch.randn(2, 3, 4, 4)  # the other branch of the forward: still equal
    outputs_close(model, folded, small)


@pytest.fixture
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyResNet(), 2).eval()


def test_resnet_style_fx(resnet):
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(resnet)
    folded, report = bnfold.fold_torch(resnet, x)
    assert report.analysis == "torch.fx"
    assert report.found == 10 and report.folded == 10, str(report)
    assert bn_count(folded) == 0 and isinstance(folded, TinyResNet)
    assert isinstance(folded.layer2[0].downsample[1], nn.Identity)
    assert report.nodes_after == report.nodes_before - 10
    assert report.params_after < report.params_before
    assert_untouched(resnet, before)
    outputs_close(resnet, folded, x)


def test_resnet_style_export_agrees_with_fx(resnet, monkeypatch):
    import bnfold.torch.graph as graphs

    x = torch.randn(2, 3, 16, 16)
    via_fx, fx_report = bnfold.fold_torch(resnet, x)

    def no_fx(*a, **k):
        raise RuntimeError("fx disabled for this test")

    monkeypatch.setattr(graphs, "trace_fx", no_fx)
    via_export, export_report = bnfold.fold_torch(resnet, x)
    assert export_report.analysis == "torch.export"
    assert [(c.node, c.target, c.status) for c in export_report.candidates] == [
        (c.node, c.target, c.status) for c in fx_report.candidates
    ]
    for (k, a), (_, b) in zip(via_fx.state_dict().items(), via_export.state_dict().items()):
        assert torch.equal(a, b), k
    outputs_close(resnet, via_export, x)


def test_frozen_batchnorm_through_export(monkeypatch):
    """Under torch.export FrozenBatchNorm2d is inlined into mul/add ops: the call is still one site."""
    import bnfold.torch.graph as graphs

    monkeypatch.setattr(graphs, "trace_fx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no fx")))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU())
    model = randomize_bn(model, 3).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = bnfold.fold_torch(model, x)
    assert report.analysis == "torch.export" and report.folded == 1, str(report)
    assert isinstance(folded[1], nn.Identity)
    outputs_close(model, folded, x)


def test_bn_never_called_is_noted():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(x)

    _, report = bnfold.fold_torch(Unused().eval())
    assert report.found == 0 and any("never called" in n for n in report.notes)


def test_module_registered_twice_is_replaced_everywhere():
    torch.manual_seed(2)

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.same_bn = self.bn

        def forward(self, x):
            return self.bn(self.conv(x))

    model = randomize_bn(Aliased(), 4).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = bnfold.fold_torch(model, x)
    assert report.folded == 1
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.same_bn, nn.Identity)
    outputs_close(model, folded, x)
