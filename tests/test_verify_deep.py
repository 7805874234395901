"""Verification on deep networks with trained-like statistics: every correct fold passes, wrong ones fail.

The networks are `sample_models.deep` (ResNet, depthwise MobileNet, YOLO-like detector with unbounded
outputs, LeViT-like attention), exported by the TorchScript and the dynamo exporters with their
BatchNorms kept. Their correct float32 folds differ from the originals by 1e-5..3e-5 of the output's
scale — above the former fixed rtol of 1e-5, which is why this file exists.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from bnfold import fold_onnx, verify_onnx  # noqa: E402
from bnfold.cli import main  # noqa: E402
from bnfold.criterion import NOISE_FACTOR  # noqa: E402
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK  # noqa: E402
from bnfold.feeds import input_specs, random_feeds  # noqa: E402
from bnfold.onnx.api import fold_file  # noqa: E402
from bnfold.sessions import make_session, model_source  # noqa: E402
from bnfold.verify import NotEquivalent, VerifyOptions  # noqa: E402
from sample_models import deep  # noqa: E402
from sample_models.corrupt import conv_weights, scale_channel  # noqa: E402

EXPORTERS = ["torchscript"] + (["dynamo"] if importlib.util.find_spec("onnxscript") else [])  # dynamo needs onnxscript
CASES = [(n, e) for n in deep.NETS for e in EXPORTERS]
IDS = [f"{n}-{e}" for n, e in CASES]


class _Lazy(dict):
    """Built on first use: a test that needs two networks does not wait for eight exports."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value

    def __contains__(self, key) -> bool:
        return key in CASES or key in deep.NETS


@pytest.fixture(scope="module")
def nets() -> dict[str, tuple]:
    return _Lazy(deep.build)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, nets) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("deep")
    return _Lazy(lambda k: deep.EXPORTERS[k[1]](*nets[k[0]], folder / f"{k[0]}_{k[1]}.onnx", deep.OUTPUT_NAMES.get(k[0])))


@pytest.fixture(scope="module")
def folded(exported) -> dict[tuple[str, str], onnx.ModelProto]:
    return _Lazy(lambda k: fold_onnx(exported[k])[0])


def test_the_nets_are_deep_and_their_statistics_trained_like(nets) -> None:
    for name in deep.NETS:
        net, _ = nets[name]
        bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.modules.batchnorm._BatchNorm))]
        var = torch.cat([b.running_var for b in bns])
        gamma = torch.cat([b.weight.detach() for b in bns])
        assert len(layers) >= 30, (name, len(layers))
        assert float(var.min()) < 1e-6 and float(var.max()) > 1.0, name
        assert bool((gamma < 0).any()) and bool((gamma > 0).any()), name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_default_fold_writes_every_deep_net(case, exported, tmp_path: Path) -> None:
    """`bnfold IN -o OUT` (verify on, defaults): exit 0 and the file is written."""
    out = tmp_path / "folded.onnx"
    result = CliRunner().invoke(main, [str(exported[case]), "-o", str(out), "--json"])
    assert result.exit_code == EXIT_OK, result.output
    data = json.loads(result.output)
    assert out.exists() and data["batchnorms_folded"] >= 4 and data["verification"]["passed"]
    for o in data["verification"]["outputs"]["cpu"]:
        assert o["fold_error"] <= o["allowed"] and "equivalent" in o["verdict"]


def test_these_folds_fail_a_fixed_rtol_of_1e5(exported, folded) -> None:
    """What the measured criterion is for: correct folds of these nets exceed the former fixed tolerance."""
    over = [k for k in CASES if verify_onnx(exported[k], folded[k]).outputs["cpu"][0].max_rel_to_scale > 1e-5]
    assert len(over) >= len(CASES) // 2, over


def test_fold_file_returns_the_verification(exported, tmp_path: Path) -> None:
    case = ("detector", "torchscript")
    report = fold_file(exported[case], tmp_path / "f.onnx", verify=VerifyOptions(trials=2))
    v = report.verification
    assert v is not None and v.passed and v.trials == 2 and v.folded == str(tmp_path / "f.onnx")
    assert [o.name for o in v.outputs["cpu"]] == ["boxes", "scores"]
    assert fold_file(exported[case], tmp_path / "g.onnx").verification is None  # not asked: not run


def _effects(original, good: onnx.ModelProto, bad: onnx.ModelProto, trials: int = 3) -> list[list[float]]:
    """Per output, per trial: max |bad − good| relative to the original's scale (``original``: a path or
    a model) on that trial's inputs."""
    sa, sg, sb = (make_session(model_source(m)) for m in (original, good, bad))
    specs = input_specs(sa)
    out: list[list[float]] = []
    for trial in range(trials):
        _, feeds = random_feeds(specs, trial, 0)
        for k, (a, g, b) in enumerate(zip(sa.run(None, feeds), sg.run(None, feeds), sb.run(None, feeds))):
            if len(out) <= k:
                out.append([])
            out[k].append(float(np.max(np.abs(b.astype(np.float64) - g)) / np.max(np.abs(a))))
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_channel_off_by_0_1_percent_fails_wherever_it_shows(case, exported, folded) -> None:
    """×1.001 on output channel 0 of a conv weight (first, middle, last conv): wherever the effect on an
    output is ≥ 10× the noise floor that output was held against, the verdict is a failure."""
    good = folded[case]
    weights = conv_weights(good)
    caught = 0
    for w in dict.fromkeys([weights[0], weights[len(weights) // 2], weights[-1]]):
        bad = scale_channel(good, w, 0, 1.001)
        result = verify_onnx(exported[case], bad)
        effects = _effects(str(exported[case]), good, bad)
        for o, eff in zip(result.outputs["cpu"], effects):
            for t, e in zip(o.trials, eff):
                held_to = t.allowed / NOISE_FACTOR  # the measured noise, or the floor's share where that is larger
                if e >= 10 * held_to:
                    assert not t.passed and not o.passed and not result.passed, (w, o.name, t, e)
                    caught += 1
    assert caught > 0, "no corruption showed 10× above the noise: the test proves nothing"


def _monkeypatched_fold(monkeypatch, how: str) -> None:
    """Break the fold's math the way a bug would."""
    import bnfold.affine as A
    import bnfold.onnx.chain as chain

    if how == "missing-epsilon":  # every BatchNorm's epsilon, whether done alone or with the others, read as 0
        monkeypatch.setattr(chain, "_epsilon", lambda node: 0.0)
    elif how == "wrong-axis":  # the scale along the input channels where the shapes let it through
        real_conv = A.fold_into_conv_rounded

        def wrong(weight, bias, a, wd, bd, what, **kwargs):
            w = np.asarray(weight)
            if w.ndim == 4 and w.shape[1] == a.scale.shape[0]:
                weight = (w.astype(np.float64) * a.scale[None, :, None, None]).astype(w.dtype)
                a = A.Affine(np.ones_like(a.scale), a.shift, a.notes)
            return real_conv(weight, bias, a, wd, bd, what, **kwargs)

        monkeypatch.setattr(A, "fold_into_conv_rounded", wrong)


@pytest.mark.parametrize(
    "how, case",
    [("missing-epsilon", ("mobilenet", "torchscript")), ("missing-epsilon", ("levit", "dynamo")),
     ("wrong-axis", ("resnet", "torchscript")), ("wrong-axis", ("resnet", "dynamo"))],  # square convs: the shapes let it through
    ids=["missing-epsilon-mobilenet-torchscript", "missing-epsilon-levit-dynamo", "wrong-axis-resnet-torchscript", "wrong-axis-resnet-dynamo"],
)
def test_break_it_fold_is_refused_and_nothing_written(case, how, exported, tmp_path: Path, monkeypatch) -> None:
    if case not in exported:
        pytest.skip("dynamo exporter unavailable")
    _monkeypatched_fold(monkeypatch, how)
    out = tmp_path / "out.onnx"
    with pytest.raises(NotEquivalent) as failed:
        fold_file(exported[case], out, verify=True)
    assert not failed.value.verification.passed and not out.exists()
    result = CliRunner().invoke(main, [str(exported[case]), "-o", str(out)])
    assert result.exit_code == EXIT_CHECK_FAILED and "DIFFERENT" in result.output and not out.exists()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["detector", "levit"])
def test_export_onnx_passes_a_correct_fold_and_says_what_it_measured(name, nets, tmp_path: Path, monkeypatch) -> None:
    """`export_onnx` on a deep net with trained-like statistics: written, and the note names the float64
    copy and the noise; an exported model whose outputs are 0.1 % off is refused in the same words."""
    import bnfold
    import bnfold.torch.export as export
    from bnfold.errors import VerificationError

    net, x = nets[name]
    _, report = bnfold.export_onnx(net, x, tmp_path / "ok.onnx", output_names=deep.OUTPUT_NAMES.get(name))
    (note,) = [n for n in report.notes if n.startswith("onnxruntime")]
    assert (tmp_path / "ok.onnx").exists() and "float64 copy" in note and "equivalent" in note and "DIFFERENT" not in note
    import bnfold.sessions as sessions

    real = sessions.make_session

    class OffBy1e3:  # onnxruntime's outputs of the exported file, 0.1 % too large
        def __init__(self, session) -> None:
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, *a, **k):
            return [o * np.float32(1.001) for o in self.session.run(*a, **k)]

    monkeypatch.setattr(sessions, "make_session", lambda *a, **k: OffBy1e3(real(*a, **k)))
    with pytest.raises(VerificationError, match="float64 copy") as failed:
        bnfold.export_onnx(net, x, tmp_path / "bad.onnx", output_names=deep.OUTPUT_NAMES.get(name))
    assert "DIFFERENT" in str(failed.value) and not (tmp_path / "bad.onnx").exists()


def test_float16_deep_net_is_held_to_its_measured_noise(exported) -> None:
    """The ResNet in float16 (every float initializer and the I/O converted): the correct fold passes on
    the noise measured for it, not on a fixed 1e-2; a stem channel off fails wherever its effect is 10×."""
    from onnx import TensorProto, numpy_helper

    m16 = onnx.load(exported[("resnet", "torchscript")])
    for t in m16.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m16.graph.input) + list(m16.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del m16.graph.value_info[:]
    folded16, report = fold_onnx(m16)
    assert report.folded == 20
    result = verify_onnx(m16, folded16)
    (out,) = result.outputs["cpu"]
    assert result.passed and out.dtype == "float16" and out.noise > 0, str(result)
    caught = 0
    for factor in (1.05, 1.25, 2.0):  # float16 noise is ~1e-3..1e-2 of scale: a 0.1 % error hides in it
        bad = scale_channel(folded16, conv_weights(folded16)[0], 0, factor)
        verdict = verify_onnx(m16, bad)
        for t, e in zip(verdict.outputs["cpu"][0].trials, _effects(m16, folded16, bad)[0]):
            if e >= 10 * t.allowed / NOISE_FACTOR:
                assert not t.passed and not verdict.passed, (factor, t, e)
                caught += 1
    assert caught > 0
