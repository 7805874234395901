"""BatchNorms hidden by library code: BN subclasses (timm BatchNormAct2d), token BN, concat, BN → Linear.

Every test counts the BatchNorm ops that actually run (dispatch level) before and after, and holds the
report to them: ``found`` = ops before, ``left`` = ops after. Statistics are trained-like (variances down
to 1e-8, negative γ), and the fold is judged by the same float64 check fold_torch runs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.report import Reason, Status  # noqa: E402
from sample_models.torch_library import (  # noqa: E402
    BatchNormAct2d,
    ConcatReused,
    DeepPlain,
    DenseNetLike,
    EfficientNetLike,
    FunctionalNorm,
    LeViTLike,
    MixNetLike,
    PreActPaddedConv,
    RepVGGLike,
    count_batchnorm_ops,
    trained_like,
)
from tests.torch.models import assert_untouched, outputs_close, snapshot  # noqa: E402

CASES = {
    # model, input shape, BatchNorm ops left after folding
    "efficientnet": (EfficientNetLike, (2, 3, 16, 16), 0),
    "levit": (LeViTLike, (2, 3, 16, 16), 0),
    "mixnet": (MixNetLike, (2, 3, 16, 16), 0),
    "repvgg": (RepVGGLike, (2, 3, 16, 16), 1),
    "densenet": (DenseNetLike, (2, 3, 16, 16), 3),
    "preact": (PreActPaddedConv, (2, 3, 12, 12), 1),
    "functional": (FunctionalNorm, (2, 3, 8, 8), 1),
    "concat-reused": (ConcatReused, (2, 3, 8, 8), 1),
}


def _build(name: str):
    cls, shape, left = CASES[name]
    torch.manual_seed(0)
    model = trained_like(cls(), shape)
    return model, torch.randn(*shape), left


@pytest.fixture
def no_fx(monkeypatch):
    import bnfold.torch.graph as graphs

    monkeypatch.setattr(graphs, "trace_fx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fx disabled")))


def _check_counts(model, folded, report, x, left):
    before, after = count_batchnorm_ops(model, x), count_batchnorm_ops(folded, x)
    assert report.found == before, str(report)
    assert report.left == after == left, str(report)
    assert report.folded == before - after
    for c in report.candidates:
        if c.status is Status.SKIPPED:
            assert c.reasons, c.describe()


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_counts_equal_the_batchnorm_ops_that_run(name):
    model, x, left = _build(name)
    before = snapshot(model)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.analysis == "torch.fx"
    assert type(folded) is type(model)
    _check_counts(model, folded, report, x, left)
    assert_untouched(model, before)
    outputs_close(model, folded, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_export_analysis_agrees(name, no_fx):
    model, x, left = _build(name)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.analysis == "torch.export"
    _check_counts(model, folded, report, x, left)
    outputs_close(model, folded, x)


def test_batchnorm_act_is_replaced_by_the_rest_of_its_forward():
    model, x, _ = _build("efficientnet")
    folded, report = bnfold.fold_torch(model, (x,))
    bn = folded.bn1
    assert type(bn) is nn.Sequential and list(dict(bn.named_children())) == ["drop", "act"]
    assert isinstance(bn.act, nn.SiLU) and bn.act is not model.bn1.act  # the copy's child, not the caller's
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert all(c.direction == "into-producer" for c in report.candidates)
    assert {c.op_type for c in report.candidates} == {"BatchNormAct2d"}
    assert report.candidates[0].target == "conv_stem"


def test_batchnorm_act_without_example_inputs():
    """fx alone: BatchNormAct2d asserts its input is 4-D, and a conv output is; folded without shapes."""
    model, x, _ = _build("efficientnet")
    folded, report = bnfold.fold_torch(model)
    assert report.folded == 14 and report.left == 0, str(report)
    outputs_close(model, folded, x)


def test_rest_kept_as_graph_module_when_it_is_not_a_chain():
    class ScaledAct(BatchNormAct2d):
        def forward(self, x):
            y = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
            return self.act(y) * 2 + y

    torch.manual_seed(1)
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), ScaledAct(4, inplace=False)), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.folded == 1 and isinstance(folded[1], torch.fx.GraphModule)
    assert not any(isinstance(b, torch.Tensor) and b.dim() == 1 and b.numel() == 4 for b in folded[1].buffers())
    outputs_close(model, folded, x)


def test_subclass_that_normalises_twice_is_left():
    class Twice(BatchNormAct2d):
        def forward(self, x):
            f = nn.functional.batch_norm
            x = f(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
            return f(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)

    torch.manual_seed(1)
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), Twice(4)), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.found == 2 == count_batchnorm_ops(model, x)
    assert report.left == 2 and report.candidates[0].reasons[0].code in (Reason.NO_LINEAR_NEIGHBOUR, Reason.MULTIPLE_CALL_SITES)


def test_levit_token_bn_and_head():
    model, x, _ = _build("levit")
    folded, report = bnfold.fold_torch(model, (x,))
    by_node = {c.node: c for c in report.candidates}
    assert by_node["ln1.bn"].target == "ln1.linear" and by_node["ln1.bn"].direction == "into-producer"
    assert by_node["head.bn"].target == "head.linear" and by_node["head.bn"].direction == "into-consumer"
    assert folded.ln1.linear.bias is not None  # a Linear without bias gets one


def test_token_bn_needs_traced_shapes():
    model, _, _ = _build("levit")
    _, report = bnfold.fold_torch(model)
    codes = {c.node: c.reasons[0].code for c in report.candidates if c.reasons}
    assert codes["ln1.bn"] is Reason.NEEDS_EXAMPLE_INPUTS


def test_mixnet_concat_folds_per_slice():
    model, x, _ = _build("mixnet")
    folded, report = bnfold.fold_torch(model, (x,))
    by_node = {c.node: c for c in report.candidates}
    assert by_node["bn"].target == "mix.0 + mix.1 + mix.2"
    assert by_node["head_bn"].direction == "into-consumer" and by_node["head_bn"].target == "fc"


def test_identity_branch_and_densenet_reasons():
    model, x, _ = _build("repvgg")
    _, report = bnfold.fold_torch(model, (x,))
    left = [c for c in report.candidates if c.status is Status.SKIPPED]
    assert [c.node for c in left] == ["block.identity"] and left[0].reasons[0].code is Reason.NO_LINEAR_NEIGHBOUR
    model, x, _ = _build("concat-reused")
    _, report = bnfold.fold_torch(model, (x,))
    assert report.candidates[0].reasons[0].code is Reason.OTHER_CONSUMER
    assert "conv_a" in report.candidates[0].reasons[0].message


def test_bn_before_padded_conv_is_left_unpadded_folds():
    model, x, _ = _build("preact")
    _, report = bnfold.fold_torch(model, (x,))
    by_node = {c.node: c for c in report.candidates}
    assert by_node["bn_padded"].reasons[0].code is Reason.PADDING
    assert by_node["bn_valid"].status is Status.FOLDED and by_node["bn_valid"].target == "conv_valid"


def test_inplace_keeps_the_object_and_the_class():
    model, x, _ = _build("efficientnet")
    reference = model(x)
    folded, report = bnfold.fold_torch(model, (x,), inplace=True)
    assert folded is model and report.left == 0
    with torch.no_grad():
        assert torch.allclose(folded(x), reference, rtol=1e-4, atol=1e-5)


def test_deep_net_with_trained_like_statistics_is_not_a_false_alarm():
    """40 layers, variances down to 1e-8, negative γ: the correct fold differs by float noise only."""
    torch.manual_seed(3)
    model = trained_like(DeepPlain(), (2, 3, 8, 8), seed=3)
    x = torch.randn(2, 3, 8, 8)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.folded == 41 and report.left == 0
    assert any("equivalent" in n and "float64 copy" in n for n in report.notes)


def test_a_wrong_fold_is_caught_with_what_was_measured(monkeypatch):
    """A fold off by 1e-3 of the BatchNorm's shift: far above float32 noise, so the check must refuse it."""
    import bnfold.torch.apply as apply
    from bnfold.errors import VerificationError

    real = apply.fold_into_conv

    def slightly_wrong(weight, bias, a):
        w, b = real(weight, bias, a)
        return w, b + 1e-3 * (abs(b).max() + 1)

    monkeypatch.setattr(apply, "fold_into_conv", slightly_wrong)
    model, x, _ = _build("efficientnet")
    before = snapshot(model)
    with pytest.raises(VerificationError) as err:
        bnfold.fold_torch(model, (x,), inplace=True)
    msg = str(err.value)
    assert "float64 copy" in msg and "fold error" in msg and "float noise" in msg and "DIFFERENT" in msg
    assert_untouched(model, before)
    assert isinstance(model.bn1, BatchNormAct2d)  # the module is back too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_judged_against_float64(dtype):
    model, x, _ = _build("efficientnet")
    model, x = model.to(dtype), x.to(dtype)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.folded == 14
    note = next(n for n in report.notes if n.startswith("checked"))
    assert "float64 copy" in note and "equivalent" in note


class BNReLU(nn.BatchNorm2d):
    """A subclass whose forward calls ``super().forward``: torch's rank check is Python control flow for fx."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_subclass_calling_super_forward_folds_and_pickles():
    import io

    torch.manual_seed(2)
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), BNReLU(4), nn.Conv2d(4, 4, 1), BNReLU(4)), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    folded, report = bnfold.fold_torch(model, (x,))
    assert report.analysis == "torch.fx" and report.folded == 2 == count_batchnorm_ops(model, x), str(report)
    assert count_batchnorm_ops(folded, x) == 0
    assert "_check_input_dim" not in model[1].__dict__ and "_check_input_dim" not in folded[2].__dict__
    buf = io.BytesIO()
    torch.save(folded, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    outputs_close(model, again, x)
