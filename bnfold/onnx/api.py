"""`fold_onnx` and `check_onnx`: the ONNX pass wrapped with its preconditions and postconditions.

Precondition: the model passes `onnx.checker`. Postcondition: the folded model passes the full checker
(with strict shape inference). A model in which nothing folds is returned as it came, so running
bnfold on its own output changes nothing, byte for byte. Both entry points build the same plan
(`plan.py`); `check_onnx` stops there and reports its folds as FOLDABLE, `fold_onnx` applies it: the
check and the fold can never disagree.
"""

from __future__ import annotations

import gc
import itertools
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import onnx

from bnfold.errors import BnfoldError, InputError
from bnfold.onnx import io
from bnfold.onnx.chain import ELEMENTWISE
from bnfold.onnx.constants import ConstantResolver
from bnfold.onnx.fold import GraphEdit
from bnfold.onnx.graph_import import import_model
from bnfold.onnx.plan import Plan, apply_plan, plan_model
from bnfold.onnx.storage import TensorStore
from bnfold.onnx.writeback import Imported, copy_for_write_back, write_back
from bnfold.report import FoldReport

if TYPE_CHECKING:  # verify imports onnxruntime: only where a fold is verified
    from bnfold.verify import VerifyOptions


@dataclass(frozen=True)
class FoldOptions:
    """How one run of the pass behaves (one object instead of a keyword flag per mode).

    ``assume_constant``: treat initializers that are also graph inputs (IR ≥ 4) as constants.
    ``dry_run``: stop at the plan (check): no rewrite, no export, no postcondition, no file of any kind.
    ``store``: where folded values are held and how the result is written (`storage.TensorStore`:
    spill file, pending arrays); None: a store holding them in memory, written into the returned model.
    ``source``: the name the report gives the model. ``checked``: the model was just loaded (and
    checked) by `io.load_checked`, so the precondition is not run again; ``skeleton``: the skeleton
    that check ran on, reused by shape inference. ``owned``: the model was loaded for this run only, so
    the fold is written into it (a caller's in-memory model is copied first; one given by path is owned).
    """

    assume_constant: bool = False
    dry_run: bool = False
    store: TensorStore | None = None
    source: str | None = None
    checked: bool = False
    skeleton: onnx.ModelProto | None = None
    owned: bool = False


def fold_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    assume_constant: bool = False,
    dry_run: bool = False,
    spill_dir: str | os.PathLike[str] | None = None,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNorm (and per-channel affine chain) that can be folded exactly.

    ``model``: a path or an in-memory ``ModelProto`` (never mutated). ``assume_constant``: treat
    initializers that are also graph inputs (IR ≥ 4) as constants. ``spill_dir``: write folded weights
    to a file there instead of keeping them in memory; the result then refers to that file and must be
    written with `bnfold.onnx.storage.save_model` before the folder goes (`fold_file` does all this).
    Returns the folded model and the report.
    """
    store = None if dry_run else TensorStore(spill_dir)
    return _fold_model(model, FoldOptions(assume_constant=assume_constant, dry_run=dry_run, store=store))


def fold_file(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    assume_constant: bool = False,
    external_data: bool | None = None,
    before_commit: Callable[[str, FoldReport], None] | None = None,
    force: bool = False,
    verify: "bool | VerifyOptions" = False,
) -> FoldReport:
    """Fold a model file into another file, in bounded memory, atomically. What `bnfold fold` runs.

    Weights kept in external data are read one at a time and folded ones spill beside the target;
    folded weights of an inline model are written from numpy straight into the file, never copied into
    a second protobuf. ``external_data``: None keeps the input's layout (external when over 2 GB).
    ``before_commit(tmp_path, report)`` runs on the written file before it is renamed into place (and
    before ``verify``); if it raises, nothing is written. A symlink as target is followed only in
    place (source and target the same file), else refused. The input's own data file, or a data file
    bnfold did not write, is overwritten only with ``force`` (`io.data_file_name`). Temporary files are
    removed on SIGTERM/SIGHUP/SIGINT. ``verify`` (True, or a `bnfold.verify.VerifyOptions`): the written file
    is verified against ``source`` first (`bnfold.verify`), the result lands in ``report.verification``,
    and a fold that fails raises `bnfold.verify.NotEquivalent` (carrying both) with nothing written.
    """
    from contextlib import nullcontext

    from bnfold import files

    original, had_external, skeleton, data_files = io.load_checked(source, load_data=False)
    external = (had_external or None) if external_data is None else external_data
    in_place = os.path.exists(target) and os.path.samefile(source, target)
    protect = set() if in_place else data_files
    target_path = io.check_writable(target, external_data=external, protect=protect, force=force, follow_symlink=in_place)
    with files.removing_temps_on_signals():
        spill_ctx = (tempfile.TemporaryDirectory(prefix=files.TEMP_PREFIX + "spill-", dir=target_path.parent)
                     if had_external else nullcontext(None))
        with spill_ctx as spill:
            store = TensorStore(spill, pending=True)
            options = FoldOptions(assume_constant=assume_constant, store=store, source=str(source), checked=True,
                                  skeleton=skeleton, owned=True)
            folded, report = _fold_model(original, options)
            from bnfold.verify import before_writing

            hooks = [h for h in (before_commit, before_writing(source, target_path, verify)) if h is not None]
            hook = (lambda written: [h(written, report) for h in hooks]) if hooks else None
            store.save(folded, target_path, external_data=external, keep_data=False, before_commit=hook,
                       protect=protect, force=force)
    return report


def _fold_model(
    model: onnx.ModelProto | str | os.PathLike[str], options: FoldOptions = FoldOptions()
) -> tuple[onnx.ModelProto, FoldReport]:
    """Plan the folds; unless this is a dry run, apply them and check the result (the postcondition).

    A dry run returns the input model unchanged with every planned fold reported FOLDABLE; its
    nodes_after and params_after are counted on the plan's rehearsal of the folds.
    """
    start = time.perf_counter()
    label, proto = _load(model, check=not options.checked)
    source = options.source or label
    report = FoldReport(source=source, dry_run=options.dry_run)
    report.nodes_before, report.params_before = _counts(proto)  # first: the fold may rewrite `proto` in place
    owned = options.owned or not isinstance(model, onnx.ModelProto)
    with collector_paused():
        folded, plan, original = _fold(proto, options, owned)
    report.candidates = plan.candidates
    report.notes = list(plan.notes)
    rewritten = bool(plan.folds) and not options.dry_run
    if rewritten:
        _postcondition(original, folded, source, report)
    if plan.folds and options.dry_run:
        report.nodes_after, report.params_after = plan.nodes_after, report.params_before + plan.params_change
    elif not rewritten:  # the same model, no second walk
        report.nodes_after, report.params_after = report.nodes_before, report.params_before
    else:
        report.nodes_after, report.params_after = _counts(folded)
    if proto.ir_version < 4 and plan.folds:
        report.notes.append(
            f"IR version {proto.ir_version}: initializers listed as graph inputs were treated as constants "
            "(that version of the spec requires the listing); folded BatchNorm parameters were dropped from the inputs"
        )
    report.seconds = time.perf_counter() - start
    return folded, report


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the graph is imported, planned and rewritten.

    onnx-graphsurgeon's objects point at each other (a tensor lists its producers and consumers, a
    list its owner): a 230-node graph is some 5000 objects in cycles, all alive until the pass ends,
    so the collections their allocation triggers find nothing to free, yet each full one walks every
    object of the process. What the pass leaves behind is collected by the first collection after it.
    Measured with a previous model's graph still uncollected (a gate over a folder, in one process):
    a check of a ShuffleNetV2/MobileNetV2-size model 24.7/26.2 → 21.1/21.8 ms (medians of 40); on a
    freshly collected heap no difference.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _postcondition(original: onnx.ModelProto, folded: onnx.ModelProto, source: str, report: FoldReport) -> None:
    """The folded model passes the full checker (strict shape inference), checked on its skeleton.

    Where the input itself fails the full check (a wrong declared output shape, say), the fold cannot be
    blamed: the output then gets the same basic check the input passed, and the report says so.
    ``original``: the input, or its skeleton where the fold was written into the input itself.
    """
    try:
        io.check_model(folded, what=f"{source} (folded)", full=True)
        return
    except InputError:
        try:
            io.check_model(original, what=source, full=True)
        except InputError as original_error:
            report.notes.append(f"the input model itself fails the full ONNX check ({original_error}); the output was given the basic check")
            io.check_model(folded, what=f"{source} (folded)")
            return
        raise BnfoldError(f"{source}: bnfold produced a model that fails the ONNX checker; please report this with the model") from None


def check_onnx(
    model: onnx.ModelProto | str | os.PathLike[str], *, assume_constant: bool = False
) -> FoldReport:
    """Which BatchNorms could be folded, and why the others cannot: the fold's own plan, never applied.

    Writes nothing, not even a temporary file. A model file with external data is not read into
    memory: its weights are read one at a time, as the plan needs them. The folded values the plan
    computes stay in memory until it returns (with no spill file, that is the price of writing nothing).
    """
    if isinstance(model, (str, os.PathLike)):
        proto, _, skeleton, _ = io.load_checked(model, load_data=False)
        options = FoldOptions(assume_constant=assume_constant, dry_run=True, source=str(model), checked=True, skeleton=skeleton)
        return _fold_model(proto, options)[1]
    return _fold_model(model, FoldOptions(assume_constant=assume_constant, dry_run=True))[1]


def _load(model: onnx.ModelProto | str | os.PathLike[str], check: bool = True) -> tuple[str, onnx.ModelProto]:
    if isinstance(model, onnx.ModelProto):
        if check:
            io.check_model(model, what="model")
        return "<memory>", model
    if isinstance(model, (str, os.PathLike)):
        return str(model), io.load_model(model)
    raise InputError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")


def _fold(proto: onnx.ModelProto, options: FoldOptions, owned: bool) -> tuple[onnx.ModelProto, Plan, onnx.ModelProto]:
    """Import into onnx-graphsurgeon and plan; unless a dry run, apply the plan and write it back into
    the model (`writeback.py`): into ``proto`` itself when the pass ``owned`` it, else into a copy.

    Returns the folded model (``proto`` itself, unchanged, when nothing is rewritten), the plan, and
    what the postcondition may check the input on (``proto``, or its skeleton once it is rewritten).
    """
    if not _has_affine_ops(proto):  # nothing a rule could start from: no graph to import, no plan to make
        return proto, Plan(), proto
    overridable = _overridable_initializers(proto)
    treat_as_constant = options.assume_constant or proto.ir_version < 4
    shapes = infer_shapes(proto, options.skeleton)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)
    graph = import_model(proto)
    imported = None if options.dry_run else Imported(graph, proto)  # before the plan folds in place
    resolver = ConstantResolver(overridable, treat_as_constant, shapes, opset)
    names = {t for t in graph.tensors()} | {n.name for n in graph.nodes}
    store = None if options.dry_run else options.store or TensorStore()
    try:
        # in place: the graph was imported for this run only (see plan.py, "In place")
        plan = plan_model(graph, resolver, shapes, names, store, in_place=True, dry_run=options.dry_run)
        if options.dry_run or not plan.folds:
            return proto, plan, proto
        edit = GraphEdit(graph, names, store=store)
        apply_plan(plan, edit)
    finally:
        if store is not None:
            store.close()
    assert imported is not None and store is not None
    if not owned:
        out, original = copy_for_write_back(proto), proto  # the caller's model is never mutated
    else:  # rewritten in place: what the postcondition may need of the input is its skeleton, taken first
        out, original = proto, options.skeleton if options.skeleton is not None else io.skeleton(proto)
    write_back(imported, proto, out, store, edit.modified, overridable)
    return out, plan, original


AFFINE_OPS = frozenset({"BatchNormalization", *ELEMENTWISE})
"""The ops a chain can start from (`PlanContext.affine_step`): a model without any has nothing to fold."""


def _has_affine_ops(proto: onnx.ModelProto) -> bool:
    """Whether any graph (subgraphs included) or local function holds a node a chain could start from.

    The usual CI case is a model folded before: then `check` costs its load and this walk, not a graph
    import and a plan (on a MobileNetV2-size model those are most of its time). A custom domain's op
    of the same name counts too: the plan decides about it, this only tells that there is nothing to ask.
    """
    bodies = itertools.chain(_all_graphs(proto.graph), *(_all_graphs(f) for f in proto.functions))
    return any(n.op_type in AFFINE_OPS for body in bodies for n in body.node)  # the main graph's nodes first


def _overridable_initializers(proto: onnx.ModelProto) -> set[str]:
    inputs = {i.name for i in proto.graph.input}
    return {t.name for t in proto.graph.initializer if t.name in inputs}


ShapeInfo = tuple[list[int | None] | None, int]
"""A tensor's static dims (None for an unknown dim, or None for unknown rank) and its ONNX element type."""


class InferredShapes(Mapping[str, ShapeInfo]):
    """Static shapes and element types of every tensor onnx can infer, subgraphs included — inferred
    on first need.

    Shape inference walks the whole graph (on a 10 MB model, a fifth of reading the file), yet a plain
    Conv → BatchNorm fold needs no inferred shape: the weights' dims say everything. So a lookup of a
    main-graph initializer is answered from the initializer itself, and inference runs the first time
    anything else is asked for, once, for the whole model (what the rules ask about is a matter of
    their matching, so a check and a fold of the same model ask the same questions).

    Inference runs on a skeleton of the model (large initializers replaced by typed graph inputs), so it
    works for models over 2 GB and costs no copy of the weights. ``skeleton``: `io.skeleton(proto)` if
    the caller has it already (the precondition check built one); shape inference does not change it.
    """

    def __init__(self, proto: onnx.ModelProto, skeleton: onnx.ModelProto | None = None) -> None:
        self._proto = proto
        self._skeleton = skeleton
        self._initializers: dict[str, onnx.TensorProto] | None = None
        self._inferred: dict[str, ShapeInfo] | None = None

    def __getitem__(self, name: str) -> ShapeInfo:
        if self._inferred is None:
            if self._initializers is None:
                self._initializers = {t.name: t for t in self._proto.graph.initializer}
            t = self._initializers.get(name)
            if t is not None:
                return list(t.dims), t.data_type
            self._inferred = _infer_all(self._proto, self._skeleton)
        return self._inferred[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def _all(self) -> dict[str, ShapeInfo]:
        if self._inferred is None:
            self._inferred = _infer_all(self._proto, self._skeleton)
        return self._inferred

    @property
    def inferred(self) -> bool:
        """Whether inference has run (tests: a Conv → BatchNorm plan must not need it)."""
        return self._inferred is not None


def infer_shapes(proto: onnx.ModelProto, skeleton: onnx.ModelProto | None = None) -> InferredShapes:
    """`InferredShapes` of `proto`: static shapes and element types, inferred when first needed."""
    return InferredShapes(proto, skeleton)


def _infer_all(proto: onnx.ModelProto, skeleton: onnx.ModelProto | None) -> dict[str, ShapeInfo]:
    skeleton = io.skeleton(proto) if skeleton is None else skeleton
    # Data propagation materialises 1-D tensors as lists of dims: a Slice of ConstantOfShape([10^12]) made
    # it allocate until the machine ran out of memory. It runs only when a first pass without it shows
    # every 1-D tensor it would materialise to be short (`io.data_prop_is_bounded`).
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=False)
        if io.data_prop_is_bounded(inferred):
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:
        inferred = skeleton
    shapes: dict[str, ShapeInfo] = {}
    for graph in _all_graphs(inferred.graph):
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            dims: list[int | None] | None
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            else:
                dims = None
            shapes[vi.name] = (dims, tt.elem_type)
        for t in graph.initializer:
            shapes[t.name] = (list(t.dims), t.data_type)
    for t in proto.graph.initializer:
        shapes[t.name] = (list(t.dims), t.data_type)
    return shapes


def _num_elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def count_nodes(graph: onnx.GraphProto) -> int:
    return sum(1 for g in _all_graphs(graph) for _ in g.node)


def count_params(proto: onnx.ModelProto) -> int:
    """Elements held in initializers and Constant nodes (all graphs and local functions)."""
    total = 0
    nodes = [n for f in proto.functions for n in f.node]
    for g in _all_graphs(proto.graph):
        total += sum(_num_elements(t) for t in g.initializer)
        nodes.extend(g.node)
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += _num_elements(a.t)
    return total


def _counts(proto: onnx.ModelProto) -> tuple[int, int]:
    """``(count_nodes + local function nodes, count_params)`` of a model, in one walk instead of three.

    Reading a protobuf node's attributes (to find subgraphs) builds a Python object per attribute, which
    on a MobileNetV2-size model makes each walk cost a few percent of reading the file.
    """
    nodes, params = 0, 0
    constants = [n for f in proto.functions for n in f.node if n.op_type == "Constant"]
    nodes += sum(len(f.node) for f in proto.functions)
    stack = [proto.graph]
    while stack:
        g = stack.pop()
        nodes += len(g.node)
        params += sum(_num_elements(t) for t in g.initializer)
        for node in g.node:
            if node.op_type == "Constant":
                constants.append(node)
            for attr in node.attribute:  # as `_all_graphs`
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
    for n in constants:  # as `count_params`
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                params += _num_elements(a.t)
    return nodes, params


def default_output_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".folded" + p.suffix)
