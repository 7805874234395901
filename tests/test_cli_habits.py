"""The command line as people type it (issue: onnxsim/onnxslim/Polygraphy habits, CI use).

One test (or more) per complaint: options before the model, OUTPUT as a second word, mistyped
commands, one vocabulary (--json, -q, --progress) across commands, fold taking verify's options,
`python -m bnfold`, progress on a terminal only with a right ETA, "wrote x.onnx (+ x.onnx.data)",
`-o out.json`, check's missing paths and broken links, packaging of the torch extra.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE
from tests.onnx.helpers import conv_bn_relu, op_types

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "model.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(1)), p)
    return p


def run(*args: object, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def folded_ok(path: Path) -> bool:
    return path.exists() and "BatchNormalization" not in op_types(onnx.load(path))


# ------------------------------------------------------------------------------------------------
# The default command is real
# ------------------------------------------------------------------------------------------------
def test_options_before_the_model(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    r = run("-o", out, model)
    assert r.exit_code == EXIT_OK, r.output
    assert folded_ok(out)
    r = run("-q", "--no-verify", "-o", tmp_path / "q.onnx", model)
    assert r.exit_code == EXIT_OK and r.output == ""
    assert folded_ok(tmp_path / "q.onnx")


def test_output_as_a_second_word(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "second.onnx"
    r = run(model, out)
    assert r.exit_code == EXIT_OK, r.output
    assert folded_ok(out) and f"wrote {out}" in r.output
    r = run(model, out, "-o", out)  # the same file twice is fine
    assert r.exit_code == EXIT_OK
    r = run(model, out, "-o", tmp_path / "other.onnx")
    assert r.exit_code == EXIT_USAGE and "name different files" in r.output


def test_mistyped_command_is_named_when_no_such_file_exists(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["foldd", "m.onnx"])
    assert r.exit_code == EXIT_USAGE
    assert r.output.strip() == "bnfold: error: no such command 'foldd' (did you mean fold?)"
    r = CliRunner().invoke(main, ["chekc", "models/"])
    assert "no such command 'chekc' (did you mean check?)" in r.output
    # a file of that name is a model, as asked
    onnx.save(conv_bn_relu(np.random.default_rng(0)), tmp_path / "foldd")
    r = CliRunner().invoke(main, ["foldd", "-o", "x.onnx", "--no-verify"])
    assert r.exit_code == EXIT_OK, r.output
    # a path that does not exist is a missing model, not a command
    r = CliRunner().invoke(main, ["missing.onnx"])
    assert r.exit_code == EXIT_USAGE and "no such command" not in r.output and "missing.onnx" in r.output


def test_python_dash_m_runs_the_same_cli(model: Path, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("bnfold, version")
    out = tmp_path / "m.onnx"
    p = subprocess.run([sys.executable, "-m", "bnfold", "-q", str(model), str(out)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and folded_ok(out)
    p = subprocess.run([sys.executable, "-m", "bnfold", "foldd"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == EXIT_USAGE and "did you mean fold?" in p.stderr


def test_installed_console_script_takes_options_first_and_a_second_word(model: Path, tmp_path: Path) -> None:
    exe = shutil.which("bnfold")
    if exe is None:
        pytest.skip("the bnfold console script is not on PATH (pip install -e .)")
    p = subprocess.run([exe, "-q", "-o", str(tmp_path / "a.onnx"), str(model)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stderr
    p = subprocess.run([exe, str(model), str(tmp_path / "b.onnx")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"wrote {tmp_path / 'b.onnx'}" in p.stdout
    assert p.stderr == ""  # no progress line: stderr is not a terminal
    p = subprocess.run([exe, "foldd", "x.onnx"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == EXIT_USAGE and p.stderr.strip() == "bnfold: error: no such command 'foldd' (did you mean fold?)"


# ------------------------------------------------------------------------------------------------
# One vocabulary
# ------------------------------------------------------------------------------------------------
def test_every_command_has_json_quiet_and_progress() -> None:
    for name in ("fold", "check", "verify", "bench"):
        cmd = main.get_command(None, name)  # type: ignore[arg-type]
        opts = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        assert {"--json", "-q", "--quiet", "--progress", "--no-progress"} <= opts, name


def test_fold_takes_verifys_options_and_passes_them_through(model: Path, tmp_path: Path, monkeypatch) -> None:
    import bnfold.verify

    fold_opts = {o for p in main.get_command(None, "fold").params for o in p.opts}  # type: ignore[union-attr]
    verify_opts = {o for p in main.get_command(None, "verify").params for o in p.opts}  # type: ignore[union-attr]
    assert {"--shape", "--inputs", "--trials", "--rtol", "--atol", "--provider", "--seed"} <= fold_opts & verify_opts

    seen: list[dict] = []
    real = bnfold.verify.verify_onnx

    def spy(original, folded, **kwargs):
        seen.append(kwargs)
        return real(original, folded, **kwargs)

    monkeypatch.setattr(bnfold.verify, "verify_onnx", spy)
    feeds = tmp_path / "x.npz"
    np.savez(feeds, input=np.ones((1, 3, 6, 6), np.float32))
    args = ["--shape", "input:1x3x6x6", "--trials", "2", "--rtol", "1e-4", "--atol", "1e-7", "--provider", "cpu",
            "--seed", "7"]
    r = run(model, tmp_path / "o.onnx", *args)
    assert r.exit_code == EXIT_OK, r.output
    assert seen[-1] == {"provider": "cpu", "trials": 2, "seed": 7, "shapes": {"input": [1, 3, 6, 6]}, "inputs": None,
                        "rtol": 1e-4, "atol": 1e-7}
    r = run(model, tmp_path / "p.onnx", "--inputs", feeds)
    assert r.exit_code == EXIT_OK, r.output
    assert seen[-1]["inputs"] == feeds
    # the verify command hands the same options over the same way
    r = run("verify", model, tmp_path / "o.onnx", *args)
    assert r.exit_code == EXIT_OK, r.output
    assert seen[-1] == seen[-3]


def test_verification_options_with_no_verify_are_a_usage_error(model: Path, tmp_path: Path) -> None:
    r = run(model, tmp_path / "o.onnx", "--no-verify", "--trials", "5")
    assert r.exit_code == EXIT_USAGE
    assert r.output.strip() == "bnfold: error: --trials configures the verification, which --no-verify turns off"
    assert not (tmp_path / "o.onnx").exists()


def test_quiet_is_no_output_but_errors_everywhere(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    assert run("-q", model, out).output == ""
    assert run("verify", "-q", model, out).output == ""
    r = run("bench", "-q", model, out, "--repeats", "2", "--warmup", "0", "--level", "disable_all")
    assert r.exit_code == EXIT_OK and r.output == ""
    r = run("check", "-q", model)
    assert r.exit_code == EXIT_CHECK_FAILED and r.output == ""  # the exit code says it
    r = run("check", "-q", model, tmp_path / "nope.onnx")
    assert r.exit_code == EXIT_USAGE
    assert r.stdout == "" and r.stderr.strip() == f"ERROR {tmp_path / 'nope.onnx'}: no such file or directory"
    r = run("verify", "-q", model, tmp_path / "nope.onnx")
    assert r.exit_code == EXIT_USAGE and r.stderr.startswith("bnfold: error:")


def test_check_json_is_an_alias_of_format_json(model: Path) -> None:
    a, b = run("check", "--json", model), run("check", "--format", "json", model)
    assert a.exit_code == b.exit_code == EXIT_CHECK_FAILED
    assert json.loads(a.stdout) == json.loads(b.stdout)
    r = run("check", "--json", "--format", "github", model)
    assert r.exit_code == EXIT_USAGE and "two formats" in r.output


# ------------------------------------------------------------------------------------------------
# Progress: on a terminal only, right ETA
# ------------------------------------------------------------------------------------------------
class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch) -> Tty:
    from bnfold.cli import _progress

    tty = Tty()
    monkeypatch.setattr(_progress, "stderr", lambda: tty)
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    return tty


def test_fold_shows_progress_on_a_terminal_only(model: Path, tmp_path: Path, terminal: Tty) -> None:
    r = run(model, tmp_path / "o.onnx")
    assert r.exit_code == EXIT_OK
    assert f"folding {model}" in terminal.getvalue() and "folding" not in r.stdout
    assert terminal.getvalue().endswith("\r\x1b[K")  # the line is cleared before the report
    terminal.seek(0)
    terminal.truncate()
    run(model, tmp_path / "p.onnx", "--no-progress")
    run("-q", model, tmp_path / "q.onnx")
    assert terminal.getvalue() == ""


def test_check_shows_progress_for_a_single_model_on_a_terminal(model: Path, terminal: Tty) -> None:
    r = run("check", model)
    assert r.exit_code == EXIT_CHECK_FAILED
    assert "checking" in terminal.getvalue() and "checking" not in r.stdout


def test_no_progress_when_stderr_is_not_a_terminal(model: Path, monkeypatch) -> None:
    from bnfold.cli import _progress

    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    r = run("check", model)
    assert "checking" not in r.output
    r = run("check", model, "--progress")  # asked for: shown even in a log
    assert re.search(r"checking \d/1 ", r.stderr)


def test_eta_is_measured_from_the_first_step_not_from_the_set_up() -> None:
    """bench showed 00:16:54 for a 3 s run: 10 s of set-up were charged to the first step."""
    from bnfold.cli._progress import Progress

    now = [0.0]
    p = Progress("bench", total=100, enabled=False, clock=lambda: now[0])
    now[0] = 10.0  # sessions created, nothing timed yet
    assert p.eta() is None and "ETA --:--" in p.line()
    p.advance()  # the first run ends at t = 10
    for _ in range(9):
        now[0] += 0.03
        p.advance()
    assert p.eta() == pytest.approx(90 * 0.03)
    assert p.line().endswith("ETA 0:03") and "10/100 (10%)" in p.line()


def test_bench_progress_counts_runs_and_ends_at_its_total(model: Path, tmp_path: Path, terminal: Tty) -> None:
    r = run("bench", model, "--repeats", "3", "--warmup", "1", "--level", "disable_all")
    assert r.exit_code == EXIT_OK, r.output
    drawn = [s for s in terminal.getvalue().split("\r\x1b[K") if s]
    assert drawn and all(re.match(r"bnfold bench: model runs \d+/8 \(\d+%\)", s) for s in drawn)


# ------------------------------------------------------------------------------------------------
# What fold writes and refuses
# ------------------------------------------------------------------------------------------------
def test_wrote_line_names_the_external_data_file(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    r = run(model, out, "--external-data", "always", "--no-verify")
    assert r.exit_code == EXIT_OK, r.output
    assert r.output.splitlines()[-1] == f"wrote {out} (+ {out}.data)"
    assert json.loads(run(model, out, "--external-data", "always", "--json").stdout)["output_data"] == f"{out}.data"
    r = run(model, tmp_path / "y.onnx", "--no-verify")
    assert r.output.splitlines()[-1] == f"wrote {tmp_path / 'y.onnx'}"


@pytest.mark.parametrize("name", ["out.json", "out", "out.onnx.data"])
def test_output_that_is_not_an_onnx_file_is_a_one_line_error(model: Path, tmp_path: Path, name: str) -> None:
    r = run(model, "-o", tmp_path / name)
    assert r.exit_code == EXIT_USAGE
    assert len(r.output.strip().splitlines()) == 1 and "must end in .onnx" in r.output
    assert not (tmp_path / name).exists()
    if name == "out.json":
        assert "use --json" in r.output


# ------------------------------------------------------------------------------------------------
# check: hints, missing paths, broken links (on the command line)
# ------------------------------------------------------------------------------------------------
def test_check_missing_path_is_an_error_not_one_model_checked(tmp_path: Path) -> None:
    r = run("check", tmp_path / "nope.onnx")
    assert r.exit_code == EXIT_USAGE
    assert "1 model checked" not in r.output and "0 models checked, 1 path named no model" in r.output


def test_check_folder_of_only_broken_links_says_so(tmp_path: Path) -> None:
    d = tmp_path / "models"
    d.mkdir()
    (d / "a.onnx").symlink_to(tmp_path / "gone" / "a.onnx")
    r = run("check", d)
    assert r.exit_code == EXIT_USAGE
    assert f"ERROR {d / 'a.onnx'}: broken symbolic link" in r.output and "no *.onnx" not in r.output


def test_check_prints_a_shared_hint_once_per_model(tmp_path: Path) -> None:
    m = onnx.shape_inference.infer_shapes(onnx.load(ROOT / "sample_models" / "resnet_tiny.onnx"))
    conv_outputs = {n.input[0] for n in m.graph.node if n.op_type == "BatchNormalization"}
    m.graph.output.extend([v for v in m.graph.value_info if v.name in conv_outputs])  # every conv output exposed
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    r = run("check", p, "--strict")
    assert r.stdout.count("[graph-output]") == 7  # six findings and one grouped hint
    assert r.stdout.count("hint") == 1 and "hint for all 6 [graph-output] here:" in r.stdout


# ------------------------------------------------------------------------------------------------
# Fast help, no torch
# ------------------------------------------------------------------------------------------------
def test_help_is_fast_and_no_command_imports_torch(model: Path, tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from bnfold.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('HELP_S', time.perf_counter() - t)\n"
        "for argv in sys.argv[1:]:\n"
        "    try:\n        main(argv.split('|'))\n    except SystemExit:\n        pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = tmp_path / "o.onnx"
    runs = [f"{c}|--help" for c in ("fold", "check", "verify", "bench")] + [
        f"-q|{model}|{out}", f"check|-q|{model}", f"verify|-q|{model}|{out}",
        f"bench|-q|{model}|{out}|--repeats|1|--warmup|0|--level|disable_all",
    ]
    best = float("inf")
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", code, *runs], capture_output=True, text=True, timeout=300)
        assert "TORCH False" in p.stdout, p.stdout + p.stderr
        best = min(best, float(re.search(r"HELP_S (\S+)", p.stdout).group(1)))
    assert best < 0.5, f"bnfold --help took {best:.2f} s"


# ------------------------------------------------------------------------------------------------
# Packaging: a range for users, a pin for CI
# ------------------------------------------------------------------------------------------------
def _extra(name: str) -> list[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    line = re.search(rf"^{name} = \[(.*)\]$", text, flags=re.M).group(1)
    return [s.strip().strip('"') for s in line.split(",") if s.strip()]


def test_torch_extra_is_a_range_and_ci_pins_its_own_torch() -> None:
    import bnfold

    torch_req = next(r for r in _extra("torch") if r.startswith("torch"))
    assert "==" not in torch_req and ">=" in torch_req
    assert tuple(_extra("torch")) == bnfold.TORCH_REQUIREMENTS
    constraints = (ROOT / ".ci" / "constraints.txt").read_text(encoding="utf-8")
    assert re.search(r"^torch==2\.13\.0\+cpu$", constraints, flags=re.M)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -e ".[test]" -c .ci/constraints.txt' in ci


def test_installed_torch_is_within_the_supported_range() -> None:
    torch = pytest.importorskip("torch")
    low = next(r for r in _extra("torch") if r.startswith("torch")).split(">=")[1]
    have = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert have >= tuple(int(x) for x in low.split("."))
