"""A RepVGG-style identity BatchNorm left by fold_torch says what it is and where it does fold.

Measured on timm repvgg_a0 / mobileone_s0 / fastvit_t8: 76 identity-branch BatchNorms were left as
"takes its input from ReLU, not from a Conv" — true, but it hid that the ONNX pass merges exactly these
(rule ``reparam``). The reason now names the sibling conv and the way to fold it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from bnfold import fold_torch  # noqa: E402
from bnfold.report import Reason, Status  # noqa: E402


class RepBlock(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x) + self.identity(x))


def test_identity_branch_reason_names_the_sibling_conv() -> None:
    net = nn.Sequential(RepBlock(), RepBlock()).eval()
    folded, report = fold_torch(net, (torch.randn(1, 4, 6, 6),))
    left = [c for c in report.candidates if c.status is Status.SKIPPED]
    assert sorted(c.node for c in left) == ["0.identity", "1.identity"], str(report)
    for c in left:
        (r,) = c.reasons
        assert r.code is Reason.NO_LINEAR_NEIGHBOUR
        assert "identity branch" in r.message and "conv.0" in r.message and "reparam" in r.message, r.message


def test_plain_bn_without_sibling_conv_says_nothing_of_branches() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _, report = fold_torch(net, (torch.randn(1, 3, 6, 6),))
    (c,) = [c for c in report.candidates if c.status is Status.SKIPPED]
    assert "identity branch" not in c.reasons[0].message
