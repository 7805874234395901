"""Parameters reach the layer or the BatchNorm as constants in many shapes; all fold, and shared tensors
stay as they were for every other reader."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.onnx.helpers import (
    F32,
    bn_inits,
    bn_node,
    bn_stats,
    fold_and_verify,
    init,
    initializers,
    make_model,
    op_types,
    rand,
)

C = 4
IN = [("input", [2, C, 5, 5], F32)]


def _conv_bn(rng, *, w="w", b="b", stats_prefix="bn"):
    nodes = [helper.make_node("Conv", ["input", w, b], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "output", stats_prefix)]
    return nodes


def _const_node(name, value):
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(np.asarray(value), name))


@pytest.mark.parametrize("which", ["bn.scale", "bn.var", "w", "b"])
def test_identity_of_initializer(which):
    """A de-duplicated parameter: Identity of another initializer."""
    rng = np.random.default_rng(1)
    st = bn_stats(C, rng)
    values = {"w": rand((C, C, 3, 3), rng, F32, 0.5), "b": rand(C, rng), **{f"bn.{k}": v for k, v in st.items()}}
    inits = [init(k if k != which else "src", v) for k, v in values.items()]
    nodes = [helper.make_node("Identity", ["src"], [which], name="ident")] + _conv_bn(rng)
    m = make_model(nodes, IN, [("output", F32)], inits)
    out, _ = fold_and_verify(m, rng)
    assert op_types(out) == ["Conv"], "the Identity only the fold read is gone"


@pytest.mark.parametrize("which", ["bn.mean", "bn.bias", "w", "b"])
def test_constant_node(which):
    rng = np.random.default_rng(2)
    st = bn_stats(C, rng)
    values = {"w": rand((C, C, 3, 3), rng, F32, 0.5), "b": rand(C, rng), **{f"bn.{k}": v for k, v in st.items()}}
    inits = [init(k, v) for k, v in values.items() if k != which]
    nodes = [_const_node(which, values[which])] + _conv_bn(rng)
    m = make_model(nodes, IN, [("output", F32)], inits)
    out, _ = fold_and_verify(m, rng)
    assert op_types(out) == ["Conv"]


def test_constant_node_value_floats():
    rng = np.random.default_rng(3)
    st = bn_stats(C, rng)
    inits = [init("w", rand((C, C, 3, 3), rng, F32, 0.5)), init("b", rand(C, rng))]
    inits += [init(f"bn.{k}", v) for k, v in st.items() if k != "var"]
    nodes = [helper.make_node("Constant", [], ["bn.var"], name="cvar", value_floats=st["var"].tolist())] + _conv_bn(rng)
    m = make_model(nodes, IN, [("output", F32)], inits)
    fold_and_verify(m, rng)


@pytest.mark.parametrize("which", ["bn.mean", "b"])
def test_constant_of_shape(which):
    rng = np.random.default_rng(4)
    st = bn_stats(C, rng)
    values = {"w": rand((C, C, 3, 3), rng, F32, 0.5), "b": rand(C, rng), **{f"bn.{k}": v for k, v in st.items()}}
    inits = [init(k, v) for k, v in values.items() if k != which] + [init("cshape", np.array([C], np.int64))]
    fill = numpy_helper.from_array(np.array([0.625], np.float32), "fill")
    nodes = [helper.make_node("ConstantOfShape", ["cshape"], [which], name="cos", value=fill)] + _conv_bn(rng)
    m = make_model(nodes, IN, [("output", F32)], inits)
    out, _ = fold_and_verify(m, rng)
    assert "ConstantOfShape" not in op_types(out)


def test_constant_subexpression():
    """var = a·a + Cast(int) ; scale = Neg(Constant) ; weight = Transpose(initializer)."""
    rng = np.random.default_rng(5)
    st = bn_stats(C, rng)
    a = np.sqrt(st["var"]).astype(np.float32)
    inits = [
        init("wT", np.ascontiguousarray(rand((C, C, 3, 3), rng, F32, 0.5).transpose(1, 0, 2, 3))),
        init("b", rand(C, rng)),
        init("a", a),
        init("one", np.array([0], np.int64)),
        init("bn.bias", st["bias"]),
        init("bn.mean", st["mean"]),
    ]
    nodes = [
        helper.make_node("Transpose", ["wT"], ["w"], name="wt", perm=[1, 0, 2, 3]),
        helper.make_node("Mul", ["a", "a"], ["a2"], name="sq"),
        helper.make_node("Cast", ["one"], ["onef"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["a2", "onef"], ["bn.var"], name="addv"),
        _const_node("negscale", -st["scale"]),
        helper.make_node("Neg", ["negscale"], ["bn.scale"], name="neg"),
    ] + _conv_bn(rng)
    m = make_model(nodes, IN, [("output", F32)], inits)
    out, _ = fold_and_verify(m, rng)
    assert op_types(out) == ["Conv"], "the subexpressions only the fold read are gone"


def test_dynamo_style_bias():
    """torch.onnx.export(dynamo=True, optimize=False): bias = Expand(CastLike(0, input), Shape(weight)[0:1])."""
    rng = np.random.default_rng(6)
    inits = [init("w", rand((C, C, 3, 3), rng, F32, 0.5)), init("zero", np.array(0.0, np.float32)), *bn_inits("bn", bn_stats(C, rng))]
    nodes = [
        helper.make_node("Shape", ["w"], ["wshape"], name="shape", start=0, end=1),
        helper.make_node("CastLike", ["zero", "input"], ["z"], name="castlike"),
        helper.make_node("Expand", ["z", "wshape"], ["b"], name="expand"),
    ] + _conv_bn(rng)
    m = make_model(nodes, IN, [("output", F32)], inits, opset=18)
    out, _ = fold_and_verify(m, rng)
    assert op_types(out) == ["Conv"]
    assert "w" in {t.name for t in out.graph.initializer} or len(out.graph.initializer) == 2


def test_matmul_weight_transposed_initializer():
    """Linear without bias as exported: MatMul(x, Transpose(W[N, K]))."""
    rng = np.random.default_rng(7)
    inits = [init("W", rand((4, 5), rng, F32, 0.5)), *bn_inits("bn", bn_stats(4, rng))]
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["input", "Wt"], ["mm"], name="matmul"),
        bn_node("mm", "output", "bn"),
    ]
    m = make_model(nodes, [("input", [3, 5], F32)], [("output", F32)], inits)
    fold_and_verify(m, rng)


# ---------------------------------------------------------------------------------------------
# shared tensors: fold a private copy, never change what another node reads
# ---------------------------------------------------------------------------------------------
def test_weight_shared_with_a_layer_that_stays():
    rng = np.random.default_rng(8)
    inits = [init("w", rand((C, C, 3, 3), rng, F32, 0.5)), init("b", rand(C, rng)), *bn_inits("bn", bn_stats(C, rng))]
    nodes = _conv_bn(rng) + [helper.make_node("Conv", ["input", "w", "b"], ["other"], name="conv2", pads=[1, 1, 1, 1])]
    m = make_model(nodes, IN, [("output", F32), ("other", F32)], inits)
    out, _ = fold_and_verify(m, rng)
    src, dst = initializers(m), initializers(out)
    conv2 = [n for n in out.graph.node if n.name == "conv2"][0]
    conv = [n for n in out.graph.node if n.name == "conv"][0]
    assert list(conv2.input) == ["input", "w", "b"], "the other reader keeps its tensors"
    assert dst["w"].tobytes() == src["w"].tobytes() and dst["b"].tobytes() == src["b"].tobytes()
    assert conv.input[1] != "w" and conv.input[2] != "b", "the folded conv reads private copies"


def test_weight_shared_by_two_folds():
    """Two Conv → BN pairs reading the same weight (different BatchNorms): two private folded copies."""
    rng = np.random.default_rng(9)
    inits = [init("w", rand((C, C, 3, 3), rng, F32, 0.5)), *bn_inits("bn1", bn_stats(C, rng)), *bn_inits("bn2", bn_stats(C, rng))]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", "out1", "bn1"),
        helper.make_node("Conv", ["input", "w"], ["c2"], name="conv2"),
        bn_node("c2", "out2", "bn2"),
    ]
    m = make_model(nodes, IN, [("out1", F32), ("out2", F32)], inits)
    out, _ = fold_and_verify(m, rng, folds=2)
    w1, w2 = (n.input[1] for n in out.graph.node)
    assert w1 != w2


def test_weight_also_read_by_shape():
    """The weight also feeds a Shape that stays in the graph: it keeps its value for that reader."""
    rng = np.random.default_rng(10)
    inits = [init("w", rand((C, C, 3, 3), rng, F32, 0.5)), init("b", rand(C, rng)), *bn_inits("bn", bn_stats(C, rng))]
    nodes = _conv_bn(rng) + [helper.make_node("ReduceSum", ["w"], ["wsum"], name="wsum", keepdims=0)]
    m = make_model(nodes, IN, [("output", F32), ("wsum", F32)], inits)
    out, _ = fold_and_verify(m, rng)
    assert initializers(out)["w"].tobytes() == initializers(m)["w"].tobytes()


def test_bn_parameters_shared_by_two_batchnorms():
    rng = np.random.default_rng(11)
    inits = [init("w1", rand((C, C, 3, 3), rng, F32, 0.5)), init("w2", rand((C, C, 1, 1), rng, F32, 0.5)), *bn_inits("bn", bn_stats(C, rng))]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", "out1", "bn", name="bn1"),
        helper.make_node("Conv", ["input", "w2"], ["c2"], name="conv2"),
        bn_node("c2", "out2", "bn", name="bn2"),
    ]
    m = make_model(nodes, IN, [("out1", F32), ("out2", F32)], inits)
    out, _ = fold_and_verify(m, rng, folds=2)
    assert op_types(out) == ["Conv", "Conv"]


def test_identity_shared_with_another_reader():
    """w = Identity(w0), and w0 also feeds a second Conv: that Conv still reads the original values."""
    rng = np.random.default_rng(12)
    inits = [init("w0", rand((C, C, 3, 3), rng, F32, 0.5)), init("b", rand(C, rng)), *bn_inits("bn", bn_stats(C, rng))]
    nodes = [helper.make_node("Identity", ["w0"], ["w"], name="ident")] + _conv_bn(rng) + [
        helper.make_node("Conv", ["input", "w"], ["other"], name="conv2", pads=[1, 1, 1, 1])
    ]
    m = make_model(nodes, IN, [("output", F32), ("other", F32)], inits)
    out, _ = fold_and_verify(m, rng)
    assert initializers(out)["w0"].tobytes() == initializers(m)["w0"].tobytes()


def test_a_new_tensor_at_a_freed_tensors_address_is_not_given_its_value() -> None:
    """The memo is by identity; a tensor a fold removed is freed, and CPython hands its address to the
    next object of that size — a folded bias, say. Seen on timm mobileone_s0 (dynamo optimize=False):
    a conv got another conv's bias, 0.15 of the output's scale off (verification caught it)."""
    import gc

    import onnx_graphsurgeon as gs

    from bnfold.onnx.constants import ConstantResolver

    resolver = ConstantResolver(set(), False, {}, 17)
    old = gs.Constant("old", np.ones(3, np.float32))
    first = resolver.resolve(old)  # not inside an assert: pytest's rewriting would keep `old` alive
    assert first.value.tolist() == [1, 1, 1]
    address = id(old)
    del old
    gc.collect()
    kept = []  # tensors that did not land on the freed address stay alive, so the search moves on
    for _ in range(10_000):  # (with the memo holding `old`, the address is never freed: no landing)
        new = gs.Constant("new", np.full(3, 2, np.float32))
        if id(new) == address:
            break
        kept.append(new)
    assert resolver.resolve(new).value.tolist() == [2, 2, 2]


def _expands(k: int):
    """k tensors, each Expand(zero, [4]) by a node of its own: the same evaluation k times."""
    import onnx_graphsurgeon as gs

    zero, shape = gs.Constant("zero", np.array(0.0, np.float32)), gs.Constant("shape", np.array([4], np.int64))
    outs = [gs.Variable(f"e{i}", np.float32, [4]) for i in range(k)]
    nodes = [gs.Node("Expand", f"expand{i}", inputs=[zero, shape], outputs=[out]) for i, out in enumerate(outs)]
    return gs.Graph(nodes=nodes, outputs=outs)


def test_an_evaluation_met_again_is_remembered_and_still_charged(monkeypatch) -> None:
    """Identical computed constants (a dynamo export's conv biases) are evaluated once, but every one is still
    charged to the model's budget: with room for two, the third is refused exactly as without the memory."""
    import bnfold.onnx.constants as constants

    calls = []
    real = constants._evaluate
    monkeypatch.setattr(constants, "_evaluate", lambda *a: calls.append(a[0].name) or real(*a))

    def resolved() -> list:
        resolver = constants.ConstantResolver(set(), False, {}, 18, budget=constants.EvalBudget(elements=8))
        return [(r.ok, None if r.value is None else r.value.tolist(), r.reason) for r in map(resolver.resolve, _expands(3).outputs)]

    with_memory = resolved()
    assert calls == ["expand0"]
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(constants, "_evaluation_key", lambda node, inputs: None)
        assert resolved() == with_memory and calls == ["expand0", "expand1"]
    assert [ok for ok, _, _ in with_memory] == [True, True, False] and "budget" in with_memory[2][2].message


def test_evaluation_keys_tell_apart_what_an_evaluation_reads() -> None:
    import onnx_graphsurgeon as gs

    from bnfold.onnx.constants import KEY_INPUT_BYTES, _evaluation_key

    def key(inputs, **attrs):
        return _evaluation_key(gs.Node("Op", attrs=attrs, outputs=[gs.Variable("y")]), inputs)

    one_i32, tiny_f32 = np.array([1], np.int32), np.array([1], np.int32).view(np.float32)  # same bytes
    assert key([one_i32]) != key([tiny_f32]) and key([one_i32]) != key([one_i32.reshape(1, 1)])
    assert key([one_i32]) == key([one_i32.copy()]) and key([None, one_i32]) != key([one_i32, None])
    assert key([], a=0.0) != key([], a=-0.0) and key([], a=1) != key([], a=True) and key([], a=1) != key([], a=1.0)
    assert key([], a=[1, 2]) != key([], a=[2, 1]) and key([], a="x") == key([], a="x")
    assert key([], a=float("nan")) is None  # equals nothing, so never found again: not remembered at all
    assert key([np.zeros(KEY_INPUT_BYTES // 4 + 1, np.float32)]) is None
    assert key([], value=gs.Constant("v", np.array([0.5], np.float32))) != key([], value=gs.Constant("v", np.array([0.5], np.float16)))
