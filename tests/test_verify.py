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

from bnfold import fold_onnx, verify_onnx
from bnfold.cli import main
from bnfold.criterion import FLOOR, NOISE_FACTOR
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, ProviderUnavailableError
from bnfold.providers import choose
from tests.onnx.helpers import F32, F64, bn_inits, bn_node, conv_bn_relu, init, make_model
from tests.paths import RESNET, SAMPLES

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def corrupt(m: onnx.ModelProto, rel: float = 1e-3) -> onnx.ModelProto:
    """Perturb the first folded conv weight by `rel` (relative), keeping its dtype."""
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    t = next(t for t in bad.graph.initializer if len(t.dims) == 4)
    w = onnx.numpy_helper.to_array(t)
    t.CopyFrom(onnx.numpy_helper.from_array((w * (1 + rel)).astype(w.dtype), t.name))
    return bad


def test_correct_fold_passes_and_reports_every_figure() -> None:
    folded, _ = fold_onnx(RESNET)
    result = verify_onnx(RESNET, folded, trials=3)
    assert result.passed
    (out,) = result.outputs["cpu"]
    assert out.fold_error <= out.allowed and out.noise > 0 and out.factor == NOISE_FACTOR
    assert [t.trial for t in out.trials] == ["normal", "uniform", "large"] and all(t.passed for t in out.trials)
    text = str(result)
    assert "PASS" in text and "ORT_DISABLE_ALL" in text and "equivalent" in text and "fold error" in text
    assert "ulp" not in text.replace("±1 ulp", "")  # no max-ulp figure that alarms without meaning


def test_corrupted_fold_is_caught_with_exit_1(tmp_path: Path) -> None:
    folded, _ = fold_onnx(RESNET)
    bad = tmp_path / "bad.onnx"
    onnx.save(corrupt(folded), bad)
    result = CliRunner().invoke(main, ["verify", str(RESNET), str(bad)])
    assert result.exit_code == EXIT_CHECK_FAILED, result.output
    assert "DIFFERENT" in result.output and "FAIL" in result.output


def corrupt_conv_plans(monkeypatch, rel: float = 1e-3) -> None:
    """Make every Conv fold write its weight off by `rel` (relative): a wrong fold, as a bug would make."""
    from bnfold.onnx.rules.conv import ConvIntoProducer

    real = ConvIntoProducer.values

    def wrong(self, node, affine, ctx):
        plan = real(self, node, affine, ctx)
        plan.params[1] = (plan.params[1] * np.float32(1 + rel)).astype(plan.params[1].dtype)
        return plan

    monkeypatch.setattr(ConvIntoProducer, "values", wrong)


def test_fold_writes_nothing_when_verification_fails(tmp_path: Path, monkeypatch) -> None:
    corrupt_conv_plans(monkeypatch)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(RESNET), "-o", str(out)])
    assert result.exit_code == EXIT_CHECK_FAILED, result.output
    assert "DIFFERENT" in result.output and "nothing written" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fold_that_ignores_gemm_beta_fails(monkeypatch) -> None:
    """gemm_bn.onnx has β = 2: a fold that forgets to divide the BN's shift by β is wrong by t/2."""
    import bnfold.affine as A

    def ignores_beta(b_matrix, c, a, *, trans_b, beta):
        folded_b = A.as_f64(b_matrix) * (a.scale[:, None] if trans_b else a.scale[None, :])
        return folded_b, a.scale * A.as_f64(c) + a.shift, beta

    path = SAMPLES / "gemm_bn.onnx"
    monkeypatch.setattr(A, "fold_into_gemm", ignores_beta)
    bad, report = fold_onnx(path)
    assert report.folded == 1
    result = verify_onnx(path, bad)
    assert not result.passed and "DIFFERENT" in str(result)


def test_no_verify_skips_the_check(tmp_path: Path, monkeypatch) -> None:
    corrupt_conv_plans(monkeypatch)
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
    assert out.dtype == "float16" and out.floor == FLOOR["float16"]
    assert result.passed, str(result)
    assert not verify_onnx(m16, corrupt(folded, 0.05)).passed


def symbolic_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"), bn_node("c", "output")]
    inits = [init("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32)), *bn_inits("bn", 4, rng)]
    return make_model(nodes, [("input", ["N", 3, "H", "W"], F32)], [("output", F32, ["N", 4, "H", "W"])], inits)


def symbolic_files(tmp_path: Path) -> tuple[Path, Path]:
    """The symbolic-dimension model and its fold, as files."""
    m = symbolic_model()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(m, a)
    onnx.save(fold_onnx(m)[0], b)
    return a, b


def test_symbolic_dims_and_shape_option(tmp_path: Path) -> None:
    a, b = symbolic_files(tmp_path)
    assert verify_onnx(a, b).outputs["cpu"][0].shape == [1, 4, 1, 1]  # symbolic dims take 1
    result = CliRunner().invoke(main, ["verify", str(a), str(b), "--shape", "input:2x3x5x7", "--json"])
    assert result.exit_code == EXIT_OK, result.output
    data = json.loads(result.output)
    assert data["passed"] and data["outputs"]["cpu"][0]["shape"] == [2, 4, 5, 7]
    bad = CliRunner().invoke(main, ["verify", str(a), str(b), "--shape", "input=2x3"])
    assert bad.exit_code == EXIT_USAGE and "--shape" in bad.output


def test_npz_inputs(tmp_path: Path) -> None:
    a, b = symbolic_files(tmp_path)
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


# -- comparison details: integer outputs, non-finite values, ulps, float64, the optimisation level ----
def conv_bn_argmax() -> onnx.ModelProto:
    """Conv → BN → output `y` (float) and ArgMax over channels → `idx` (int64): two outputs, two kinds."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        bn_node("c", "y"),
        helper.make_node("ArgMax", ["y"], ["idx"], name="argmax", axis=1, keepdims=0),
    ]
    inits = [init("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32)), *bn_inits("bn", 4, rng)]
    outputs = [("y", F32, ["N", 4, 4, 4]), ("idx", F32, ["N", 4, 4])]  # idx made int64 below: unchecked
    m = make_model(nodes, [("input", ["N", 3, 4, 4], F32)], outputs, inits, check=False)
    m.graph.output[1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    return m


def test_integer_outputs_must_be_equal_float_outputs_within_tolerance() -> None:
    m = conv_bn_argmax()
    folded, _ = fold_onnx(m)
    result = verify_onnx(m, folded, trials=3)
    assert result.passed, str(result)
    y, idx = result.outputs["cpu"]
    assert (y.dtype, idx.dtype) == ("float32", "int64") and idx.max_abs == 0 and "equal" in idx.words()
    # swap two output channels of the BN: y differs a lot, ArgMax picks other indices
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    for t in bad.graph.initializer:
        if len(t.dims) == 4:
            w = onnx.numpy_helper.to_array(t).copy()
            w[[0, 1]] = w[[1, 0]]
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    r = verify_onnx(m, bad)
    y, idx = r.outputs["cpu"]
    assert not r.passed and not y.passed and not idx.passed and idx.mismatches > 0 and idx.max_abs >= 1
    assert r.to_dict()["outputs"]["cpu"][1]["mismatches"] == idx.mismatches


def test_float64_model_is_held_to_float64_tolerance() -> None:
    """Gemm → BN in float64 (onnxruntime's CPU build has no float64 Conv)."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["g"], name="gemm", transB=1), bn_node("g", "y")]
    inits = [init("w", rng.standard_normal((5, 7))), init("b", rng.standard_normal(5)), *bn_inits("bn", 5, rng, np.float64)]
    m = make_model(nodes, [("input", ["N", 7], F64)], [("y", F64, ["N", 5])], inits)
    folded, report = fold_onnx(m)
    assert report.folded == 1
    result = verify_onnx(m, folded)
    y = result.outputs["cpu"][0]
    assert result.passed and y.dtype == "float64" and y.floor == FLOOR["float64"] and y.max_rel_to_scale < 1e-12


def test_tolerance_overrides_decide_the_verdict() -> None:
    folded, _ = fold_onnx(RESNET)
    bad = corrupt(folded)
    (out,) = verify_onnx(RESNET, bad).outputs["cpu"]
    assert not out.passed and out.mismatches > 0 and out.fold_error > out.allowed > 0
    assert verify_onnx(RESNET, bad, rtol=10 * out.max_rel_to_scale).passed
    assert verify_onnx(RESNET, bad, rtol=0.0, atol=2 * out.max_abs).passed
    r = CliRunner().invoke(main, ["verify", str(RESNET), "-", "--rtol", "x"])
    assert r.exit_code == EXIT_USAGE


def test_nan_in_the_same_place_is_equal_a_new_nan_is_a_mismatch(monkeypatch) -> None:
    from bnfold import verify as verify_mod

    comps: dict = {}
    a = np.array([1.0, np.nan, np.inf, -2.0], np.float32)
    verify_mod._accumulate(comps, "y", a, a.copy(), [], None, None, "normal")
    assert comps["y"].passed and comps["y"].max_abs == 0
    b = a.copy()
    b[0] = np.nan
    verify_mod._accumulate(comps, "y", a, b, [], None, None, "large")
    assert not comps["y"].passed and "non-finite" in comps["y"].problem and "DIFFERENT" in comps["y"].words()
    comps = {}
    verify_mod._accumulate(comps, "y", a, np.array([1.0, np.nan, -np.inf, -2.0], np.float32), [], None, None, "normal")
    assert not comps["y"].passed


def test_non_finite_values_in_the_original_are_said_plainly() -> None:
    """Log of a value that is sometimes negative: NaN in the original, the same NaN in the copy."""
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[64] input) => (float[64] output) {
            output = Log(input)
        }""")
    result = verify_onnx(m, m, trials=1)
    assert result.passed
    assert any("the original gives inf/NaN for" in n and "'output'" in n for n in result.notes), result.notes


def test_fold_is_compared_at_ort_disable_all_and_only_the_original_is_optimised(monkeypatch) -> None:
    """onnxruntime fuses Conv+BN at its basic level: an optimised reference would check the fold against
    itself. The one ORT_ENABLE_ALL session is the original's, as a measure of its own float noise."""
    sessions = []
    real = ort.InferenceSession

    def spy(model, sess_options=None, *args, **kwargs):
        sessions.append((model, sess_options.graph_optimization_level))
        return real(model, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    folded, _ = fold_onnx(RESNET)
    verify_onnx(RESNET, folded, trials=1)
    levels = [level for _, level in sessions]
    assert levels.count(ort.GraphOptimizationLevel.ORT_DISABLE_ALL) == 3  # original, folded, original ±1 ulp
    (optimised,) = [m for m, level in sessions if level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL]
    assert optimised == str(RESNET)


def test_onnxruntime_failure_at_run_time_is_a_one_line_error(tmp_path: Path) -> None:
    """A Gather index beyond the table: onnxruntime fails while running, not while loading."""
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[2] i) => (float[2, 3] output) <float[2, 3] table = {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}> {
            output = Gather<axis = 0>(table, i)
        }""")
    path = tmp_path / "g.onnx"
    onnx.save(m, path)
    np.savez(tmp_path / "bad.npz", i=np.array([0, 7], np.int64))
    result = CliRunner().invoke(main, ["verify", str(path), str(path), "--inputs", str(tmp_path / "bad.npz")])
    assert result.exit_code == EXIT_USAGE and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "onnxruntime failed" in lines[0]
    np.savez(tmp_path / "ok.npz", i=np.array([1, 0], np.int64))
    ok = CliRunner().invoke(main, ["verify", str(path), str(path), "--inputs", str(tmp_path / "ok.npz")])
    assert ok.exit_code == EXIT_OK and "int64" not in ok.output.split("\n")[0]


def test_sample_fp16_model_folds_and_passes() -> None:
    path = SAMPLES / "conv_bn_fp16.onnx"
    folded, report = fold_onnx(path)
    assert report.folded == 1
    result = verify_onnx(path, folded, trials=3)
    (out,) = result.outputs["cpu"]
    assert result.passed and out.dtype == "float16" and out.floor == FLOOR["float16"], str(result)


def test_a_noise_measure_onnxruntime_cannot_build_is_left_out_with_a_note(monkeypatch) -> None:
    """An optimiser that fails on the original is no reason to fail the fold: ±1 ulp still measures."""
    import bnfold.verify as verify_mod
    from bnfold.errors import InputError

    real = verify_mod.make_session

    def no_optimiser(source, provider="cpu", level="disable_all", *a, **k):
        if level == "enable_all":
            raise InputError("original: onnxruntime cannot load it (optimiser failed)")
        return real(source, provider, level, *a, **k)

    monkeypatch.setattr(verify_mod, "make_session", no_optimiser)
    folded, _ = fold_onnx(RESNET)
    result = verify_onnx(RESNET, folded)
    (out,) = result.outputs["cpu"]
    assert result.passed and out.noise > 0 and out.noise_source == verify_mod.ULP_NOISE
    assert any("onnxruntime's own optimisation left out" in n for n in result.notes), result.notes


def test_an_input_too_large_to_allocate_is_a_one_line_error(tmp_path: Path) -> None:
    """A fixed dimension of 10^12: exit 2 with one line that names the input, never a MemoryError."""
    relu = helper.make_node("Relu", ["input"], ["output"], name="relu")
    m = make_model([relu], [("input", [1, 10**12], F32)], [("output", F32, [1, 10**12])], [])
    path = tmp_path / "huge.onnx"
    onnx.save(m, path)
    result = CliRunner().invoke(main, ["verify", str(path), str(path)])
    assert result.exit_code == EXIT_USAGE and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert "input 'input' of shape 1x1000000000000" in line and "--shape" in line


def test_all_non_finite_output_is_not_a_pass() -> None:
    """Two models that both output inf everywhere prove nothing: that is a failure, not a vacuous pass."""
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] input) => (float[2, 3] output) <float[3] zero = {0.0, 0.0, 0.0}> {
            output = Div(input, zero)
        }""")
    result = verify_onnx(m, m, trials=1)
    assert not result.passed
    assert any("non-finite everywhere" in n for n in result.notes)
