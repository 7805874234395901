"""Provider selection: CPU always, CUDA only where onnxruntime really runs it, never a silent CPU run.

This machine's onnxruntime is the CPU build, so the CUDA branches are driven by monkeypatching
`onnxruntime.get_available_providers`: once to say CUDA is missing (exit 2, one line), once to claim it
is there while the session still falls back to the CPU (caught after the session starts, exit 2).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import EXIT_OK, EXIT_USAGE, ProviderUnavailableError, UsageError
from bnfold.providers import NAMES, assert_running_on, choose, session_providers
from bnfold.sessions import make_session, model_source
from tests.paths import RESNET

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
CLAIMS_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture()
def folded(tmp_path: Path) -> Path:
    from bnfold import fold_onnx

    path = tmp_path / "folded.onnx"
    onnx.save(fold_onnx(RESNET)[0], path)
    return path


def one_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_choose_cpu_cuda_all(monkeypatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: CPU_ONLY)
    assert choose("cpu").selected == ["cpu"] and choose("CPU").notes == []
    with pytest.raises(ProviderUnavailableError) as info:
        choose("cuda")
    message = str(info.value)
    assert "CUDAExecutionProvider is not available in this onnxruntime build" in message
    assert "onnxruntime-gpu" in message and "\n" not in message and info.value.exit_code == EXIT_USAGE
    every = choose("all")
    assert every.selected == ["cpu"] and len(every.notes) == 1 and "onnxruntime-gpu" in every.notes[0]

    monkeypatch.setattr(ort, "get_available_providers", lambda: CLAIMS_CUDA)
    assert choose("cuda").selected == ["cuda"]
    assert choose("all").selected == ["cpu", "cuda"] and choose("all").notes == []
    with pytest.raises(UsageError):
        choose("tpu")


def test_session_provider_lists() -> None:
    assert session_providers("cpu") == ["CPUExecutionProvider"]
    assert session_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # CPU for ops CUDA lacks
    assert NAMES == {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def test_a_session_that_fell_back_to_cpu_is_not_reported_as_cuda() -> None:
    class Fallen:
        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    class OnCuda:
        def get_providers(self) -> list[str]:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    assert_running_on(Fallen(), "cpu")
    assert_running_on(OnCuda(), "cuda")
    with pytest.raises(ProviderUnavailableError, match="did not start CUDAExecutionProvider"):
        assert_running_on(Fallen(), "cuda")


def test_real_session_asked_for_cuda_on_a_cpu_build_is_refused(monkeypatch) -> None:
    """The path a broken CUDA install takes: the provider is listed, onnxruntime still runs on the CPU."""
    if HAS_CUDA:
        pytest.skip("this onnxruntime has a working CUDA provider; the fallback cannot be provoked here")
    monkeypatch.setattr(ort, "get_available_providers", lambda: CLAIMS_CUDA)
    source = model_source(RESNET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime's own "not in available providers"
        with pytest.raises(ProviderUnavailableError, match="did not start CUDAExecutionProvider"):
            make_session(source, "cuda")
    assert make_session(source, "cpu").get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_cuda_missing_is_exit_2_in_one_line_before_any_work(command: str, folded: Path, monkeypatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: CPU_ONLY)
    calls: list[object] = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: calls.append(a))  # no session may start
    result = CliRunner().invoke(main, [command, str(RESNET), str(folded), "--provider", "cuda"])
    assert result.exit_code == EXIT_USAGE, result.output
    line = one_line(result.output)
    assert line.startswith("bnfold: error: CUDAExecutionProvider is not available") and "onnxruntime-gpu" in line
    assert calls == []


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_cuda_listed_but_falling_back_is_exit_2(command: str, folded: Path, monkeypatch) -> None:
    if HAS_CUDA:
        pytest.skip("this onnxruntime has a working CUDA provider; the fallback cannot be provoked here")
    monkeypatch.setattr(ort, "get_available_providers", lambda: CLAIMS_CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = CliRunner().invoke(main, [command, str(RESNET), str(folded), "--provider", "cuda"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "did not start CUDAExecutionProvider" in one_line(result.output)


def test_all_without_cuda_says_so_in_one_line_and_runs_cpu(folded: Path, monkeypatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: CPU_ONLY)
    result = CliRunner().invoke(main, ["verify", str(RESNET), str(folded), "--provider", "all"])
    assert result.exit_code == EXIT_OK, result.output
    notes = [ln for ln in result.output.splitlines() if "CUDAExecutionProvider" in ln]
    assert len(notes) == 1 and "skipped CUDA" in notes[0]
    assert "onnxruntime on cpu at" in result.output and "cuda:" not in result.output


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not available in this onnxruntime build (install onnxruntime-gpu)")
def test_cuda_session_really_runs_on_cuda() -> None:
    session = make_session(model_source(RESNET), "cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (out,) = session.run(None, {"input": x})
    assert np.isfinite(out).all()
