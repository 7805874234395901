"""The fold written back into the source ModelProto (`bnfold/onnx/writeback.py`): what stays as it was,
where new nodes go, subgraphs and functions, graph inputs, the caller's model, a fold that changes nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from bnfold import fold_onnx
from bnfold.onnx import api, storage, writeback
from tests.onnx.helpers import (
    F32,
    assert_equivalent,
    assert_valid,
    bn_inits,
    bn_node,
    bn_stats,
    conv_bn,
    gemm_bn,
    init,
    make_model,
    ort_session,
    rand,
)
from tests.onnx.test_subgraphs import if_model


def _annotated() -> onnx.ModelProto:
    """Identity → Conv → BN → Relu → GAP → Reshape → MatMul → BN, doc strings and metadata on the nodes,
    value_info and quantization annotations for a tensor the fold removes and one it keeps, and an
    initializer no node reads."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Identity", ["input"], ["x"], name="entry", doc_string="first"),
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1], doc_string="the conv"),
        bn_node("c", "n", "bn1"),
        helper.make_node("Relu", ["n"], ["r"], name="relu", doc_string="keep me"),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "flat.shape"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "fc.w"], ["fc"], name="fc", doc_string="the head"),
        bn_node("fc", "logits", "bn2"),
    ]
    inits = [
        init("conv.w", rand((4, 3, 3, 3), rng, F32, 0.5)),
        init("flat.shape", np.array([2, 4], np.int64)),
        init("fc.w", rand((4, 5), rng, F32, 0.5)),
        *bn_inits("bn1", bn_stats(4, rng)),
        *bn_inits("bn2", bn_stats(5, rng)),
        init("unused", np.arange(3, dtype=np.float32)),
    ]
    m = make_model(nodes, [("input", [2, 3, 6, 6], F32)], [("logits", F32)], inits)
    for node in m.graph.node:
        if node.name in ("conv", "relu", "fc"):
            entry = node.metadata_props.add()
            entry.key, entry.value = "origin", node.name
    m.graph.value_info.extend([
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 4, 6, 6]),
        helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 4, 6, 6]),
    ])
    m.graph.value_info[1].doc_string = "after the relu"
    for tensor in ("c", "r"):
        note = m.graph.quantization_annotation.add()
        note.tensor_name = tensor
        entry = note.quant_parameter_tensor_names.add()
        entry.key, entry.value = "SCALE_TENSOR", "unused"
    onnx.checker.check_model(m, full_check=True)
    return m


def _by_name(nodes) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in nodes}


def test_graphsurgeon_imports_one_node_per_nodeproto_in_order() -> None:
    """The write-back's premise: the i-th imported node of every graph (subgraphs, functions) is its i-th NodeProto."""
    m = if_model(np.random.default_rng(0))
    fn = helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"], name="twice")],
                              [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    imported = writeback.Imported(gs.import_onnx(m), m)
    branches = [((0, a.name),) for a in m.graph.node[0].attribute]  # as the NodeProto orders them
    assert [p.path for p in imported.parts] == [(), *branches, (("function", 0),)]
    for part in imported.parts:
        body = m.functions[part.path[0][1]] if part.path and part.path[0][0] == "function" else m.graph
        for i, key in part.path[1:] if body is not m.graph else part.path:
            body = next(a.g for a in body.node[i].attribute if a.name == key)
        assert [(n.op, n.name) for n in part.nodes] == [(n.op_type, n.name) for n in body.node]


def test_untouched_nodes_stay_as_they_were_and_new_ones_go_where_they_are_read() -> None:
    m = _annotated()
    out, report = fold_onnx(m)
    assert report.folded == 2
    assert [n.name for n in out.graph.node] == ["entry", "conv", "relu", "gap", "flat", "fc", "fc_bias_add"]
    src, got = _by_name(m.graph.node), _by_name(out.graph.node)
    for name in ("entry", "relu", "gap", "flat"):
        assert got[name].SerializeToString() == src[name].SerializeToString(), name
    # rewired and refilled nodes keep everything but their new tensor names
    assert list(got["conv"].output) == ["n"] and got["conv"].doc_string == "the conv"
    assert [(p.key, p.value) for p in got["conv"].metadata_props] == [("origin", "conv")]
    assert got["fc"].doc_string == "the head" and [(p.key, p.value) for p in got["fc"].metadata_props] == [("origin", "fc")]
    assert list(got["fc_bias_add"].output) == ["logits"] and list(got["fc"].output) == [got["fc_bias_add"].input[0]]
    # value_info: the removed tensor's goes, the rest as it was
    assert [v.SerializeToString() for v in out.graph.value_info] == [m.graph.value_info[1].SerializeToString()]
    assert [a.SerializeToString() for a in out.graph.quantization_annotation] == [
        m.graph.quantization_annotation[1].SerializeToString()
    ]
    # initializers: untouched ones as they were, in their order; the user's unused one stays; folded BN parameters go
    names = [t.name for t in out.graph.initializer]
    assert names[:4] == ["conv.w", "flat.shape", "fc.w", "unused"] and not any(n.startswith("bn") for n in names)
    src_t = {t.name: t for t in m.graph.initializer}
    for name in ("flat.shape", "unused"):
        assert next(t for t in out.graph.initializer if t.name == name).SerializeToString() == src_t[name].SerializeToString()
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in m.graph.input]
    assert_valid(out)
    assert_equivalent(m, out, np.random.default_rng(6))


def test_a_model_the_pass_owns_is_written_in_place_without_copies() -> None:
    """From a file (owned), the fold is the loaded model itself: untouched initializers are the very same TensorProtos."""
    m = _annotated()
    untouched = {t.name: t for t in m.graph.initializer if t.name in ("flat.shape", "unused")}
    folded, report = api._fold_model(m, api.FoldOptions(owned=True))
    assert report.folded == 2 and folded is m
    for t in folded.graph.initializer:
        if t.name in untouched:
            assert t is untouched[t.name]
    assert report.nodes_before == 8 and report.nodes_after == 7


def test_the_callers_model_is_never_mutated() -> None:
    m = if_model(np.random.default_rng(1))
    before, snapshot = m.SerializeToString(), copy.deepcopy(m)
    out, report = fold_onnx(m)
    assert report.folded == 1 and out is not m
    assert m.SerializeToString() == before and m == snapshot


def test_nothing_to_fold_returns_the_model_itself() -> None:
    m = make_model([helper.make_node("Relu", ["input"], ["output"], name="relu")], [("input", [1, 3], F32)], [("output", F32)], [])
    before = m.SerializeToString()
    out, report = fold_onnx(m)
    assert report.found == 0 and out is m and out.SerializeToString() == before


def test_changed_attribute_rewritten_in_place() -> None:
    """A rule that changes an attribute (Gemm β 0 → 1 once it has a C) leaves the node's other fields alone."""
    m = gemm_bn(np.random.default_rng(2), beta=0.0, c_shape=None)
    gemm = m.graph.node[0]
    gemm.doc_string = "the gemm"
    order = [a.name for a in gemm.attribute]
    out, report = fold_onnx(m)
    assert report.folded == 1
    got = out.graph.node[0]
    assert got.doc_string == "the gemm" and [a.name for a in got.attribute] == order
    assert {a.name: helper.get_attribute_value(a) for a in got.attribute}["beta"] == 1.0
    assert_equivalent(m, out, np.random.default_rng(3))


def test_if_branch_fold_lands_in_its_subgraph() -> None:
    m = if_model(np.random.default_rng(4))
    out, report = fold_onnx(m)
    assert report.folded == 1
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    then_g, else_g = branches["then_branch"], branches["else_branch"]
    assert [n.op_type for n in then_g.node] == ["Conv"]
    assert {t.name for t in then_g.initializer} == set(then_g.node[0].input[1:])  # the new weight and bias: where they are read
    assert [t.name for t in out.graph.initializer] == ["conv.w"]  # shared with the else branch: stays where it was
    assert else_g.SerializeToString() == next(a.g for a in m.graph.node[0].attribute if a.name == "else_branch").SerializeToString()
    assert_valid(out)


def _bn_then_if(rng) -> onnx.ModelProto:
    """Conv → BN, then an If whose then-branch folds too: the If's NodeProto moves up when the BN goes."""
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["h", "inner.w"], ["ic"], name="inner_conv"), bn_node("ic", "t_out", "bn_in")],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4, 5, 5])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["e_out"], name="pass")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4, 5, 5])])
    nodes = [
        helper.make_node("Conv", ["input", "outer.w"], ["c"], name="outer_conv", pads=[1, 1, 1, 1]),
        bn_node("c", "h", "bn_out"),
        helper.make_node("If", ["cond"], ["output"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 5, 5])],
        [init("outer.w", rand((4, 3, 3, 3), rng)), init("inner.w", rand((4, 4, 1, 1), rng)),
         *bn_inits("bn_out", 4, rng), *bn_inits("bn_in", 4, rng)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_subgraph_of_a_node_that_moved_up_in_a_model_written_in_place(tmp_path: Path) -> None:
    m = _bn_then_if(np.random.default_rng(8))
    onnx.save(m, tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert report.folded == 2
    out = onnx.load(tmp_path / "f.onnx")
    assert out.SerializeToString() == fold_onnx(m)[0].SerializeToString()
    assert [n.name for n in out.graph.node] == ["outer_conv", "if"]
    then_g = next(a.g for a in out.graph.node[1].attribute if a.name == "then_branch")
    assert [n.name for n in then_g.node] == ["inner_conv"]
    # the inner weight (read there only) is rewritten where it is declared; the new bias goes where it is read
    assert [t.name for t in then_g.initializer] == ["inner_conv.bias"]
    assert [t.name for t in out.graph.initializer] == ["outer.w", "inner.w", "outer_conv.bias"]
    assert_valid(out)
    s1, s2 = ort_session(m), ort_session(out)
    x = np.random.default_rng(9).standard_normal((1, 3, 5, 5)).astype(np.float32)
    for cond in (True, False):
        a, b = (s.run(None, {"input": x, "cond": np.array(cond)})[0] for s in (s1, s2))
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_function_constants_become_constant_nodes_before_their_reader() -> None:
    rng = np.random.default_rng(5)

    def const(name, arr):
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr.astype(np.float32), name))

    stats = bn_stats(4, rng)
    fn = helper.make_function(
        "local", "ConvBn", ["x"], ["y"],
        [helper.make_node("Relu", ["x"], ["rx"], name="pre", doc_string="stays"),
         const("w", rng.standard_normal((4, 3, 1, 1))), helper.make_node("Conv", ["rx", "w"], ["c"], name="fconv"),
         *[const(k, v) for k, v in stats.items()],
         helper.make_node("BatchNormalization", ["c", *stats], ["y"], name="fbn")],
        [helper.make_opsetid("", 17)],
    )
    g = helper.make_graph(
        [helper.make_node("ConvBn", ["input"], ["output"], domain="local", name="call")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 5, 5])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn])
    out, report = fold_onnx(m)
    assert report.folded == 1
    body = out.functions[0]
    assert [n.op_type for n in body.node] == ["Relu", "Constant", "Constant", "Conv"]
    assert body.node[0].SerializeToString() == fn.node[0].SerializeToString()
    assert [n.output[0] for n in body.node[1:3]] == list(body.node[3].input[1:])
    assert out.graph.SerializeToString() == m.graph.SerializeToString()
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    a, b = ort_session(m).run(None, {"input": x})[0], ort_session(out).run(None, {"input": x})[0]
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_ir3_inputs_keep_their_order_and_list_the_new_initializers() -> None:
    m = conv_bn(np.random.default_rng(6), opset=6, pads=[1, 1, 1, 1])
    assert m.ir_version == 3
    out, report = fold_onnx(m)
    assert report.folded == 1
    listed = [i.name for i in out.graph.input]
    kept = [i.name for i in m.graph.input if not i.name.startswith("bn.")]
    assert listed[: len(kept)] == kept and set(listed) == {"input"} | {t.name for t in out.graph.initializer}
    assert_valid(out)


def test_an_order_the_fold_broke_is_sorted_again() -> None:
    """Should a fold make a kept node read what a later one makes, a stable topological sort fixes the order."""
    nodes = [
        helper.make_node("Relu", ["input"], ["a"], name="relu"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Abs", ["input"], ["c"], name="abs"),
    ]
    m = make_model(nodes, [("input", [2, 3], F32)], [("b", F32), ("c", F32)], [])
    graph = gs.import_onnx(m)
    imported = writeback.Imported(graph, m)
    neg, absolute = graph.nodes[1], graph.nodes[2]
    neg.inputs[0] = absolute.outputs[0]
    writeback.write_back(imported, m, m, storage.TensorStore(), set(), set())
    assert [n.name for n in m.graph.node] == ["relu", "abs", "neg"]
    assert list(m.graph.node[2].input) == ["c"]
    onnx.checker.check_model(m, full_check=True)


def test_fold_file_pends_main_graph_values_only(tmp_path: Path, monkeypatch) -> None:
    """The streaming writer fills main-graph initializers only: a subgraph's folded values are written in place."""
    monkeypatch.setattr(storage, "PENDING_BYTES", 0)
    m = if_model(np.random.default_rng(7))
    onnx.save(m, tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert report.folded == 1
    out = onnx.load(tmp_path / "f.onnx")
    assert out.SerializeToString() == fold_onnx(m)[0].SerializeToString()
    assert_valid(out)


@pytest.mark.parametrize("external", [False, True])
def test_fold_file_writes_what_fold_onnx_returns(tmp_path: Path, external: bool) -> None:
    m = _annotated()
    src = tmp_path / "m.onnx"
    onnx.save(copy.deepcopy(m), src, save_as_external_data=external, location="m.data", size_threshold=0)
    api.fold_file(src, tmp_path / "f.onnx", external_data=False)
    assert (tmp_path / "f.onnx").read_bytes() == fold_onnx(m)[0].SerializeToString()


def test_attributes_graphsurgeon_cannot_read_stay() -> None:
    """onnx-graphsurgeon skips attribute types it does not read (sparse tensors, type protos, lists of
    graphs or tensors); a node the fold does not change keeps them, since its NodeProto is kept."""
    m = conv_bn(np.random.default_rng(10))
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("sp_values", TensorProto.FLOAT, [2], [1.5, -2.0]), helper.make_tensor("sp_indices", TensorProto.INT64, [2], [0, 3]), [4])
    m.graph.node.append(helper.make_node("Constant", [], ["sp"], name="sparse_const", sparse_value=sparse))
    m.graph.output.append(helper.make_tensor_value_info("sp", TensorProto.FLOAT, [4]))
    onnx.checker.check_model(m, full_check=True)
    out, report = fold_onnx(m)
    assert report.folded == 1
    assert out.graph.node[-1].SerializeToString() == m.graph.node[-1].SerializeToString()
    assert_valid(out)
