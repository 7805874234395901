"""The check library (bnfold.check) and bnfold.testing: paths, the gate's policy, renderers, and the
guarantee that `check` calls foldable exactly what `fold` folds, over every sample model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.check import (
    ALLOWED,
    CHECK_JSON_SCHEMA,
    FAIL,
    INFO,
    check_model,
    check_paths,
    expand_paths,
    render_github,
    render_json,
    render_text,
)
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE
from bnfold.report import Status
from bnfold.testing import assert_fully_folded
from tests.onnx.helpers import F32, bn_inits, bn_node, make_model
from tests.paths import ROOT, SAMPLES

jsonschema = pytest.importorskip("jsonschema")



# ------------------------------------------------------------------------------------------------
# Tiny models, from the shared builders
# ------------------------------------------------------------------------------------------------
def _bn(name: str, x: str, y: str, c: int, rng: np.random.Generator, **attrs):
    """A BatchNormalization named `name` with random statistics `name.scale/bias/mean/var`."""
    return bn_node(x, y, name, **attrs), bn_inits(name, c, rng)


def _model(nodes, inits, out_shape) -> onnx.ModelProto:
    return make_model(nodes, [("input", [1, 3, 8, 8], F32)], [("output", F32, out_shape)], inits)


def conv_bn(seed: int = 0, bn_name: str = "bn1") -> onnx.ModelProto:
    """input → Conv → BN → output: one foldable BatchNorm."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv1.w")
    bn, inits = _bn(bn_name, "c", "output", 4, rng)
    return _model([helper.make_node("Conv", ["input", "conv1.w"], ["c"], name="conv1"), bn], [w, *inits], [1, 4, 6, 6])


def two_consumers(seed: int = 0) -> onnx.ModelProto:
    """Conv's output feeds BN and an Add: the BatchNorm cannot be folded (other-consumer)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv1.w")
    bn, inits = _bn("bn1", "c", "b", 4, rng)
    nodes = [helper.make_node("Conv", ["input", "conv1.w"], ["c"], name="conv1"), bn,
             helper.make_node("Add", ["c", "b"], ["output"], name="add1")]
    return _model(nodes, [w, *inits], [1, 4, 6, 6])


def mixed(seed: int = 0) -> onnx.ModelProto:
    """One foldable BatchNorm (head_bn) and one that is not (bn2)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv1.w")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "conv2.w")
    bn1, i1 = _bn("head_bn", "c1", "y1", 4, rng)
    bn2, i2 = _bn("bn2", "c2", "y2", 4, rng)
    nodes = [helper.make_node("Conv", ["input", "conv1.w"], ["c1"], name="conv1"), bn1,
             helper.make_node("Conv", ["y1", "conv2.w"], ["c2"], name="conv2"), bn2,
             helper.make_node("Add", ["c2", "y2"], ["output"], name="add2")]
    return _model(nodes, [w1, w2, *i1, *i2], [1, 4, 6, 6])


def folded(m: onnx.ModelProto) -> onnx.ModelProto:
    return bnfold.fold_onnx(m)[0]


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "folded": tmp_path / "folded.onnx",
        "unfolded": tmp_path / "unfolded.onnx",
        "unfoldable": tmp_path / "unfoldable.onnx",
        "mixed": tmp_path / "mixed.onnx",
    }
    onnx.save(folded(conv_bn()), paths["folded"])
    onnx.save(conv_bn(), paths["unfolded"])
    onnx.save(two_consumers(), paths["unfoldable"])
    onnx.save(mixed(), paths["mixed"])
    return paths


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------
def test_expand_paths_files_dirs_globs_in_order_each_once(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for p in ("d/b.onnx", "d/sub/a.onnx", "d/notes.txt", "top.onnx", "x.model"):
        (tmp_path / p).write_bytes(b"")
    entries = expand_paths([
        str(tmp_path / "x.model"),  # a file is taken whatever its suffix
        str(tmp_path / "d"),  # recursive, *.onnx only, sorted
        str(tmp_path / "**" / "*.onnx"),  # a glob; already-seen files are not repeated
    ])
    assert [Path(e).relative_to(tmp_path).as_posix() for e in entries] == ["x.model", "d/b.onnx", "d/sub/a.onnx", "top.onnx"]


def test_expand_paths_reports_what_names_nothing_in_place(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.onnx").write_bytes(b"")
    entries = expand_paths([str(tmp_path / "missing.onnx"), str(tmp_path / "m.onnx"), str(tmp_path / "empty"), str(tmp_path / "*.pt")])
    assert isinstance(entries[1], str)
    errors = [e for e in entries if not isinstance(e, str)]
    assert len(errors) == 3
    assert "no such file" in errors[0].error and "no *.onnx" in errors[1].error and "matches no model" in errors[2].error


# ------------------------------------------------------------------------------------------------
# The gate's policy
# ------------------------------------------------------------------------------------------------
def test_foldable_fails_unfoldable_is_info_unless_strict() -> None:
    r = check_model(mixed())
    assert r.status == "failed" and r.exit_code == EXIT_CHECK_FAILED
    assert {f.node: f.verdict for f in r.findings} == {"head_bn": FAIL, "bn2": INFO}
    bn2 = next(f for f in r.findings if f.node == "bn2")
    assert bn2.code == "other-consumer" and "add2" in bn2.message and bn2.hint
    assert not hasattr(r.report, "return_code")  # the report passes no verdict: the gate is the only one

    assert check_model(two_consumers()).exit_code == EXIT_OK
    strict = check_model(two_consumers(), strict=True)
    assert strict.exit_code == EXIT_CHECK_FAILED and [f.code for f in strict.failing] == ["other-consumer"]


def test_allow_accepts_named_batchnorms() -> None:
    r = check_model(mixed(), allow=["head_*"])
    assert {f.node: f.verdict for f in r.findings} == {"head_bn": ALLOWED, "bn2": INFO}
    assert r.exit_code == EXIT_OK
    # strict + allow: only what is not allowed fails
    s = check_model(mixed(), strict=True, allow=["head_*"])
    assert [f.node for f in s.failing] == ["bn2"]
    assert check_model(mixed(), strict=True, allow=["*bn*"]).exit_code == EXIT_OK
    assert check_model(mixed(), allow=["HEAD_*"]).exit_code == EXIT_CHECK_FAILED  # case-sensitive, as node names are


def test_allow_patterns_that_match_nothing_are_noted(models: dict[str, Path]) -> None:
    result = check_paths([models["mixed"], models["folded"]], allow=["head_*", "bn2", "old_bn*"])
    assert result.exit_code == EXIT_OK
    assert result.unmatched_allow == ["old_bn*"]  # bn2 is unfoldable but present: not stale
    assert "note: --allow 'old_bn*' matched no BatchNorm" in render_text(result)
    assert json.loads(render_json(result))["allow_unmatched"] == ["old_bn*"]


def test_unreadable_model_is_an_error_entry_not_an_exception(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    r = check_model(bad)
    assert r.status == "error" and r.exit_code == EXIT_USAGE and str(bad) in r.error and "\n" not in r.error


def test_check_paths_aggregates_exit_codes_and_keeps_checking(models: dict[str, Path], tmp_path: Path) -> None:
    assert check_paths([models["folded"]]).exit_code == EXIT_OK
    assert check_paths([models["folded"], models["unfolded"]]).exit_code == EXIT_CHECK_FAILED
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    result = check_paths([models["folded"], bad, models["unfolded"]])
    assert result.exit_code == EXIT_USAGE
    assert [m.status for m in result.models] == ["ok", "error", "failed"]  # every model, in order
    assert check_paths([]).exit_code == EXIT_USAGE  # nothing to check is not a pass


@pytest.fixture
def pool_for_tiny_models(monkeypatch):
    """Start worker processes even for these few-KB models (normally checked in one process)."""
    from bnfold.check import pool

    monkeypatch.setattr(pool, "BYTES_PER_WORKER", 1)


def test_parallel_check_gives_the_same_result_and_reports_progress(models: dict[str, Path], pool_for_tiny_models) -> None:
    paths = list(models.values())
    seen: list[str] = []
    serial = check_paths(paths, strict=True)
    parallel = check_paths(paths, strict=True, jobs=2, on_progress=seen.append)
    assert parallel.to_dict() == serial.to_dict()
    assert sorted(seen) == sorted(map(str, paths))


def test_check_writes_nothing(models: dict[str, Path], pool_for_tiny_models) -> None:
    folder = next(iter(models.values())).parent
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    check_paths([folder], strict=True, jobs=2)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()} == before


def test_pool_size_follows_jobs_models_and_their_size(tmp_path: Path) -> None:
    from bnfold.check.pool import BYTES_PER_WORKER, workers_for

    small = [tmp_path / f"s{i}.onnx" for i in range(8)]
    for p in small:
        p.write_bytes(b"x" * 1000)
    assert workers_for(4, small) == 1  # 8 KB of models: one process is as fast
    big = [tmp_path / f"b{i}.onnx" for i in range(3)]
    for p in big:
        p.write_bytes(b"x" * BYTES_PER_WORKER)
    assert workers_for(8, big) == 3 and workers_for(2, big) == 2 and workers_for(1, big) == 1


def _die(path: str):
    import os

    os._exit(3)


def test_a_worker_that_dies_costs_error_entries_not_the_run(tmp_path: Path, pool_for_tiny_models) -> None:
    from bnfold.check.gate import unreadable
    from bnfold.check.pool import run_pool

    files = []
    for i in range(3):
        (tmp_path / f"{i}.onnx").write_bytes(b"x")
        files.append(str(tmp_path / f"{i}.onnx"))
    out = list(run_pool(_die, files, jobs=2, on_error=unreadable))
    assert [m.status for m in out] == ["error"] * 3
    assert all("worker process" in m.error for m in out)


# ------------------------------------------------------------------------------------------------
# Renderers
# ------------------------------------------------------------------------------------------------
def test_json_output_validates_against_the_documented_schema(models: dict[str, Path], tmp_path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(CHECK_JSON_SCHEMA)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    for kwargs in ({}, {"strict": True}, {"allow": ["head_*"]}):
        result = check_paths([*models.values(), bad, tmp_path / "missing"], **kwargs)
        data = json.loads(render_json(result))
        jsonschema.validate(data, CHECK_JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
        assert data["exit_code"] == result.exit_code == EXIT_USAGE
        assert len(data["models"]) == 6


SCHEMA_FILE = ROOT / "bnfold" / "check" / "check-v1.schema.json"


def test_the_schema_is_one_packaged_file_that_the_code_reads() -> None:
    assert CHECK_JSON_SCHEMA == json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"bnfold.check" = ["*.schema.json"]' in pyproject  # shipped as package data
    code = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "bnfold" / "check").glob("*.py"))
    assert '"additionalProperties"' not in code  # no restated copy of the schema in the code


@pytest.mark.parametrize("doc", ["README.md", "docs/check.md"])
def test_docs_quote_exactly_the_packaged_schema(doc: str) -> None:
    """A document that quotes the schema quotes the packaged file byte for byte."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```json\n")[1:] if '"$schema"' in b.split("```", 1)[0]]
    for block in blocks:
        assert block == SCHEMA_FILE.read_text(encoding="utf-8")
    assert blocks or "check-v1.schema.json" in text  # quoted, or pointed to


def test_github_annotations(models: dict[str, Path], tmp_path: Path) -> None:
    odd = tmp_path / "a,b:c.onnx"  # ',' and ':' must be escaped in the file property
    odd.write_bytes(models["mixed"].read_bytes())
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    lines = render_github(check_paths([models["folded"], odd, bad], allow=["nothing"])).splitlines()
    assert lines[0] == (
        f"::error file={tmp_path}/a%2Cb%3Ac.onnx,title=bnfold%3A foldable BatchNorm::head_bn (BatchNormalization) "
        f"[foldable] can be folded into its producer Conv 'conv1'. Hint: run `bnfold fold {odd}` to fold it "
        "(outputs are verified before anything is written)"
    )
    assert lines[1].startswith(f"::error file={tmp_path}/bad.onnx,title=bnfold%3A unreadable model::{bad}: ")
    assert lines[2] == "::warning title=bnfold::--allow 'nothing' matched no BatchNorm"
    assert len(lines) == 4 and lines[3].startswith("bnfold check ERROR: 3 models checked")  # bn2 (info) is not annotated

    strict = render_github(check_paths([odd], strict=True, allow=["head_bn"])).splitlines()
    assert strict[0].startswith("::notice file=") and "allowed" in strict[0]
    assert strict[1].startswith("::error file=") and "title=bnfold%3A BatchNorm left (--strict)::bn2" in strict[1]
    assert "[other-consumer]" in strict[1]


def test_text_names_each_batchnorm_left_with_code_and_hint(models: dict[str, Path]) -> None:
    out = render_text(check_paths([models["folded"], models["mixed"]]))
    assert str(models["folded"]) not in out  # nothing to say about a clean model unless verbose
    assert f"{models['mixed']}: FAILED" in out
    assert "FAIL    head_bn (BatchNormalization) [foldable]" in out
    assert "left    bn2 (BatchNormalization) [other-consumer]" in out
    assert out.count("hint: ") == 2
    assert out.splitlines()[-1].startswith("bnfold check FAILED: 2 models checked, 1 failed (1 BatchNorm foldable)")
    verbose = render_text(check_paths([models["folded"]]), verbose=True)
    assert f"{models['folded']}: ok, no BatchNorm left" in verbose


# ------------------------------------------------------------------------------------------------
# bnfold.testing
# ------------------------------------------------------------------------------------------------
def test_assert_fully_folded_passes_on_folded_models(models: dict[str, Path]) -> None:
    assert_fully_folded(models["folded"])
    assert_fully_folded(folded(conv_bn()))
    assert_fully_folded(models["unfoldable"])  # nothing foldable is left
    assert_fully_folded(models["mixed"], allow=["head_bn"])


def test_assert_fully_folded_message_lists_each_foldable_batchnorm_and_why() -> None:
    with pytest.raises(AssertionError) as err:
        assert_fully_folded(mixed())
    msg = str(err.value)
    assert "1 foldable BatchNorm left" in msg
    assert "head_bn (BatchNormalization) [foldable] can be folded into its producer Conv 'conv1'" in msg
    assert "bn2" not in msg
    with pytest.raises(AssertionError, match=r"(?s)2 BatchNorm left.*head_bn.*bn2 .*\[other-consumer\]"):
        assert_fully_folded(mixed(), strict=True)
    with pytest.raises(AssertionError, match="cannot check the model"):
        assert_fully_folded("/nonexistent/model.onnx")


# ------------------------------------------------------------------------------------------------
# check and fold can never drift apart: every sample model
# ------------------------------------------------------------------------------------------------
def _zoo_builders() -> list:
    try:
        from sample_models import zoo
    except ImportError:  # pragma: no cover
        return []
    return [pytest.param(builder, id=name) for name, builder in zoo.BUILDERS.items()]


def _sample_files() -> list:
    return [pytest.param(p, id=p.name) for p in sorted(SAMPLES.glob("*.onnx"))]


def _batchnorms(graph: onnx.GraphProto, path: str = ""):
    """(graph path, node name) of every BatchNorm, subgraphs included."""
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            yield path, node.name
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _batchnorms(sub, f"{path}/{node.name}.{attr.name}".lstrip("/"))


def _assert_check_matches_fold(model: onnx.ModelProto) -> None:
    names = {name for _, name in _batchnorms(model.graph)}
    gate = check_model(model)
    out, fold_report = bnfold.fold_onnx(model)
    would = {(f.graph, n) for f in gate.findings if f.foldable for n in f.nodes if n in names}
    did = {(c.graph, n) for c in fold_report.candidates if c.status is Status.FOLDED for n in c.nodes if n in names}
    removed = set(_batchnorms(model.graph)) - set(_batchnorms(out.graph))
    assert would == did, f"check says foldable {sorted(would)}, fold folded {sorted(did)}"
    assert {n for _, n in did} == {n for _, n in removed}, f"fold reported {sorted(did)}, removed {sorted(removed)}"
    assert gate.counts()["foldable"] == fold_report.folded == gate.report.foldable
    assert gate.exit_code == (EXIT_CHECK_FAILED if would else EXIT_OK)
    assert_fully_folded(out)  # one fold leaves nothing the check would still call foldable


@pytest.mark.parametrize("builder", _zoo_builders())
def test_check_calls_foldable_exactly_what_fold_folds_zoo(builder) -> None:
    _assert_check_matches_fold(builder())


@pytest.mark.parametrize("path", _sample_files())
def test_check_calls_foldable_exactly_what_fold_folds_files(path: Path) -> None:
    _assert_check_matches_fold(onnx.load(path))


def test_check_calls_foldable_exactly_what_fold_folds_here() -> None:
    for m in (conv_bn(), two_consumers(), mixed()):
        _assert_check_matches_fold(m)


def if_model(seed: int = 0) -> onnx.ModelProto:
    """A foldable Conv → BN inside an If branch: findings carry the subgraph path."""
    rng = np.random.default_rng(seed)
    bn, inits = _bn("bn_then", "c", "t_out", 4, rng)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_then.w")
    out = lambda name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, 4, 6, 6])  # noqa: E731
    then = helper.make_graph([helper.make_node("Conv", ["input", "conv_then.w"], ["c"], name="conv_then"), bn], "then", [], [out("t_out")], [w, *inits])
    w2 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_else.w")
    other = helper.make_graph([helper.make_node("Conv", ["input", "conv_else.w"], ["e_out"], name="conv_else")], "else", [], [out("e_out")], [w2])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["output"], name="if", then_branch=then, else_branch=other)
    return _model([node], [cond], [1, 4, 6, 6])


def test_allow_matches_the_subgraph_qualified_name() -> None:
    r = check_model(if_model())
    assert [(f.graph, f.node, f.qualified_name, f.verdict) for f in r.findings] == [
        ("if.then_branch", "bn_then", "if.then_branch/bn_then", FAIL)
    ]
    for pattern in ("bn_then", "if.then_branch/*", "*/bn_*"):
        assert check_model(if_model(), allow=[pattern]).exit_code == EXIT_OK, pattern
    assert check_model(if_model(), allow=["if.else_branch/*"]).exit_code == EXIT_CHECK_FAILED
    _assert_check_matches_fold(if_model())


# ------------------------------------------------------------------------------------------------
# Paths that are not models: temp files, FIFOs, broken links, symlink cycles
# ------------------------------------------------------------------------------------------------
def test_expand_paths_skips_bnfold_temporary_files_in_folders(tmp_path: Path) -> None:
    (tmp_path / ".bnfold-spill-x").mkdir()
    for p in ("m.onnx", ".bnfold-tmp-m.onnx", ".bnfold-spill-x/w.onnx"):
        (tmp_path / p).write_bytes(b"")
    assert expand_paths([tmp_path]) == [str(tmp_path / "m.onnx")]
    assert expand_paths([str(tmp_path / "*.onnx")]) == [str(tmp_path / "m.onnx")]


def test_non_regular_files_and_broken_links_are_errors_with_a_reason(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    link = tmp_path / "gone.onnx"
    link.symlink_to(tmp_path / "nowhere.onnx")
    entries = expand_paths([fifo, link, "/dev/null"])
    assert [e.error for e in entries] == [
        f"{fifo}: not a regular file (a FIFO); a model must be a regular file",
        f"{link}: broken symbolic link (its target {str(tmp_path / 'nowhere.onnx')!r} does not exist)",
        "/dev/null: not a regular file (a character device); a model must be a regular file",
    ]
    result = check_paths([fifo])  # returns at once: the FIFO is never opened
    assert result.exit_code == EXIT_USAGE and "FIFO" in result.models[0].error


def test_folder_of_only_broken_links_says_so(tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).symlink_to(tmp_path / "missing" / name)
    result = check_paths([tmp_path])
    assert result.exit_code == EXIT_USAGE
    assert [m.error.split(": ", 1)[1].split(" (")[0] for m in result.models] == ["broken symbolic link"] * 2
    assert "no *.onnx" not in render_text(result)


def test_directory_symlink_cycles_are_walked_once(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "m.onnx").write_bytes(b"")
    (tmp_path / "d" / "sub" / "up").symlink_to(tmp_path / "d")  # a cycle
    (tmp_path / "d" / "again").symlink_to(tmp_path / "d" / "sub")  # the same folder twice
    assert expand_paths([tmp_path / "d"]) == [str(tmp_path / "d" / "again" / "m.onnx")]
    assert expand_paths([str(tmp_path / "d" / "**" / "*.onnx")]) == [str(tmp_path / "d" / "sub" / "m.onnx")]


def test_missing_path_is_an_error_not_a_model_checked(tmp_path: Path) -> None:
    result = check_paths([tmp_path / "nope.onnx"])
    assert result.exit_code == EXIT_USAGE
    assert render_text(result).splitlines() == [
        f"ERROR {tmp_path / 'nope.onnx'}: no such file or directory",
        "bnfold check ERROR: 0 models checked, 1 path named no model",
    ]


def test_identical_hints_are_printed_once_per_reason_and_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in range(4):  # four Conv → BN pairs whose Conv output also feeds an Add: 4 × other-consumer
        w = numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), f"w{i}")
        bn, bi = _bn(f"bn{i}", f"c{i}", f"b{i}", 3, rng)
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"), bn,
                  helper.make_node("Add", [f"c{i}", f"b{i}"], [f"y{i}"], name=f"add{i}")]
        inits += [w, *bi]
        x = f"y{i}"
    nodes[-1].output[0] = "output"
    out = render_text(CheckResultFor(_model(nodes, inits, [1, 3, 8, 8]), tmp_path))
    assert out.count("[other-consumer]") == 5  # four findings, one grouped hint
    assert out.count("fold is only exact when the BatchNorm is the layer's sole consumer") == 1
    assert "hint for all 4 [other-consumer] here:" in out


def CheckResultFor(model: onnx.ModelProto, tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return check_paths([path])
