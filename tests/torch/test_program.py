"""fold_torch on a torch.export.ExportedProgram: a new program with the BatchNorm ops folded, same report."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold.report import Reason, Status  # noqa: E402
from sample_models.torch_library import (  # noqa: E402
    ConcatReused,
    EfficientNetLike,
    LeViTLike,
    MixNetLike,
    count_batchnorm_ops,
    trained_like,
)
from tests.torch.models import TinyResNet  # noqa: E402


def _program(cls, shape, decomposed=False):
    torch.manual_seed(0)
    model = trained_like(cls(), shape)
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        ep = torch.export.export(model, (x,), strict=False)
        if decomposed:
            ep = ep.run_decompositions()
    return model, ep, x


def _bn_state(ep) -> list[str]:
    return [k for k in ep.state_dict if "running" in k or "num_batches" in k]


@pytest.mark.parametrize(
    "cls,shape,left,decomposed",
    [
        (TinyResNet, (2, 3, 16, 16), 0, False),
        (TinyResNet, (2, 3, 16, 16), 0, True),  # _native_batch_norm_legit_no_training + getitem, aten.convolution
        (EfficientNetLike, (2, 3, 16, 16), 0, False),
        (MixNetLike, (2, 3, 16, 16), 1, False),
        (ConcatReused, (2, 3, 8, 8), 1, False),
    ],
)
def test_program_folds_and_counts(cls, shape, left, decomposed):
    model, ep, x = _program(cls, shape, decomposed)
    folded, report = bnfold.fold_torch(ep, (x,))
    assert isinstance(folded, torch.export.ExportedProgram) and folded is not ep
    before, after = count_batchnorm_ops(ep.module(), x), count_batchnorm_ops(folded.module(), x)
    assert report.found == before and report.left == after == left, str(report)
    assert report.folded == before - after
    assert report.folded == 0 or any("float64 copy" in n and "equivalent" in n for n in report.notes)
    assert count_batchnorm_ops(ep.module(), x) == before  # the caller's program is unchanged
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_program_without_bias_gets_a_bias_parameter_and_sheds_bn_state(tmp_path):
    _, ep, x = _program(EfficientNetLike, (2, 3, 16, 16))
    folded, report = bnfold.fold_torch(ep)  # the program's own example inputs are used for the check
    assert report.left == 0 and _bn_state(folded) == []
    assert "conv_stem.bias" in folded.state_dict and "bn1.weight" not in folded.state_dict
    path = tmp_path / "folded.pt2"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        torch.export.save(folded, path)
        loaded = torch.export.load(path)
        folded.run_decompositions()  # still a valid program for the lowering that follows
    torch.testing.assert_close(loaded.module()(x), folded.module()(x))


def test_program_token_bn_and_left_reasons():
    _, ep, x = _program(LeViTLike, (2, 3, 16, 16))
    folded, report = bnfold.fold_torch(ep, (x,))
    by = {c.node: c for c in report.candidates}
    assert by["ln1.bn"].status is Status.FOLDED and by["ln1.bn"].target == "ln1.linear"
    assert by["head.bn"].reasons[0].code is Reason.NO_LINEAR_NEIGHBOUR  # into a consumer: module path only
    assert report.left == count_batchnorm_ops(folded.module(), x) == 1


def test_program_inplace_is_a_usage_error():
    from bnfold.errors import UsageError

    _, ep, x = _program(TinyResNet, (2, 3, 16, 16))
    with pytest.raises(UsageError, match="new program"):
        bnfold.fold_torch(ep, (x,), inplace=True)
