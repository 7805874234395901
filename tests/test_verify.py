"""Verification catches a wrong fold, passes a right one, and never pretends about CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

import bnfold.onnx.api as api
from bnfold import fold_onnx, verify_onnx
from bnfold.cli import main
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, ProviderUnavailableError
from bnfold.providers import choose
from tests.builders import bn_inits, bn_node, conv_bn_relu, init, model

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "sample_models" / "resnet_tiny.onnx"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def corrupt(m: onnx.ModelProto, rel: float = 1e-3) -> onnx.ModelProto:
    """Perturb the first folded conv weight by `rel` (relative)."""
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    t = next(t for t in bad.graph.initializer if len(t.dims) == 4)
    w = onnx.numpy_helper.to_array(t) * np.float32(1 + rel)
    t.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), t.name))
    return bad


def test_correct_fold_passes_and_reports_every_figure() -> None:
    folded, _ = fold_onnx(RESNET)
    result = verify_onnx(RESNET, folded, trials=3)
    assert result.passed
    (out,) = result.outputs["cpu"]
    assert out.max_rel_to_scale < 1e-5 and out.max_ulp is not None and out.p99_abs <= out.max_abs
    assert "PASS" in str(result) and "ORT_DISABLE_ALL" in str(result)


def test_corrupted_fold_is_caught_with_exit_1(tmp_path: Path) -> None:
    folded, _ = fold_onnx(RESNET)
    bad = tmp_path / "bad.onnx"
    onnx.save(corrupt(folded), bad)
    result = CliRunner().invoke(main, ["verify", str(RESNET), str(bad)])
    assert result.exit_code == EXIT_CHECK_FAILED, result.output
    assert "MISMATCH" in result.output


def test_fold_writes_nothing_when_verification_fails(tmp_path: Path, monkeypatch) -> None:
    real = api._fold

    def corrupting(proto, assume_constant):
        out, state = real(proto, assume_constant)
        return corrupt(out), state

    monkeypatch.setattr(api, "_fold", corrupting)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(RESNET), "-o", str(out)])
    assert result.exit_code == EXIT_CHECK_FAILED, result.output
    assert "MISMATCH" in result.output and "nothing written" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_no_verify_skips_the_check(tmp_path: Path, monkeypatch) -> None:
    real = api._fold
    monkeypatch.setattr(api, "_fold", lambda p, a: (lambda r: (corrupt(r[0]), r[1]))(real(p, a)))
    result = CliRunner().invoke(main, [str(RESNET), "-o", str(tmp_path / "o.onnx"), "--no-verify"])
    assert result.exit_code == EXIT_OK and (tmp_path / "o.onnx").exists()


def test_fp16_fold_passes_with_fp16_tolerance() -> None:
    m = conv_bn_relu(np.random.default_rng(0))
    m16 = onnx.ModelProto()
    m16.CopyFrom(m)
    for t in m16.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m16.graph.input) + list(m16.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    folded, report = fold_onnx(m16)
    assert report.folded == 1
    result = verify_onnx(m16, folded)
    (out,) = result.outputs["cpu"]
    assert out.dtype == "float16" and out.rtol == 1e-2
    assert result.passed, str(result)
    assert not verify_onnx(m16, corrupt_fp16(folded, 0.05)).passed


def corrupt_fp16(m: onnx.ModelProto, rel: float) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    t = next(t for t in bad.graph.initializer if len(t.dims) == 4)
    t.CopyFrom(onnx.numpy_helper.from_array((onnx.numpy_helper.to_array(t) * (1 + rel)).astype(np.float16), t.name))
    return bad


def symbolic_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"), bn_node("bn", "c", "output")]
    return model(nodes, [("input", ["N", 3, "H", "W"])], [("output", ["N", 4, "H", "W"])],
                 [init("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32)), *bn_inits("bn", 4, rng)])


def test_symbolic_dims_and_shape_option(tmp_path: Path) -> None:
    m = symbolic_model()
    folded, _ = fold_onnx(m)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(m, a)
    onnx.save(folded, b)
    assert verify_onnx(a, b).outputs["cpu"][0].shape == [1, 4, 1, 1]  # symbolic dims take 1
    result = CliRunner().invoke(main, ["verify", str(a), str(b), "--shape", "input:2x3x5x7", "--json"])
    assert result.exit_code == EXIT_OK, result.output
    data = json.loads(result.output)
    assert data["passed"] and data["outputs"]["cpu"][0]["shape"] == [2, 4, 5, 7]
    bad = CliRunner().invoke(main, ["verify", str(a), str(b), "--shape", "input=2x3"])
    assert bad.exit_code == EXIT_USAGE and "--shape" in bad.output


def test_npz_inputs(tmp_path: Path) -> None:
    m = symbolic_model()
    folded, _ = fold_onnx(m)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(m, a)
    onnx.save(folded, b)
    npz = tmp_path / "in.npz"
    np.savez(npz, input=np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32))
    result = verify_onnx(a, b, inputs=npz)
    assert result.passed and result.outputs["cpu"][0].shape == [3, 4, 4, 4] and result.inputs == str(npz)
    np.savez(tmp_path / "wrong.npz", other=np.zeros(3))
    r = CliRunner().invoke(main, ["verify", str(a), str(b), "--inputs", str(tmp_path / "wrong.npz")])
    assert r.exit_code == EXIT_USAGE and "lacks the model input" in r.output


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA; the missing-provider path is tested where it lacks it")
def test_cuda_requested_but_missing_is_exit_2_never_a_cpu_run(tmp_path: Path) -> None:
    folded = tmp_path / "f.onnx"
    onnx.save(fold_onnx(RESNET)[0], folded)
    result = CliRunner().invoke(main, ["verify", str(RESNET), str(folded), "--provider", "cuda"])
    assert result.exit_code == EXIT_USAGE
    assert "CUDAExecutionProvider is not available" in result.output and "onnxruntime-gpu" in result.output
    assert len(result.output.strip().splitlines()) == 1
    allp = CliRunner().invoke(main, ["verify", str(RESNET), str(folded), "--provider", "all"])
    assert allp.exit_code == EXIT_OK and "skipped CUDA" in allp.output


def test_provider_selection_logic(monkeypatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert choose("cpu").selected == ["cpu"]
    assert choose("all").selected == ["cpu"] and "skipped CUDA" in choose("all").notes[0]
    with pytest.raises(ProviderUnavailableError):
        choose("cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose("cuda").selected == ["cuda"]
    assert choose("all").selected == ["cpu", "cuda"] and not choose("all").notes


def test_cuda_fallback_to_cpu_is_refused() -> None:
    from bnfold.providers import assert_running_on

    class FakeSession:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(ProviderUnavailableError):
        assert_running_on(FakeSession(), "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not available in this onnxruntime build")
def test_verify_on_cuda() -> None:
    folded, _ = fold_onnx(RESNET)
    result = verify_onnx(RESNET, folded, provider="cuda")
    assert result.passed and list(result.outputs) == ["cuda"]
