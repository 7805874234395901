"""Issue 12: untrusted models and hostile file systems, one test per case the review found.

Every hostile model is built here, in the test's own folder; no real /dev node is touched (a private
character device is made with `os.mknod` where the platform lets us, else the test is skipped). Cases that
could hang or exhaust memory on a regression run in a subprocess with a timeout and a 3 GB address-space
limit, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bnfold import files
from bnfold.cli import main
from bnfold.errors import EXIT_USAGE, InputError, OutputError
from bnfold.onnx import io
from bnfold.onnx.api import fold_file
from tests.onnx.helpers import bn_inits, conv_bn_relu, init
from tests.onnx.helpers import bn_node, unchecked_model

SECRET = b"TOKEN=hunter2-do-not-leak\n"


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line(result, code: int = EXIT_USAGE, needle: str = "") -> str:
    text = result.output.strip()
    assert result.exit_code == code, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert needle in text, text
    return text


def debris(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if files.is_bnfold_temp(p.relative_to(folder)))


def point_external(m: onnx.ModelProto, name: str, location: str, length: int | None = None) -> None:
    """Make initializer `name` an external reference to `location` (no data inline)."""
    t = next(t for t in m.graph.initializer if t.name == name)
    nbytes = len(onnx.numpy_helper.to_array(t).tobytes())
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length if length is not None else nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


# ------------------------------------------------------------------------------------------------
# 1. Secret leak through external data
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def leaky(tmp_path: Path) -> Path:
    """A model whose conv bias is `sub/secret.txt`, `sub` a symlinked folder leading out of the model's folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET[:16])
    folder = tmp_path / "models"
    folder.mkdir()
    os.symlink(outside, folder / "sub")
    m = conv_bn_relu(np.random.default_rng(0))
    point_external(m, "conv.b", "sub/secret.txt")
    onnx.save(m, folder / "m.onnx")
    return folder / "m.onnx"


def _no_secret_written(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink() and "outside" not in p.parts:
            assert SECRET[:16] not in p.read_bytes(), p


def test_symlinked_folder_external_data_refused_by_fold_cli(leaky: Path) -> None:
    result = cli(leaky, "-o", leaky.parent / "out.onnx", "--no-verify")
    text = assert_one_line(result, needle="'conv.b'")
    assert "sub/secret.txt" in text and "outside the model's folder" in text
    assert not (leaky.parent / "out.onnx").exists()
    _no_secret_written(leaky.parent)


def test_symlinked_folder_external_data_refused_by_fold_file(leaky: Path) -> None:
    with pytest.raises(InputError, match="conv.b.*sub/secret.txt.*outside"):
        fold_file(leaky, leaky.parent / "out.onnx")
    _no_secret_written(leaky.parent)


def test_symlinked_folder_external_data_refused_by_check(leaky: Path) -> None:
    result = cli("check", leaky)
    assert result.exit_code == EXIT_USAGE
    assert "outside the model's folder" in result.output and "internal error" not in result.output


def test_symlinked_folder_external_data_refused_before_onnxruntime(leaky: Path) -> None:
    """verify and bench hand paths to onnxruntime, which reads external data by itself."""
    from bnfold.bench import bench_onnx
    from bnfold.verify import verify_onnx

    with pytest.raises(InputError, match="outside the model's folder"):
        verify_onnx(leaky, leaky)
    with pytest.raises(InputError, match="outside the model's folder"):
        bench_onnx(leaky, leaky, repeats=1, warmup=0, creations=1)
    assert_one_line(cli("verify", leaky, leaky), needle="outside the model's folder")


def test_sparse_initializer_external_data_is_checked_too(leaky: Path) -> None:
    """onnx's tensor walker skips sparse initializers; onnxruntime would read their external data."""
    m = onnx.load(leaky, load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "conv.b")
    values = onnx.TensorProto()
    values.CopyFrom(t)
    values.name = "sp.values"
    indices = onnx.numpy_helper.from_array(np.arange(4, dtype=np.int64), "sp.indices")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))
    m.graph.initializer.remove(t)
    m.graph.initializer.append(init("conv.b", np.zeros(4, np.float32)))
    onnx.save(m, leaky)
    from bnfold.verify import verify_onnx

    with pytest.raises(InputError, match="sp.values.*outside"):
        verify_onnx(leaky, leaky)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "file-symlink"])
def test_other_escapes_stay_refused(tmp_path: Path, how: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET[:16])
    folder = tmp_path / "models"
    folder.mkdir()
    location = {"dotdot": "../secret.txt", "absolute": str(secret), "file-symlink": "link.txt"}[how]
    if how == "file-symlink":
        os.symlink(secret, folder / "link.txt")
    m = conv_bn_relu(np.random.default_rng(0))
    point_external(m, "conv.b", location)
    onnx.save(m, folder / "m.onnx")
    assert_one_line(cli(folder / "m.onnx", "-o", folder / "out.onnx", "--no-verify"), needle="'conv.b'")
    _no_secret_written(folder)


# ------------------------------------------------------------------------------------------------
# 2. Special files as output
# ------------------------------------------------------------------------------------------------
def _special(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"special-{kind}"
    if kind == "chardev":
        try:
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a private "null" device, in tmp_path
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot make a device node here: {exc}")
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(p))
        except OSError as exc:
            pytest.skip(f"cannot bind a unix socket here: {exc}")
        finally:
            s.close()
    else:
        p.mkdir()
    return p


@pytest.mark.parametrize("kind", ["chardev", "fifo", "socket", "directory"])
def test_output_to_a_special_file_is_refused(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(0)), src)
    target = _special(tmp_path, kind)
    mode = os.lstat(target).st_mode
    assert_one_line(cli(src, "-o", target, "--no-verify"))
    with pytest.raises(OutputError):
        fold_file(src, target)
    assert stat.S_IFMT(os.lstat(target).st_mode) == stat.S_IFMT(mode), "the special file was replaced"
    assert debris(tmp_path) == []


def test_in_place_through_a_symlink_folds_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "store" / "model.onnx"
    real.parent.mkdir()
    onnx.save(conv_bn_relu(np.random.default_rng(0)), real)
    os.chmod(real, 0o640)
    link = tmp_path / "link.onnx"
    os.symlink(real, link)
    result = cli(link, "--in-place", "--no-verify", "-q")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(real).graph.node]
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o640


@pytest.mark.parametrize("dangling", [False, True])
def test_output_through_a_symlink_is_refused_unless_in_place(tmp_path: Path, dangling: bool) -> None:
    """A checkout may hold `out.onnx -> /etc/...`: a root CI job must not write through it."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(0)), src)
    elsewhere = tmp_path / "elsewhere.txt"
    if not dangling:
        elsewhere.write_text("not yours")
    os.symlink(elsewhere, tmp_path / "out.onnx")
    assert_one_line(cli(src, "-o", tmp_path / "out.onnx", "--no-verify"), needle="symlink")
    assert (tmp_path / "out.onnx").is_symlink()
    assert (elsewhere.read_text() == "not yours") if not dangling else not elsewhere.exists()


def test_in_place_keeps_the_mode_and_a_new_file_gets_the_umask_mode(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(0)), src)
    os.chmod(src, 0o640)
    assert cli(src, "--in-place", "--no-verify", "-q").exit_code == 0
    assert stat.S_IMODE(os.stat(src).st_mode) == 0o640
    old = os.umask(0o027)
    try:
        assert cli(src, "-o", tmp_path / "new.onnx", "--no-verify", "-q").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.onnx").st_mode) == 0o640  # 0666 & ~0027


def test_export_onnx_writes_the_umask_mode(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from bnfold.torch.export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    old = os.umask(0o022)
    try:
        export_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "e.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "e.onnx").st_mode) == 0o644
    assert debris(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# 3. Debris after a kill; the two-file commit
# ------------------------------------------------------------------------------------------------
def external_pair(folder: Path, seed: int = 0, name: str = "m.onnx") -> Path:
    m = conv_bn_relu(np.random.default_rng(seed), c_in=16, c_out=16)
    p = folder / name
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location=name + ".data", size_threshold=0)
    return p


PAUSE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from bnfold.onnx.api import fold_file
    src, dst, marker = sys.argv[1:4]
    def pause(written, report):
        open(marker, "w").close()
        time.sleep(60)
    fold_file(src, dst, before_commit=pause)
    """
)


def _default_signals() -> None:
    """The child starts with default dispositions even where the runner was started with SIGINT ignored
    (a shell's `cmd &` does that): bnfold rightly leaves an ignored signal ignored."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_mid_write_leaves_no_debris_and_the_old_pair_whole(tmp_path: Path, sig: int) -> None:
    src = external_pair(tmp_path, 0, "src.onnx")
    fold_file(src, tmp_path / "out.onnx")
    old = (tmp_path / "out.onnx").read_bytes()
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_SCRIPT, str(src), str(tmp_path / "out.onnx"), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the child never reached the write"
            time.sleep(0.05)
        assert debris(tmp_path), "the pause should be mid-write, with temporary files present"
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -sig
    assert debris(tmp_path) == []
    assert (tmp_path / "out.onnx").read_bytes() == old
    io.load_model(tmp_path / "out.onnx")


SIGNAL_IN_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    from bnfold.onnx import io
    from bnfold.onnx.api import fold_file
    real = os.replace
    def replace(a, b):  # SIGTERM arrives between the data rename and the model rename
        real(a, b)
        if str(b).endswith(".data"):
            os.kill(os.getpid(), signal.SIGTERM)
    io.os.replace = replace
    fold_file(sys.argv[1], sys.argv[2])
    """
)


def test_a_signal_between_the_renames_waits_for_the_commit(tmp_path: Path) -> None:
    a, b = external_pair(tmp_path, 0, "a.onnx"), external_pair(tmp_path, 1, "b.onnx")
    out = tmp_path / "out.onnx"
    fold_file(a, out)
    expected = tmp_path / "expected.onnx"
    fold_file(b, expected)
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_COMMIT, str(b), str(out)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    got, want = io.load_model(out), io.load_model(expected)
    assert [t.raw_data for t in got.graph.initializer] == [t.raw_data for t in want.graph.initializer]
    assert debris(tmp_path) == []


def test_check_of_a_folder_ignores_debris_of_a_killed_fold(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: its temporary folder stays, and a later `bnfold check .` must not fail on it."""
    onnx.save(conv_bn_relu(np.random.default_rng(0)), tmp_path / "m.onnx")
    assert cli(tmp_path / "m.onnx", "--in-place", "--no-verify", "-q").exit_code == 0
    debris_dir = tmp_path / (files.TEMP_PREFIX + "1234-abcd")
    debris_dir.mkdir()
    (debris_dir / "m.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:100])  # a partial model
    result = cli("check", tmp_path)
    assert result.exit_code == 0, result.output


def test_an_in_memory_model_with_relative_external_data_is_not_read_against_the_cwd(tmp_path: Path, monkeypatch) -> None:
    from bnfold import fold_onnx

    (tmp_path / "secret.txt").write_bytes(SECRET[:16])
    monkeypatch.chdir(tmp_path)
    m = conv_bn_relu(np.random.default_rng(0))
    point_external(m, "conv.b", "secret.txt")
    with pytest.raises(InputError, match="relative to a folder"):
        fold_onnx(m)


BENCH_PAUSE = textwrap.dedent(
    """
    import sys, time
    import bnfold.bench as bench
    def pause(*args, **kwargs):
        open(sys.argv[2], "w").close()
        time.sleep(60)
    bench._bench_level = pause
    bench.bench_onnx(sys.argv[1], repeats=1, warmup=0, creations=1)
    """
)


def test_a_signal_during_bench_removes_its_temporary_model(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(0)), src)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    marker = tmp_path / "marker"

    def ours() -> list[str]:  # other libraries leave their own files in TMPDIR
        return [p.name for p in tmp.iterdir() if "bnfold" in p.name]

    proc = subprocess.Popen([sys.executable, "-c", BENCH_PAUSE, str(src), str(marker)], env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the child never reached the benchmark"
            time.sleep(0.05)
        assert ours(), "the folded model should be in a temporary folder now"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert ours() == []


class Crash(BaseException):
    """Stands for the process dying at that instant."""


def test_a_crash_at_any_step_of_the_commit_leaves_a_loadable_pair(tmp_path: Path, monkeypatch) -> None:
    """Fold two different models in turn to the same external-data target; 'crash' at every rename and
    unlink of the second commit: the target must load as the old result or the new one, never a mix."""
    a, b = external_pair(tmp_path, 0, "a.onnx"), external_pair(tmp_path, 1, "b.onnx")
    out = tmp_path / "out.onnx"

    def weights(p: Path) -> bytes:
        m = io.load_model(p)
        return b"".join(t.raw_data for t in m.graph.initializer)

    fold_file(a, out)
    old = weights(out)
    calls = {"n": 0, "crash_at": None}
    real_replace, real_unlink = os.replace, os.unlink

    def step(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise Crash()
            return fn(*args, **kwargs)
        return wrapped

    outcomes = set()
    for crash_at in range(1, 5):
        fold_file(a, out)  # back to the old result (alternating data names)
        calls.update(n=0, crash_at=crash_at)
        monkeypatch.setattr(io.os, "replace", step(real_replace))
        monkeypatch.setattr(io.os, "unlink", step(real_unlink))
        try:
            fold_file(b, out)
        except Crash:
            pass
        finally:
            monkeypatch.setattr(io.os, "replace", real_replace)
            monkeypatch.setattr(io.os, "unlink", real_unlink)
        got = weights(out)
        fold_new = tmp_path / "expected.onnx"
        fold_file(b, fold_new)
        assert got in (old, weights(fold_new)), f"crash at step {crash_at} left a mixed pair"
        outcomes.add("old" if got == old else "new")
    assert outcomes == {"old", "new"}


def test_temp_names_are_recognised_for_scans() -> None:
    assert files.is_bnfold_temp(".bnfold-tmp-123-ab-m.onnx")
    assert files.is_bnfold_temp("models/.bnfold-tmp-1-x/m.onnx")
    assert not files.is_bnfold_temp("models/m.onnx")


# ------------------------------------------------------------------------------------------------
# 4. Clobbering
# ------------------------------------------------------------------------------------------------
def test_the_inputs_own_data_file_is_not_overwritten(tmp_path: Path) -> None:
    m = conv_bn_relu(np.random.default_rng(0), c_in=16, c_out=16)
    a = tmp_path / "a.onnx"
    onnx.save(m, a, save_as_external_data=True, all_tensors_to_one_file=True, location="shared.onnx.data", size_threshold=0)
    before = (tmp_path / "shared.onnx.data").read_bytes()
    text = assert_one_line(cli(a, "-o", tmp_path / "shared.onnx", "--no-verify"), needle="shared.onnx.data")
    assert "input model reads" in text and "--force" in text
    assert (tmp_path / "shared.onnx.data").read_bytes() == before
    io.load_model(a)


def test_an_unrelated_data_file_is_not_overwritten_without_force(tmp_path: Path) -> None:
    src = external_pair(tmp_path, 0, "src.onnx")
    (tmp_path / "x.onnx.data").write_bytes(b"someone else's weights")
    assert_one_line(cli(src, "-o", tmp_path / "x.onnx", "--no-verify"), needle="x.onnx.data")
    assert (tmp_path / "x.onnx.data").read_bytes() == b"someone else's weights"
    assert not (tmp_path / "x.onnx").exists()
    assert cli(src, "-o", tmp_path / "x.onnx", "--no-verify", "--force", "-q").exit_code == 0
    io.load_model(tmp_path / "x.onnx")


def test_refolding_an_external_output_alternates_its_data_file_and_cleans_up(tmp_path: Path) -> None:
    src = external_pair(tmp_path, 0, "src.onnx")
    out = tmp_path / "out.onnx"
    fold_file(src, out)
    assert (tmp_path / "out.onnx.data").exists()
    fold_file(src, out)  # bnfold's own output: its data is replaced, under the other name
    assert (tmp_path / "out.onnx.1.data").exists() and not (tmp_path / "out.onnx.data").exists()
    fold_file(src, out)
    assert (tmp_path / "out.onnx.data").exists() and not (tmp_path / "out.onnx.1.data").exists()
    io.load_model(out)
    assert cli(src, "--in-place", "--no-verify", "-q").exit_code == 0  # in place: the old data goes
    assert not (tmp_path / "src.onnx.data").exists() and (tmp_path / "src.onnx.1.data").exists()
    io.load_model(src)


# ------------------------------------------------------------------------------------------------
# 5. Unbounded resources: run in a subprocess under a 3 GB address-space limit
# ------------------------------------------------------------------------------------------------
LIMITED = textwrap.dedent(
    """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    from bnfold.check import check_model
    from bnfold.onnx.api import fold_file
    results = {}
    for name, path, out in json.loads(sys.argv[1]):
        t = time.perf_counter()
        r = {"check": check_model(path).to_dict()}
        if out:
            try:
                r["fold"] = fold_file(path, out).to_dict()
            except Exception as exc:
                r["fold"] = type(exc).__name__ + ": " + str(exc)
        r["seconds"] = time.perf_counter() - t
        r["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # so far, all models
        results[name] = r
    print(json.dumps(results))
    """
)


def _value(name: str, dtype: int, value: float) -> onnx.AttributeProto:
    return helper.make_tensor(name, dtype, [1], [value])


def cos_model(shape_nodes: list, shape_name: str, extra_inits: list, c: int = 4) -> onnx.ModelProto:
    """Conv bias = Slice(ConstantOfShape(<shape>), [0], [c]): a 1-D tensor of astronomical length."""
    rng = np.random.default_rng(0)
    nodes = shape_nodes + [
        helper.make_node("ConstantOfShape", [shape_name], ["big"], value=_value("v", TensorProto.FLOAT, 0.5)),
        helper.make_node("Slice", ["big", "st", "en"], ["cb"]),
        helper.make_node("Conv", ["input", "conv.w", "cb"], ["c"], name="conv"),
        bn_node("c", "output", "bn"),
    ]
    inits = extra_inits + [
        init("st", np.array([0], np.int64)), init("en", np.array([c], np.int64)),
        init("conv.w", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)), *bn_inits("bn", c, rng),
    ]
    return unchecked_model(nodes, [("input", [1, 3, 6, 6])], [("output", [1, c, 4, 4])], inits)


def slice_of_declared_input() -> onnx.ModelProto:
    """No ConstantOfShape at all: conv bias = Cast(Slice(ids)), `ids` a graph input declared [10^9]."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Slice", ["ids", "st", "en"], ["four"]),
        helper.make_node("Cast", ["four"], ["cb"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["input", "conv.w", "cb"], ["c"], name="conv"),
        bn_node("c", "output", "bn"),
    ]
    inits = [init("st", np.array([0], np.int64)), init("en", np.array([4], np.int64)),
             init("conv.w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), *bn_inits("bn", 4, rng)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 6, 6]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [10**9])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_chain(n: int = 4096, k: int = 30) -> onnx.ModelProto:
    """MatMul weight = ConstantOfShape([n, n]) @ ConstantOfShape([n, n]) @ ... (k MatMuls), then BN."""
    fill = _value("v", TensorProto.FLOAT, 0.001)
    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["w0"], value=fill)]
    for i in range(k):
        nodes.append(helper.make_node("ConstantOfShape", ["shp"], [f"m{i}"], value=fill))
        nodes.append(helper.make_node("MatMul", [f"w{i}", f"m{i}"], [f"w{i + 1}"]))
    nodes += [helper.make_node("MatMul", ["input", f"w{k}"], ["mm"]), bn_node("mm", "output", "bn")]
    return unchecked_model(nodes, [("input", [2, n])], [("output", [2, n])],
                 [init("shp", np.array([n, n], np.int64)), *bn_inits("bn", n, np.random.default_rng(0))])


@pytest.fixture(scope="module")
def resource_runs(tmp_path_factory) -> dict:
    """Every hostile resource case, checked (and folded where it says so) in ONE child process under a
    3 GB address-space limit: one interpreter start instead of one per case keeps the suite fast."""
    import json

    d = tmp_path_factory.mktemp("resource")
    entries: list[tuple[str, str, str | None]] = []

    def add(name: str, m: onnx.ModelProto, fold: bool) -> None:
        onnx.save(m, d / f"{name}.onnx")
        entries.append((name, str(d / f"{name}.onnx"), str(d / f"{name}.out.onnx") if fold else None))

    add("cos", cos_model([], "shp", [init("shp", np.array([10**12], np.int64))]), fold=True)
    prop = [helper.make_node("Shape", ["input"], ["s"], start=0, end=1), helper.make_node("Mul", ["s", "k"], ["shp"])]
    add("cos_prop", cos_model(prop, "shp", [init("k", np.array([10**9], np.int64))]), fold=True)
    add("slice", slice_of_declared_input(), fold=True)
    add("matmul", matmul_chain(), fold=True)
    # Files that are not models: a sparse 3 GB file (and a link to it), a FIFO, a private /dev/zero.
    with open(d / "big.onnx", "wb") as fh:
        fh.truncate(3 << 30)
    os.symlink(d / "big.onnx", d / "link-to-big.onnx")
    specials = ["big.onnx", "link-to-big.onnx"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "fifo.onnx")
        specials.append("fifo.onnx")
    try:
        os.mknod(d / "zero.onnx", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        os.symlink(d / "zero.onnx", d / "link-to-zero.onnx")
        specials.append("link-to-zero.onnx")
    except (PermissionError, OSError):
        pass
    entries += [(f, str(d / f), None) for f in specials]
    proc = subprocess.run([sys.executable, "-c", LIMITED, json.dumps(entries)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_constant_of_shape_with_a_huge_shape_finishes_within_3gb(resource_runs: dict) -> None:
    """The 463-byte model: conv bias = Slice(ConstantOfShape([10^12])); refused before numpy allocates."""
    r = resource_runs["cos"]
    assert r["seconds"] < 20 and r["peak_mib"] < 1024, r
    finding = r["check"]["findings"][0]
    assert finding["code"] == "not-constant" and "limit" in finding["message"], finding
    assert isinstance(r["fold"], dict), r["fold"]  # a report, not an exception
    assert not any(c["status"] == "folded" for c in r["fold"]["candidates"]), r["fold"]


def test_constant_of_shape_sized_through_data_propagation_finishes_within_3gb(resource_runs: dict) -> None:
    """The shape is Shape(input)[0] × 10^9 — only data propagation can see it: it must not run."""
    r = resource_runs["cos_prop"]
    assert r["check"]["error"] is None and isinstance(r["fold"], dict), r
    assert r["seconds"] < 20 and r["peak_mib"] < 1024, r  # the old code held ~3 GB of dims before failing


def test_slice_of_a_huge_declared_input_finishes_within_3gb(resource_runs: dict) -> None:
    r = resource_runs["slice"]
    assert r["check"]["error"] is None and isinstance(r["fold"], dict), r
    assert r["seconds"] < 20 and r["peak_mib"] < 1024, r


def test_thirty_chained_4096_matmuls_finish_in_seconds(resource_runs: dict) -> None:
    """92 s and 2.1 GB in `check` before: the first 4096³ MatMul is now refused before it runs."""
    r = resource_runs["matmul"]
    assert r["seconds"] < 20 and r["peak_mib"] < 1536, r
    assert "budget" in r["check"]["findings"][0]["message"]
    assert isinstance(r["fold"], dict), r["fold"]


def test_check_reads_only_regular_files_within_the_size_limit(resource_runs: dict) -> None:
    """A symlink to /dev/zero or to a 3 GB file was read whole; a FIFO would block the read forever."""
    names = [n for n in resource_runs if n.endswith(".onnx")]
    assert len(names) >= 2
    for name in names:
        r = resource_runs[name]
        err = r["check"]["error"] or ""
        assert ("regular files" in err or "limit" in err) and "internal error" not in err, (name, err)
        assert r["seconds"] < 10, (name, r)


# ------------------------------------------------------------------------------------------------
# 6. Malformed input: one line, never a traceback, never "internal error"
# ------------------------------------------------------------------------------------------------
def _malformed(tmp_path: Path, case: str) -> Path:
    m = conv_bn_relu(np.random.default_rng(0))
    p = tmp_path / f"{case}.onnx"
    if case == "truncated-external":
        onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location=p.name + ".data", size_threshold=0)
        with open(tmp_path / (p.name + ".data"), "r+b") as fh:
            fh.truncate(100)
        return p
    t = next(t for t in m.graph.initializer if t.name == "conv.w")
    if case == "dims-promise-1e9":
        del t.dims[:]
        t.dims.extend([10**9])
        t.raw_data = b"\0" * 16
    elif case == "external-length-mismatch":
        (tmp_path / "w.bin").write_bytes(b"\0" * 16)
        point_external(m, "conv.w", "w.bin", length=16)
    onnx.save(m, p)
    return p


@pytest.mark.parametrize("case", ["truncated-external", "dims-promise-1e9", "external-length-mismatch"])
def test_malformed_data_is_one_line(tmp_path: Path, case: str) -> None:
    p = _malformed(tmp_path, case)
    assert_one_line(cli(p, "-o", tmp_path / "out.onnx"), needle="conv.w")
    result = cli("check", p)
    assert result.exit_code == EXIT_USAGE and "internal error" not in result.output and "conv.w" in result.output
    with pytest.raises(InputError):
        fold_file(p, tmp_path / "out2.onnx")


def test_nan_and_negative_variance_are_named_by_channel(tmp_path: Path) -> None:
    m = conv_bn_relu(np.random.default_rng(0))
    t = next(t for t in m.graph.initializer if t.name == "bn.var")
    v = onnx.numpy_helper.to_array(t).copy()
    v[1], v[3] = np.nan, -3.0
    t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
    p = tmp_path / "nan.onnx"
    onnx.save(m, p)
    result = cli(p, "-o", tmp_path / "out.onnx", "--no-verify")
    assert result.exit_code == 0 and "Traceback" not in result.output and "Warning" not in result.output
    assert "negative variance" in result.output and "channels 1, 3" in result.output


def test_opset_ahead_of_onnxruntime_is_one_line(tmp_path: Path) -> None:
    import onnxruntime as ort

    m = conv_bn_relu(np.random.default_rng(0))
    m.opset_import[0].version = 99
    p = tmp_path / "future.onnx"
    onnx.save(m, p)
    text = assert_one_line(cli(p, "-o", tmp_path / "out.onnx"))
    assert "opset" in text and ort.__version__ in text and len(text) < 300


def test_data_propagation_still_runs_on_ordinary_shape_arithmetic() -> None:
    """The guard must not cost real models their static shapes: Shape → Gather → Concat → Reshape."""
    nodes = [
        helper.make_node("Shape", ["input"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["input", "target"], ["output"]),
    ]
    inits = [init("zero", np.array(0, np.int64)), init("axes", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64))]
    m = unchecked_model(nodes, [("input", [2, 3, 4])], [("output", None)], inits)
    plain = onnx.shape_inference.infer_shapes(m, data_prop=False)
    assert io.data_prop_is_bounded(plain)
    from bnfold.onnx.api import infer_shapes

    assert infer_shapes(m)["output"][0] == [2, 12]


def test_signal_handlers_are_restored_and_a_programs_own_handler_is_left_alone() -> None:
    def own(signum, frame):  # a program's graceful-shutdown handler
        pass

    before = {s: signal.getsignal(s) for s in files.CLEANUP_SIGNALS}
    previous = signal.signal(signal.SIGTERM, own)
    try:
        with files.removing_temps_on_signals():
            assert signal.getsignal(signal.SIGTERM) is own
            if hasattr(signal, "SIGHUP") and before[signal.SIGHUP] is signal.SIG_DFL:
                assert signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL  # ours, for the duration
            with files.removing_temps_on_signals():
                pass
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert {s: signal.getsignal(s) for s in files.CLEANUP_SIGNALS} == before
