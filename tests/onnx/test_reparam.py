"""The `reparam` rule: the identity BatchNorm of a RepVGG / MobileOne block merged with its sibling convs.

Hand-built blocks (both node orders, with and without the branch BatchNorms, grouped, depthwise, fp16,
opsets 13/17, a stack of 8), exporter-built ones (TorchScript, dynamo, dynamo without its optimizer), the
refusals, and deliberately wrong merges (kernel centre off by one, 1x1 padded into the corner, identity
in the wrong grouped column) that onnxruntime must tell apart from the original.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import check_onnx, fold_onnx
from bnfold.affine import Affine, embed_kernel, identity_kernel, merge_branches
from bnfold.report import Reason, Status
from tests.onnx.helpers import F16, F32, assert_equivalent, assert_valid, init, make_model, op_types, rel_err, run


def trained_stats(c: int, rng: np.random.Generator, dtype=F32) -> dict[str, np.ndarray]:
    """Like trained BatchNorms: non-zero means, variances log-uniform 1e-6..10, some negative γ."""
    gamma = rng.standard_normal(c) * 0.8
    gamma[::3] = -np.abs(gamma[::3]) - 0.1
    beta = rng.standard_normal(c) * 0.5
    mean = rng.standard_normal(c) * 1.5 + 0.3
    var = np.exp(rng.uniform(np.log(1e-6), np.log(10.0), c))
    var[0] = 1e-6
    return {k: v.astype(dtype) for k, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))}


def _bn(x: str, y: str, prefix: str, c: int, rng, dtype) -> tuple[list, list]:
    stats = trained_stats(c, rng, dtype)
    node = helper.make_node("BatchNormalization", [x, *(f"{prefix}.{k}" for k in stats)], [y], name=prefix)
    return [node], [init(f"{prefix}.{k}", v) for k, v in stats.items()]


def block(
    rng,
    x: str,
    y: str,
    c: int,
    p: str = "b",
    *,
    kernels=(3, 1),
    groups: int = 1,
    bias: bool = True,
    branch_bn: bool = True,
    identity_first: bool = False,
    dtype=F32,
    c_out: int | None = None,
    conv_attrs: dict | None = None,
    relu: bool = True,
) -> tuple[list, list]:
    """``Σ_k Conv_k(x)[→BN] + BN(x)`` (→ Relu): one RepVGG (kernels (3, 1)) or MobileOne-ish block."""
    c_out = c_out or c
    nodes, inits, terms = [], [], []
    id_nodes, id_inits = _bn(x, f"{p}.id", f"{p}.bn_id", c, rng, dtype)
    for i, k in enumerate(kernels):
        w = (rng.standard_normal((c_out, c // groups, k, k)) * (1.0 / np.sqrt(c // groups * k * k))).astype(dtype)
        ins = [x, f"{p}.w{i}"]
        inits.append(init(f"{p}.w{i}", w))
        if bias:
            inits.append(init(f"{p}.b{i}", (rng.standard_normal(c_out) * 0.3).astype(dtype)))
            ins.append(f"{p}.b{i}")
        attrs = {"pads": [k // 2] * 4, "group": groups, "kernel_shape": [k, k]}
        attrs.update((conv_attrs or {}).get(i, {}))
        out = f"{p}.c{i}"
        nodes.append(helper.make_node("Conv", ins, [out], name=f"{p}.conv{i}", **attrs))
        if branch_bn:
            bn_nodes, bn_inits = _bn(out, f"{out}.bn", f"{p}.bn{i}", c_out, rng, dtype)
            nodes += bn_nodes
            inits += bn_inits
            out = f"{out}.bn"
        terms.append(out)
    total = terms[0]
    for i, t in enumerate(terms[1:]):
        nodes.append(helper.make_node("Add", [total, t], [f"{p}.sum{i}"], name=f"{p}.add{i}"))
        total = f"{p}.sum{i}"
    nodes = id_nodes + nodes if identity_first else nodes + id_nodes  # TorchScript: Conv, BN, Conv, BN, Add, BN, Add
    nodes.append(helper.make_node("Add", [total, f"{p}.id"], [f"{p}.pre" if relu else y], name=f"{p}.add_id"))
    if relu:
        nodes.append(helper.make_node("Relu", [f"{p}.pre"], [y], name=f"{p}.relu"))
    return nodes, id_inits + inits


def single(rng, c=8, hw=7, dtype=F32, opset=17, **kw) -> onnx.ModelProto:
    nodes, inits = block(rng, "input", "output", c, dtype=dtype, **kw)
    return make_model(nodes, [("input", [2, c, hw, hw], dtype)], [("output", dtype, [2, c, hw, hw])], inits, opset=opset)


def stack(rng, n=8, c=8, hw=7, **kw) -> onnx.ModelProto:
    nodes, inits = [], []
    for i in range(n):
        bn, bi = block(rng, "input" if i == 0 else f"x{i}", "output" if i == n - 1 else f"x{i + 1}", c, f"b{i}", **kw)
        nodes += bn
        inits += bi
    return make_model(nodes, [("input", [2, c, hw, hw], F32)], [("output", F32, [2, c, hw, hw])], inits)


def reparam_candidates(report) -> list:
    return [c for c in report.candidates if c.rule == "reparam"]


def assert_merged(m: onnx.ModelProto, blocks: int = 1, **eq) -> onnx.ModelProto:
    """Every BatchNorm gone, each block one Conv (→ Relu), the output name kept, ORT and checker agree."""
    rng = np.random.default_rng(99)
    out, report = fold_onnx(m)
    assert report.left == 0, str(report)
    assert report.folded == op_types(m).count("BatchNormalization"), str(report)
    assert op_types(out).count("Conv") == blocks and "Add" not in op_types(out) and "BatchNormalization" not in op_types(out)
    cands = reparam_candidates(report)
    assert len(cands) == blocks and all(c.direction == "into-producer" and c.target_op == "Conv" for c in cands)
    n_conv = op_types(m).count("Conv") // blocks
    assert sum(f"{n_conv + 1} branches → 1 Conv (" in n for n in report.notes) == blocks, report.notes
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    assert_valid(out)
    assert_equivalent(m, out, rng, **eq)
    return out


# ---------------------------------------------------------------------------------------------
# positive cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("identity_first", [False, True], ids=["id-last", "id-first"])
@pytest.mark.parametrize("branch_bn", [True, False], ids=["branch-bn", "branch-folded"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_repvgg_block(identity_first: bool, branch_bn: bool, bias: bool) -> None:
    m = single(np.random.default_rng(1), identity_first=identity_first, branch_bn=branch_bn, bias=bias)
    out = assert_merged(m)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert conv.output[0] == "b.pre"  # the merged conv took over the last Add's output tensor
    report = check_onnx(m)
    (cand,) = reparam_candidates(report)
    assert cand.status is Status.FOLDABLE and cand.target == "b.conv0"
    assert cand.describe().endswith("into producer Conv b.conv0 (rule reparam)")


@pytest.mark.parametrize("kernels", [(3, 3, 3, 1), (1, 3, 3), (5, 3, 1), (3,)], ids=str)
def test_mobileone_several_branches(kernels) -> None:
    out = assert_merged(single(np.random.default_rng(2), kernels=kernels, identity_first=True))
    w = [t for t in out.graph.initializer if t.name.startswith("b.w")]
    assert len(w) == 1 and list(w[0].dims)[2:] == [max(kernels)] * 2


@pytest.mark.parametrize("groups,c", [(2, 8), (4, 8), (8, 8)], ids=["g2", "g4", "depthwise"])
def test_grouped_and_depthwise(groups: int, c: int) -> None:
    assert_merged(single(np.random.default_rng(3), c=c, groups=groups))


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_dtypes_and_opsets(dtype, opset: int) -> None:
    out = assert_merged(single(np.random.default_rng(4), dtype=dtype, opset=opset, hw=5))
    assert {numpy_helper.to_array(t).dtype for t in out.graph.initializer} == {np.dtype(dtype)}


def test_stack_of_eight_blocks() -> None:
    assert_merged(stack(np.random.default_rng(5), n=8), blocks=8)


def test_dilated_and_same_padding() -> None:
    m = single(np.random.default_rng(6), conv_attrs={0: {"dilations": [2, 2], "pads": [2, 2, 2, 2]}})
    assert_merged(m)
    m = single(np.random.default_rng(6), conv_attrs={0: {"auto_pad": "SAME_UPPER"}, 1: {"auto_pad": "VALID"}})
    for node in m.graph.node:
        if node.op_type == "Conv":
            node.attribute.remove(next(a for a in node.attribute if a.name == "pads"))
    assert_merged(m)


def test_asymmetric_kernels_take_the_merged_geometry() -> None:
    """ACNet-style 1x3 + 3x1: no branch has the 3x3, so the kept conv takes its kernel and pads."""
    rng = np.random.default_rng(7)
    nodes, inits = block(rng, "input", "output", 6, kernels=(1, 1), branch_bn=False)
    inits = [t for t in inits if not t.name.startswith("b.w")]
    inits += [init("b.w0", rng.standard_normal((6, 6, 1, 3)).astype(F32)), init("b.w1", rng.standard_normal((6, 6, 3, 1)).astype(F32))]
    for node in nodes:
        if node.op_type == "Conv":
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("pads", [0, 1, 0, 1] if node.name == "b.conv0" else [1, 0, 1, 0])])
    m = make_model(nodes, [("input", [1, 6, 5, 5], F32)], [("output", F32, [1, 6, 5, 5])], inits)
    assert_merged(m)


@pytest.mark.parametrize(
    "adds",
    [
        [("c0", "id", "s0"), ("s0", "c1", "output")],  # Add(Add(Conv3, BN), Conv1)
        [("c1", "id", "s0"), ("c0", "s0", "output")],  # Add(Conv3, Add(Conv1, BN))
        [("id", "c0", "s0"), ("c1", "c2", "s1"), ("s0", "s1", "output")],  # two subtrees
    ],
    ids=["id-inner-left", "id-inner-right", "balanced"],
)
def test_identity_anywhere_in_the_add_tree(adds) -> None:
    rng = np.random.default_rng(9)
    c = 6
    nodes, inits = _bn("input", "id", "bn_id", c, rng, F32)
    used = {t for a in adds for t in a[:2]}
    for i, k in [(i, k) for i, k in enumerate((3, 1, 3)) if f"c{i}" in used]:
        inits.append(init(f"w{i}", (rng.standard_normal((c, c, k, k)) * 0.3).astype(F32)))
        nodes.append(helper.make_node("Conv", ["input", f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[k // 2] * 4))
    nodes += [helper.make_node("Add", [a, b], [o], name=f"add_{o}") for a, b, o in adds]
    m = make_model(nodes, [("input", [1, c, 5, 5], F32)], [("output", F32, [1, c, 5, 5])], inits)
    branches = 1 + sum(f"c{i}" in used for i in range(3))
    out, report = fold_onnx(m)
    assert report.folded == 1 and op_types(out) == ["Conv"] and out.graph.node[0].output[0] == "output"
    assert f"{branches} branches → 1 Conv (conv0)" in report.notes
    assert_valid(out)
    assert_equivalent(m, out, rng)


def test_x_a_graph_output_is_fine() -> None:
    rng = np.random.default_rng(8)
    nodes, inits = block(rng, "x", "output", 4, branch_bn=False)
    nodes.insert(0, helper.make_node("Relu", ["input"], ["x"], name="pre"))
    m = make_model(nodes, [("input", [1, 4, 5, 5], F32)], [("x", F32, [1, 4, 5, 5]), ("output", F32, [1, 4, 5, 5])], inits)
    out, report = fold_onnx(m)
    assert report.folded == 1 and op_types(out).count("Conv") == 1
    assert_equivalent(m, out, rng)


# ---------------------------------------------------------------------------------------------
# exporter-built (torch)
# ---------------------------------------------------------------------------------------------
def _torch_block(c: int, groups: int, n_kxk: int, bias: bool):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class RepBlock(nn.Module):
        """timm's RepVggBlock / MobileOneBlock before reparameterize_model: identity first, then the convs."""

        def __init__(self) -> None:
            super().__init__()
            self.identity = nn.BatchNorm2d(c)
            self.scale = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=bias), nn.BatchNorm2d(c))
            self.kxk = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=bias), nn.BatchNorm2d(c)) for _ in range(n_kxk)
            )

        def forward(self, x):
            identity = self.identity(x)
            out = self.scale(x)
            for conv in self.kxk:
                out = out + conv(x)
            return torch.relu(out + identity)

    net = nn.Sequential(RepBlock(), RepBlock())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(c, generator=g) * 1.5 + 0.3)
                mod.running_var.copy_(torch.exp(torch.empty(c).uniform_(np.log(1e-6), np.log(10.0), generator=g)))
                mod.weight.copy_(torch.randn(c, generator=g) * 0.8)
                mod.weight[::3] = -mod.weight[::3].abs() - 0.1
                mod.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return torch, net.eval()


@pytest.mark.parametrize(
    "export",
    [
        dict(dynamo=False, do_constant_folding=False, opset_version=17),
        dict(dynamo=False, do_constant_folding=False, opset_version=13),
        dict(dynamo=True),
        dict(dynamo=True, optimize=False),
    ],
    ids=["torchscript17", "torchscript13", "dynamo", "dynamo-noopt"],
)
@pytest.mark.parametrize("groups,n_kxk,bias", [(1, 1, False), (2, 3, True), (8, 1, False)], ids=["repvgg", "mobileone-g2", "dw"])
def test_torch_exports(tmp_path, export: dict, groups: int, n_kxk: int, bias: bool) -> None:
    if export.get("dynamo"):
        pytest.importorskip("onnxscript")
    torch, net = _torch_block(8, groups, n_kxk, bias)
    x = torch.randn(2, 8, 9, 9)
    path = tmp_path / "rep.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["input"], **export)
    m = onnx.load(str(path))
    out, report = fold_onnx(m)
    assert report.left == 0, str(report)
    assert len(reparam_candidates(report)) == 2
    assert op_types(out).count("Conv") == 2 and "BatchNormalization" not in op_types(out) and "Add" not in op_types(out)
    assert_valid(out)
    assert_equivalent(m, out, np.random.default_rng(0))
    with torch.no_grad():
        ref = net(x).numpy()
    got = run(out, {out.graph.input[0].name: x.numpy()})[0]
    assert rel_err(ref, got) < 1e-5


# ---------------------------------------------------------------------------------------------
# refusals: the graph stays as it was
# ---------------------------------------------------------------------------------------------
def assert_refused(m: onnx.ModelProto, code: Reason, words: str) -> None:
    out, report = fold_onnx(m)
    left = [c for c in report.candidates if c.status is Status.SKIPPED]
    assert len(left) == 1, str(report)
    assert code in [r.code for r in left[0].reasons], str(report)
    assert any(words in r.message for r in left[0].reasons), str(report)
    assert op_types(out) == op_types(m)
    assert_equivalent(m, out, np.random.default_rng(0))


def test_stride_two_refused() -> None:
    """Stride 2 on a 1x1 input: the shapes still add up, but x[p] is not read by output p in general."""
    attrs = {0: {"strides": [2, 2]}, 1: {"strides": [2, 2]}}
    nodes, inits = block(np.random.default_rng(10), "input", "output", 4, branch_bn=False, relu=False, conv_attrs=attrs)
    m = make_model(nodes, [("input", [1, 4, 1, 1], F32)], [("output", F32, [1, 4, 1, 1])], inits)
    assert_refused(m, Reason.SHAPE_MISMATCH, "stride 2: the identity branch cannot be a kernel")


def test_pads_mismatch_refused() -> None:
    m = single(np.random.default_rng(11), branch_bn=False, conv_attrs={0: {"pads": [2, 2, 0, 0]}})
    assert_refused(m, Reason.SHAPE_MISMATCH, "do not centre its 3x3 kernel")


def test_channels_differ_refused() -> None:
    """A Conv 4 → 8 beside a BN over 8 channels of x with 4: only a broadcast-free shape-valid variant is C_in = 1."""
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["input", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["id"], name="bn"),
        helper.make_node("Add", ["c", "id"], ["output"], name="add"),
    ]
    inits = [init("w", rng.standard_normal((4, 1, 3, 3)).astype(F32))]
    inits += [init(f"bn.{k}", v) for k, v in trained_stats(1, rng).items()]
    m = make_model(nodes, [("input", [1, 1, 5, 5], F32)], [("output", F32, [1, 4, 5, 5])], inits)
    assert_refused(m, Reason.SHAPE_MISMATCH, "an identity branch needs C_in = C_out")


def test_conv_read_elsewhere_refused() -> None:
    rng = np.random.default_rng(13)
    nodes, inits = block(rng, "input", "output", 4, branch_bn=False)
    nodes.append(helper.make_node("Relu", ["b.c1"], ["side"], name="side"))
    m = make_model(nodes, [("input", [1, 4, 5, 5], F32)], [("output", F32, [1, 4, 5, 5]), ("side", F32, [1, 4, 5, 5])], inits)
    assert_refused(m, Reason.OTHER_CONSUMER, "merging the branches would change it")


def test_conv_output_a_graph_output_refused() -> None:
    rng = np.random.default_rng(14)
    nodes, inits = block(rng, "input", "output", 4, branch_bn=False)
    m = make_model(nodes, [("input", [1, 4, 5, 5], F32)], [("output", F32, [1, 4, 5, 5]), ("b.c0", F32, [1, 4, 5, 5])], inits)
    assert_refused(m, Reason.GRAPH_OUTPUT, "is a graph output")


def test_bn_without_sibling_conv_keeps_its_reason() -> None:
    rng = np.random.default_rng(15)
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        helper.make_node("BatchNormalization", ["input", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["id"], name="bn"),
        helper.make_node("Add", ["r", "id"], ["output"], name="add"),
    ]
    inits = [init(f"bn.{k}", v) for k, v in trained_stats(4, rng).items()]
    m = make_model(nodes, [("input", [1, 4, 5, 5], F32)], [("output", F32, [1, 4, 5, 5])], inits)
    assert_refused(m, Reason.NO_LINEAR_NEIGHBOUR, "has no Conv/ConvTranspose/Gemm/MatMul")


def test_branch_bn_that_stays_explains_the_identity() -> None:
    """The branch BN cannot fold (its conv output also feeds a graph output): the identity BN says why it stays."""
    rng = np.random.default_rng(16)
    nodes, inits = block(rng, "input", "output", 4, identity_first=True)
    m = make_model(nodes, [("input", [1, 4, 5, 5], F32)], [("output", F32, [1, 4, 5, 5]), ("b.c1", F32, [1, 4, 5, 5])], inits)
    out, report = fold_onnx(m)
    (ident,) = [c for c in report.candidates if c.node == "b.bn_id"]
    assert ident.status is Status.SKIPPED
    assert any("is still followed by BatchNormalization 'b.bn1'" in r.message for r in ident.reasons), str(report)
    assert_equivalent(m, out, rng)


# ---------------------------------------------------------------------------------------------
# the math, and merges that are wrong on purpose
# ---------------------------------------------------------------------------------------------
def test_identity_kernel_layout() -> None:
    s = np.arange(1.0, 9.0)
    dense, grouped, dw = identity_kernel(s, 8, (3, 3)), identity_kernel(s, 2, (3, 3)), identity_kernel(s, 1, (3, 3))
    assert dense[3, 3, 1, 1] == 4.0 and dense.sum() == s.sum() and dense[:, :, 1, 1].trace() == s.sum()
    assert grouped[5, 1, 1, 1] == 6.0 and grouped[5, 0].sum() == 0.0  # group 2 of 4: channel 5 is column 1
    assert np.array_equal(dw[:, 0, 1, 1], s)
    assert embed_kernel(np.ones((2, 2, 1, 1)), (3, 3))[:, :, 1, 1].sum() == 4.0


def _merged_wrongly(m: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """The block merged by hand (float64 math of `merge_branches`, then corrupted), for the tests below."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    stats = [inits[f"b.bn_id.{k}"].astype(np.float64) for k in ("scale", "bias", "mean", "var")]
    s = stats[0] / np.sqrt(stats[3] + 1e-5)
    t = stats[1] - s * stats[2]
    groups = next(a.i for n in m.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group")
    ws, bs = [inits["b.w0"], inits["b.w1"]], [inits["b.b0"], inits["b.b1"]]
    w, b = merge_branches(ws, bs, (3, 3), Affine(s, t))
    c_in_g = w.shape[1]
    o = np.arange(w.shape[0])
    if how == "centre-off-by-one":
        w = merge_branches(ws, bs, (3, 3), None)[0]
        w[o, o % c_in_g, 1, 2] += s
    elif how == "1x1-in-corner":
        w = embed_kernel(ws[0], (3, 3)) + identity_kernel(s, c_in_g, (3, 3))
        w[:, :, 0, 0] += ws[1][:, :, 0, 0]
    elif how == "identity-wrong-column":
        w = merge_branches(ws, bs, (3, 3), None)[0]
        w[o, (o + 1) % c_in_g, 1, 1] += s
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["pre"], pads=[1, 1, 1, 1], group=groups), helper.make_node("Relu", ["pre"], ["output"])]
    x = m.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    return make_model(nodes, [("input", shape, F32)], [("output", F32, shape)], [init("W", w.astype(F32)), init("B", b.astype(F32))])


@pytest.mark.parametrize("how", ["right", "centre-off-by-one", "1x1-in-corner", "identity-wrong-column"])
def test_wrong_merges_are_caught(how: str) -> None:
    groups = 2 if how == "identity-wrong-column" else 1
    m = single(np.random.default_rng(20), branch_bn=False, groups=groups)
    merged = _merged_wrongly(m, how)
    if how == "right":
        assert_equivalent(m, merged, np.random.default_rng(0))
    else:
        with pytest.raises(AssertionError, match="folded output differs"):
            assert_equivalent(m, merged, np.random.default_rng(0))
