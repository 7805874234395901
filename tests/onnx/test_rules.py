"""The rule framework: refusals raised in a rule reach the report, the plan is pure, check writes nothing."""

from __future__ import annotations

import builtins
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import bnfold.onnx.api as api
import bnfold.onnx.plan as plan_module
from bnfold import check_onnx, fold_onnx
from bnfold.onnx.chain import display
from bnfold.onnx.constants import ConstantResolver
from bnfold.onnx.plan import plan_model
from bnfold.onnx.rules.base import INTO_CONSUMER, INTO_PRODUCER, Chain, PlanContext, Rule, Site, refuse
from bnfold.onnx.rules.conv import ConvIntoProducer
from bnfold.onnx.rules.registry import rules
from bnfold.report import HINTS, Reason, Status
from sample_models import zoo
from tests.onnx.helpers import assert_equivalent, bn_inits, conv_bn_relu, init
from tests.onnx.helpers import bn_node, unchecked_model


def bn_conv_bn_head(rng: np.random.Generator) -> onnx.ModelProto:
    """BN → unpadded Conv → BN → Flatten → Gemm: the second fold reads the weights the first one wrote."""
    nodes = [
        bn_node("input", "a", "bn0"),
        helper.make_node("Conv", ["a", "conv.w", "conv.b"], ["c"], name="conv"),
        bn_node("c", "y", "bn1"),
        helper.make_node("Flatten", ["y"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "W", "C"], ["output"], name="fc", transB=1),
    ]
    inits = [
        init("conv.w", rng.standard_normal((6, 4, 1, 1)).astype(np.float32)),
        init("conv.b", rng.standard_normal(6).astype(np.float32)),
        init("W", rng.standard_normal((5, 6 * 3 * 3)).astype(np.float32)),
        init("C", rng.standard_normal(5).astype(np.float32)),
        *bn_inits("bn0", 4, rng),
        *bn_inits("bn1", 6, rng),
    ]
    return unchecked_model(nodes, [("input", [2, 4, 3, 3])], [("output", [2, 5])], inits)


def bn_flatten_gemm(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        bn_node("input", "y", "bn"),
        helper.make_node("Flatten", ["y"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "W"], ["output"], name="fc", transB=1),
    ]
    inits = [init("W", rng.standard_normal((5, 12)).astype(np.float32)), *bn_inits("bn", 3, rng)]
    return unchecked_model(nodes, [("input", [2, 3, 2, 2])], [("output", [2, 5])], inits)


# ---------------------------------------------------------------------------------------------
# the report names the rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,rule,direction,target",
    [
        (lambda: conv_bn_relu(np.random.default_rng(0)), "conv", INTO_PRODUCER, "conv"),
        (zoo.conv_transpose_bn, "conv-transpose", INTO_PRODUCER, None),
        (zoo.gemm_bn, "gemm", INTO_PRODUCER, None),
        (zoo.matmul_bn, "matmul", INTO_PRODUCER, None),
        (lambda: bn_flatten_gemm(np.random.default_rng(1)), "flatten-head", INTO_CONSUMER, "fc"),
    ],
)
def test_candidate_names_the_rule_that_folds_it(build, rule: str, direction: str, target: str | None) -> None:
    m = build()
    _, report = fold_onnx(m)
    (cand,) = report.candidates
    assert (cand.status, cand.rule, cand.direction) == (Status.FOLDED, rule, direction)
    assert cand.to_dict()["rule"] == rule
    assert cand.describe().endswith(f"(rule {rule})")
    if target is not None:
        assert cand.target == target
    assert [c.rule for c in check_onnx(m).candidates] == [rule]


def test_chained_folds_compose_and_each_names_its_rule() -> None:
    rng = np.random.default_rng(2)
    m = bn_conv_bn_head(rng)
    out, report = fold_onnx(m)
    assert [(c.node, c.rule, c.direction) for c in report.candidates] == [
        ("bn0", "conv", INTO_CONSUMER),
        ("bn1", "conv", INTO_PRODUCER),
    ]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Flatten", "Gemm"]
    assert_equivalent(m, out, rng)


# ---------------------------------------------------------------------------------------------
# refusals are raised inside a rule and caught by the pass, once
# ---------------------------------------------------------------------------------------------
def test_refusal_raised_in_a_rule_lands_in_the_report_with_its_code(monkeypatch) -> None:
    def refusing(self, node, affine, ctx):
        refuse(Reason.SHAPE_MISMATCH, f"test: '{display(node)}' refused")

    monkeypatch.setattr(ConvIntoProducer, "values", refusing)
    m = conv_bn_relu(np.random.default_rng(3))
    for report in (check_onnx(m), fold_onnx(m)[1]):
        (cand,) = report.candidates
        assert cand.status is Status.SKIPPED and cand.rule is None
        assert [(r.code, r.message) for r in cand.reasons] == [(Reason.SHAPE_MISMATCH, "test: 'conv' refused")]
        assert cand.to_dict()["reasons"][0] == {
            "code": "shape-mismatch",
            "message": "test: 'conv' refused",
            "hint": HINTS[Reason.SHAPE_MISMATCH],
        }


class RefusesEveryBatchNorm(Rule):
    """A rule added from outside the package, tried before all others: it only refuses."""

    name = "test-refuser"
    direction = INTO_PRODUCER
    priority = 10

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        if chain.batchnorms:
            refuse(Reason.UNSUPPORTED, f"test rule saw {display(chain.batchnorms[0])}")
        return None


@pytest.fixture
def with_refuser(monkeypatch):
    monkeypatch.setattr(plan_module, "rules", lambda: (RefusesEveryBatchNorm(), *rules()))


def test_a_refusal_does_not_stop_a_later_rule(with_refuser) -> None:
    _, report = fold_onnx(conv_bn_relu(np.random.default_rng(4)))
    (cand,) = report.candidates
    assert (cand.status, cand.rule, cand.reasons) == (Status.FOLDED, "conv", [])


def test_a_refusal_replaces_no_linear_neighbour(with_refuser) -> None:
    rng = np.random.default_rng(5)
    m = unchecked_model([bn_node("input", "output", "bn")], [("input", [1, 3, 2, 2])], [("output", [1, 3, 2, 2])], bn_inits("bn", 3, rng))
    (cand,) = check_onnx(m).candidates
    assert [(r.code, r.message) for r in cand.reasons] == [(Reason.UNSUPPORTED, "test rule saw bn")]


# ---------------------------------------------------------------------------------------------
# plan is pure; check stops at the plan
# ---------------------------------------------------------------------------------------------
def test_plan_does_not_touch_the_graph() -> None:
    m = bn_conv_bn_head(np.random.default_rng(6))
    graph = gs.import_onnx(m)
    nodes, before = list(graph.nodes), gs.export_onnx(graph).SerializeToString()
    shapes = api.infer_shapes(m)
    resolver = ConstantResolver(set(), False, shapes, 17)
    names = {t for t in graph.tensors()} | {n.name for n in graph.nodes}
    taken = set(names)
    plan = plan_model(graph, resolver, shapes, names)
    assert len(plan.folds) == 2 and all(p.candidate.status is Status.FOLDABLE for p in plan.folds)
    assert gs.export_onnx(graph).SerializeToString() == before
    assert all(a is b for a, b in zip(graph.nodes, nodes)) and len(graph.nodes) == len(nodes)
    assert names == taken  # the rehearsal took its new names from a copy
    # the plan refers to the original graph's nodes, ready to apply
    assert all(any(p.fold.site.target is n for n in nodes) for p in plan.folds)
    assert all(p.graph is graph for p in plan.folds)


@pytest.mark.parametrize("build", ["resnet_tiny", "constant_node_params", "expand_castlike_bias", "matmul_add_bn", "shared_weight_conv_bn"])
def test_a_plan_replayed_on_the_original_graph_equals_the_one_made_in_place(build: str) -> None:
    """The two ways `plan.py` describes give one graph: rehearse on a scratch copy and replay with
    `apply_plan`, or rehearse in place. Folded nodes leave `graph.nodes` once per graph (`GraphEdit.prune`)
    in both; a node left behind, or one pruned twice, would show in the exported bytes."""
    m = zoo.BUILDERS[build]()
    shapes = api.infer_shapes(m)

    def folded(in_place: bool) -> bytes:
        graph = gs.import_onnx(m)
        names = {t for t in graph.tensors()} | {n.name for n in graph.nodes}
        plan = plan_model(graph, ConstantResolver(set(), False, shapes, 17), shapes, names, in_place=in_place)
        assert plan.folds
        plan_module.apply_plan(plan, plan_module.GraphEdit(graph, names))
        assert all(n.outputs for n in graph.nodes)  # nothing a fold cut off is left in the list
        return gs.export_onnx(graph).SerializeToString()

    assert folded(in_place=False) == folded(in_place=True)


def external_model(folder: Path) -> Path:
    m = conv_bn_relu(np.random.default_rng(7), c_in=64, c_out=64)  # a 144 KiB weight: the fold would spill it
    folder.mkdir()
    p = folder / "ext.onnx"
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return p


def test_check_writes_no_file_of_any_kind(tmp_path: Path, monkeypatch) -> None:
    p = external_model(tmp_path / "model")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # every tempfile call lands here
    assert tempfile.gettempdir() == str(private_tmp)

    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        assert not set(mode) & set("wax+"), f"check opened {file!r} for writing"
        return real_open(file, mode, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("check must stop at the plan")

    monkeypatch.setattr(builtins, "open", read_only_open)
    monkeypatch.setattr(api, "TensorStore", forbidden)
    monkeypatch.setattr(api, "Imported", forbidden)
    monkeypatch.setattr(api, "write_back", forbidden)
    monkeypatch.setattr(api, "_postcondition", forbidden)
    before = sorted(os.listdir(p.parent))
    report = check_onnx(p)
    assert report.foldable == 1 and report.candidates[0].rule == "conv"
    assert sorted(os.listdir(p.parent)) == before
    assert os.listdir(private_tmp) == []


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
def test_registry_order_and_names() -> None:
    registered = rules()
    keys = [(r.name, r.direction) for r in registered]
    assert len(set(keys)) == len(keys)
    assert [r.priority for r in registered] == sorted(r.priority for r in registered)
    sides = [r.direction for r in registered]
    assert sides.index(INTO_CONSUMER) > max(i for i, d in enumerate(sides) if d == INTO_PRODUCER)
    assert {"conv", "conv-transpose", "gemm", "matmul", "flatten-head"} <= {r.name for r in registered}


@pytest.mark.parametrize("build", [zoo.resnet_tiny, zoo.expand_castlike_bias, zoo.identity_params, zoo.matmul_bn])
def test_check_counts_what_fold_would_leave_from_the_plan(build) -> None:
    m = build()
    dry, done = check_onnx(m), fold_onnx(m)[1]
    assert (dry.nodes_after, dry.params_after) == (done.nodes_after, done.params_after)


def test_a_multi_layer_site_maps_back_to_the_original_graph() -> None:
    """A rule over several layers (a Concat of producers, a re-parameterised block) names them in a Site
    subclass; the plan maps every node and tensor in it, however nested, back to the real graph."""
    from dataclasses import dataclass, field

    from bnfold.onnx.scratch import ScratchCopy

    @dataclass
    class Branches(Site):
        branches: list[gs.Node] = field(default_factory=list)
        shared_input: gs.Tensor | None = None

    graph = gs.import_onnx(bn_conv_bn_head(np.random.default_rng(8)))
    scratch = ScratchCopy(graph)
    conv, flatten = scratch.graph.nodes[1], scratch.graph.nodes[3]
    site = Branches(conv, branches=[conv, flatten], shared_input=conv.inputs[0])
    back = plan_module._translated(site, scratch.original)
    assert back.target is graph.nodes[1] and back.branches[1] is graph.nodes[3]
    assert back.shared_input is graph.nodes[1].inputs[0] and isinstance(back, Branches)
    created = gs.Node("Add", name="made_by_a_rehearsal")
    with pytest.raises(AssertionError, match="made_by_a_rehearsal"):
        plan_module._translated(Site(created), scratch.original)


@pytest.mark.parametrize("build", [zoo.resnet_tiny, zoo.expand_castlike_bias, zoo.conv_bn_two_consumers])
def test_scratch_copy_mirrors_every_list_the_planner_reads(build) -> None:
    from bnfold.onnx.scratch import ScratchCopy

    graph = gs.import_onnx(build())
    scratch = ScratchCopy(graph)
    assert [id(scratch.original(n)) for n in scratch.graph.nodes] == [id(n) for n in graph.nodes]
    for name, copy in scratch.graph.tensors().items():
        original = scratch.original(copy)
        assert original.name == name and copy is not original
        for side in ("inputs", "outputs"):
            assert [id(scratch.original(n)) for n in getattr(copy, side)] == [id(n) for n in getattr(original, side)]
    for node in scratch.graph.nodes:
        for side in ("inputs", "outputs"):
            assert [id(scratch.original(t)) for t in getattr(node, side)] == [id(t) for t in getattr(scratch.original(node), side)]
