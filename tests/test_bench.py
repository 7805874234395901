"""`bnfold bench`: both levels, session creation, ratio with its interval; JSON keys; honest about CUDA.

Behaviour only: tiny repeat counts, no assertion on any timing's value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bnfold import fold_onnx
from bnfold.bench import bench_onnx, bootstrap_ratio_ci, planned_runs
from bnfold.cli import main
from bnfold.errors import EXIT_OK, EXIT_USAGE
from bnfold.providers import choose
from tests.paths import RESNET

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
FAST = ["--repeats", "3", "--warmup", "1"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def run(*args: str):
    return CliRunner().invoke(main, ["bench", *args])


def one_line_error(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("bnfold: error: ") and "Traceback" not in output
    return lines[0]


def test_text_output_has_both_levels_session_times_and_ratio_with_interval() -> None:
    result = run(str(RESNET), *FAST)
    assert result.exit_code == EXIT_OK, result.output
    out = result.output
    assert "ORT_DISABLE_ALL (raw effect of folding)" in out
    assert "ORT_ENABLE_ALL (what a deployment sees)" in out
    assert out.index("ORT_DISABLE_ALL") < out.index("ORT_ENABLE_ALL")
    assert out.count("session ms") == 2 and " s " not in out.split("\n", 3)[-1] and out.count("median ms") == 2 and out.count("items/s") == 2
    assert out.count("speedup original/folded (median):") == 2 and out.count("95% CI [") == 2
    # the configuration is reported: threads, batch, repeats, warm-up, onnxruntime version, CPU count
    assert "intra-op thread(s)" in out and "batch 1" in out and "3 timed runs after 1 warm-up" in out
    assert f"onnxruntime {ort.__version__}" in out and "CPU(s)" in out
    assert "folded in memory (6 BatchNorm(s) folded" in out


def test_json_keys() -> None:
    result = run(str(RESNET), *FAST, "--json", "--threads", "1")
    assert result.exit_code == EXIT_OK, result.output
    data = json.loads(result.output)
    assert set(data) == {"original", "folded", "fold", "config", "results", "notes"}
    assert set(data["config"]) >= {"providers", "levels", "threads", "batch", "repeats", "warmup", "seed",
                                   "inputs", "onnxruntime", "cpu_count", "session_creations", "spinning"}
    assert data["config"]["threads"] == 1 and data["config"]["repeats"] == 3 and data["config"]["warmup"] == 1
    assert data["config"]["onnxruntime"] == ort.__version__
    assert [r["ort_level"] for r in data["results"]] == ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"]
    for r in data["results"]:
        assert set(r) == {"provider", "level", "ort_level", "label", "original", "folded", "speedup"}
        assert r["provider"] == "cpu"
        for m in (r["original"], r["folded"]):
            assert set(m) == {"label", "session_creation_s", "session_creation_runs_s", "median_ms", "p10_ms",
                              "p90_ms", "throughput_items_per_s", "times_ms"}
            assert len(m["times_ms"]) == 3 and len(m["session_creation_runs_s"]) == 3
            assert m["p10_ms"] <= m["median_ms"] <= m["p90_ms"]
        s = r["speedup"]
        assert set(s) == {"ratio", "ci95", "definition", "method"}
        assert len(s["ci95"]) == 2 and s["ci95"][0] <= s["ci95"][1]


def test_folded_file_given_versus_folded_in_memory(tmp_path: Path) -> None:
    folded_path = tmp_path / "folded.onnx"
    onnx.save(fold_onnx(RESNET)[0], folded_path)
    given = bench_onnx(RESNET, folded_path, repeats=2, warmup=0, levels=["disable_all"])
    assert given.fold is None and given.folded == str(folded_path)
    assert str(folded_path) in str(given)
    memory = bench_onnx(RESNET, repeats=2, warmup=0, levels=["disable_all"])
    assert memory.fold is not None and memory.fold["batchnorms_folded"] == 6 and memory.fold["seconds"] >= 0
    assert memory.folded == "folded in memory"
    assert [r.level for r in given.runs] == [r.level for r in memory.runs] == ["disable_all"]


def test_one_level_only() -> None:
    result = run(str(RESNET), *FAST, "--level", "enable_all")
    assert result.exit_code == EXIT_OK, result.output
    assert "ORT_ENABLE_ALL (what a deployment sees)" in result.output and "ORT_DISABLE_ALL" not in result.output


def test_progress_is_called_once_per_model_run() -> None:
    steps: list[int] = []
    bench_onnx(RESNET, repeats=3, warmup=2, progress=steps.append)
    assert sum(steps) == planned_runs(1, 2, 3, 2) == 20


def test_no_progress_bar_when_stderr_is_not_a_terminal() -> None:
    result = run(str(RESNET), *FAST)  # CliRunner's stderr is not a TTY
    assert result.exit_code == EXIT_OK
    assert "bnfold bench  [" not in result.output and "#" not in result.output


def test_bootstrap_interval_is_seeded_and_exact_for_an_exact_ratio() -> None:
    rng = np.random.default_rng(1)
    b = rng.uniform(1.0, 2.0, 40)
    assert bootstrap_ratio_ci(2 * b, b) == pytest.approx((2.0, 2.0))
    a = b * rng.uniform(0.9, 1.3, 40)
    assert bootstrap_ratio_ci(a, b, seed=3) == bootstrap_ratio_ci(a, b, seed=3)
    lo, hi = bootstrap_ratio_ci(a, b, seed=3)
    assert lo <= float(np.median(a) / np.median(b)) <= hi


def test_missing_file_is_exit_2_in_one_line(tmp_path: Path) -> None:
    result = run(str(tmp_path / "nope.onnx"), *FAST)
    assert result.exit_code == EXIT_USAGE
    assert "no such file" in one_line_error(result.output)


def test_batch_on_a_fixed_dimension_is_exit_2() -> None:
    result = run(str(RESNET), *FAST, "--batch", "4")
    assert result.exit_code == EXIT_USAGE
    assert "--batch 4" in one_line_error(result.output)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDAExecutionProvider")
def test_cuda_missing_is_exit_2_naming_onnxruntime_gpu() -> None:
    result = run(str(RESNET), *FAST, "--provider", "cuda")
    assert result.exit_code == EXIT_USAGE
    line = one_line_error(result.output)
    assert "CUDAExecutionProvider" in line and "onnxruntime-gpu" in line


def test_provider_selection_with_cuda_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA reported available, cuda and all select it; nothing is run here."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: WITH_CUDA)
    assert choose("cuda").selected == ["cuda"]
    assert choose("all").selected == ["cpu", "cuda"] and choose("all").notes == []
    assert planned_runs(len(choose("all").selected), 2, 3, 1) == 32


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDAExecutionProvider")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_cuda_listed_but_not_started_is_refused_not_run_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime falls back to the CPU when CUDA does not start: bench must not report that as CUDA."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: WITH_CUDA)
    result = run(str(RESNET), *FAST, "--provider", "cuda")
    assert result.exit_code == EXIT_USAGE
    assert "did not start CUDAExecutionProvider" in result.output


def test_cuda_runner_binds_inputs_and_outputs_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA timing path (I/O binding, synchronised per run), driven by a stand-in session."""
    import bnfold.bench as bench

    calls: list[tuple] = []

    class Binding:
        def bind_ortvalue_input(self, name, value):
            calls.append(("input", name, value))

        def bind_output(self, name, device):
            calls.append(("output", name, device))

        def synchronize_inputs(self):
            calls.append(("sync_in",))

        def synchronize_outputs(self):
            calls.append(("sync_out",))

    class Out:
        name = "output"

    class Session:
        def io_binding(self):
            return Binding()

        def get_outputs(self):
            return [Out()]

        def run_with_iobinding(self, binding):
            calls.append(("run",))

        def run(self, *a):  # pragma: no cover - must not be used on CUDA
            raise AssertionError("plain run on CUDA")

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(lambda x, dev, idx: ("ortvalue", dev, idx)))
    fn = bench._runner(Session(), {"input": np.zeros((1, 3), np.float32)}, "cuda")
    assert calls == [("input", "input", ("ortvalue", "cuda", 0)), ("output", "output", "cuda")]
    calls.clear()
    fn()
    fn()
    assert calls == [("sync_in",), ("run",), ("sync_out",)] * 2


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not available in this onnxruntime build")
def test_bench_on_cuda() -> None:
    result = bench_onnx(RESNET, provider="cuda", repeats=3, warmup=1)
    assert [r.provider for r in result.runs] == ["cuda", "cuda"]
    assert "— cuda" in str(result)


def test_onnxruntime_failure_at_run_time_is_a_one_line_error(tmp_path: Path) -> None:
    """A Reshape to a fixed size the fed shape cannot take: onnxruntime fails while running, not loading."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])],
        [onnx.numpy_helper.from_array(np.array([7], np.int64), "shape")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "reshape.onnx"
    onnx.save(m, path)
    result = run(str(path), str(path), *FAST)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "onnxruntime failed on the benchmark inputs" in one_line_error(result.output)
