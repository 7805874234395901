"""The fold command: `bnfold model.onnx -o folded.onnx` exactly as written, its guards and its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import EXIT_OK, EXIT_USAGE
from tests.onnx.helpers import assert_equivalent, conv_bn_relu, op_types
from tests.paths import ROOT


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_fold_exactly_as_written_folds_and_writes(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    result = run(str(model_path), "-o", str(out))
    assert result.exit_code == EXIT_OK, result.output
    assert "1 BatchNorm found, 1 folded, 0 left" in result.output
    folded = onnx.load(out)
    assert "BatchNormalization" not in op_types(folded)
    assert_equivalent(onnx.load(model_path), folded, np.random.default_rng(0))


def test_fold_subcommand_and_default_output_name(model_path: Path) -> None:
    result = run("fold", str(model_path), "--no-verify")
    assert result.exit_code == EXIT_OK, result.output
    assert (model_path.parent / "model.folded.onnx").exists()


def test_never_overwrites_input_without_in_place(model_path: Path) -> None:
    before = model_path.read_bytes()
    result = CliRunner().invoke(main, [str(model_path), "-o", str(model_path)])
    assert result.exit_code == EXIT_USAGE
    assert "--in-place" in result.output
    assert model_path.read_bytes() == before


def test_in_place_overwrites_atomically(model_path: Path) -> None:
    result = run(str(model_path), "--in-place")
    assert result.exit_code == EXIT_OK, result.output
    assert "BatchNormalization" not in op_types(onnx.load(model_path))
    assert [p.name for p in model_path.parent.iterdir()] == ["model.onnx"]  # no temp files left


def test_json_report_keys(model_path: Path, tmp_path: Path) -> None:
    result = run(str(model_path), "-o", str(tmp_path / "o.onnx"), "--json")
    assert result.exit_code == EXIT_OK
    data = json.loads(result.output)
    for key in ("batchnorms_found", "batchnorms_folded", "batchnorms_left", "nodes_before", "nodes_after",
                "params_before", "params_after", "seconds", "candidates", "output", "verification"):
        assert key in data
    assert data["batchnorms_folded"] == 1
    assert data["candidates"][0]["status"] == "folded"
    assert data["candidates"][0]["target"] == "conv"


def test_report_explains_what_is_left(tmp_path: Path) -> None:
    m = conv_bn_relu(np.random.default_rng(2))
    m.graph.output.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 4, 6, 6]))  # conv output exposed
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    result = run(str(p), "-o", str(tmp_path / "o.onnx"), "--no-verify")
    assert result.exit_code == EXIT_OK
    assert "[graph-output]" in result.output and "'conv'" in result.output


def test_quiet_prints_nothing(model_path: Path, tmp_path: Path) -> None:
    result = run(str(model_path), "-o", str(tmp_path / "o.onnx"), "-q", "--no-verify")
    assert result.exit_code == EXIT_OK and result.output == ""


def test_installed_console_script(model_path: Path, tmp_path: Path) -> None:
    exe = shutil.which("bnfold")
    if exe is None:
        pytest.skip("the bnfold console script is not on PATH (package not installed)")
    out = tmp_path / "cs.onnx"
    proc = subprocess.run([exe, str(model_path), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "1 folded" in proc.stdout


def test_help_does_not_import_the_heavy_libraries() -> None:
    """`bnfold --help` must answer fast: neither onnx, onnxruntime nor torch is imported for it."""
    code = (
        "import sys\n"
        "from bnfold.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['fold', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'torch', 'onnx_graphsurgeon') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "Examples" in proc.stdout


def test_wheel_has_no_top_level_cli_package(tmp_path: Path) -> None:
    """cli/ ships as bnfold.cli; a top-level `cli` package would collide with other projects."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip()[-200:]}")
    import zipfile

    wheel = next(tmp_path.glob("bnfold-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("cli/") for n in names)
    assert "bnfold/cli/__init__.py" in names and "bnfold/cli/fold_cmd.py" in names
    # every package and its data ships, not only what an editable install happens to find
    for shipped in ("bnfold/onnx/rules/conv.py", "bnfold/onnx/rules/reparam.py", "bnfold/check/gate.py",
                    "bnfold/check/check-v1.schema.json", "bnfold/torch/api.py", "bnfold/__main__.py"):
        assert shipped in names, shipped


def test_torch_front_end_without_torch_says_what_to_install(monkeypatch) -> None:
    import importlib
    import sys

    import bnfold

    real = importlib.import_module

    def no_torch(name, *a, **k):
        if name.startswith("bnfold.torch"):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_torch)
    with pytest.raises(ImportError, match=r"needs PyTorch, which is not installed: pip install 'torch>=2\.13' 'onnxscript>=0\.3' \(in a bnfold source checkout: pip install -e '\.\[torch\]'\)"):
        bnfold.fold_torch  # noqa: B018
    assert "bnfold" in sys.modules
