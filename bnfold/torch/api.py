"""`fold_torch`: the PyTorch pass, with its preconditions and the report.

Analysis first (torch.fx; torch.export where fx cannot trace), then the pairing rules, then the
rewrite on a deep copy (or in place when asked). With ``example_inputs`` the fold is also checked
numerically: the folded model must reproduce the original's outputs on them, else nothing is changed
and `VerificationError` is raised — a last guard against a forward that calls a BatchNorm through a
path the trace did not see.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from bnfold.affine import FoldOverflowError
from bnfold.errors import UsageError, VerificationError
from bnfold.report import Candidate, FoldReport, Reason, SkipReason, Status
from bnfold.torch import apply, graph as graphs
from bnfold.torch.kinds import ModuleInfo, recognise
from bnfold.torch.pairs import Pairing, find_pairs


def fold_torch(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm that provably folds into the Conv/ConvTranspose/Linear module feeding it.

    ``example_inputs``: a tensor or a tuple of positional arguments for ``model``. Optional while
    torch.fx can trace the forward; needed for the torch.export fallback, and to check ranks (Linear,
    BatchNorm1d, SyncBatchNorm, FrozenBatchNorm2d). Returns ``(folded, report)``; ``folded`` is a deep copy
    of ``model`` (the same class) unless ``inplace``. Report node counts are traced graph nodes that do
    work, each module call counted once: a folded BatchNorm call is one node less.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise UsageError(f"fold_torch expects a torch.nn.Module, got {type(model).__name__}")
    args = _as_args(example_inputs)
    _require_eval(model)
    work = model if inplace else copy.deepcopy(model)
    infos = recognise(work)
    site_graph = _analyse(work, infos, args)
    report = FoldReport(source=type(model).__name__, frontend="torch", analysis=site_graph.analysis)
    report.nodes_before = site_graph.compute_nodes
    report.params_before = _count_params(work)

    pairings, notes = find_pairs(site_graph, work, infos)
    report.notes.extend(notes)
    reference = _run(work, args) if args is not None and any(p.ok for p in pairings) else None
    undos: list[apply.Undo] = []
    for p in pairings:
        cand = _candidate(p)
        report.candidates.append(cand)
        if not p.ok:
            continue
        assert p.producer is not None
        try:
            values = apply.compute(p.producer, p.bn)
        except FoldOverflowError as exc:
            cand.status = Status.SKIPPED
            cand.reasons.append(SkipReason(Reason.FP16_OVERFLOW, str(exc)))
            continue
        undos.append(apply.write(work, p.producer, p.bn, values))
        report.notes.extend(values.notes)
        cand.status = Status.FOLDED
    if reference is not None and undos:
        _verify(work, args, reference, undos, report)
    report.nodes_after = report.nodes_before - sum(len(site_graph.sites_of(p.bn.name)) for p in pairings if p.ok and _folded(report, p))
    report.params_after = _count_params(work)
    report.seconds = time.perf_counter() - start
    return work, report


def _folded(report: FoldReport, p: Pairing) -> bool:
    return any(c.node == p.bn.name and c.status is Status.FOLDED for c in report.candidates)


def _candidate(p: Pairing) -> Candidate:
    return Candidate(
        node=p.bn.name,
        op_type=p.bn.class_name if "BatchNorm" in p.bn.class_name else f"BatchNorm ({p.bn.class_name})",
        status=Status.FOLDED if p.ok else Status.SKIPPED,
        nodes=[p.bn.name],
        target=p.producer.name if p.producer else None,
        target_op=p.producer.class_name if p.producer else None,
        direction="into-producer",
        reasons=list(p.reasons),
    )


def _as_args(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise UsageError(
        f"example_inputs must be a tensor or a tuple of positional arguments, got {type(example_inputs).__name__}"
    )


def _require_eval(model: nn.Module) -> None:
    """A BatchNorm in training mode normalises with batch statistics: nothing to fold, and a likely mistake."""
    training = [
        name or "<root>"
        for name, m in model.named_modules()
        if m.training and (m is model or "BatchNorm" in type(m).__name__ or isinstance(m, nn.modules.batchnorm._NormBase))
    ]
    if training:
        shown = ", ".join(training[:5]) + (f", … (+{len(training) - 5})" if len(training) > 5 else "")
        raise UsageError(
            f"the model is in training mode ({shown}); BatchNorm then uses batch statistics and cannot be folded. "
            "Call model.eval() first"
        )


def _analyse(model: nn.Module, infos: dict[int, ModuleInfo], args: tuple | None) -> graphs.SiteGraph:
    """torch.fx first; torch.export (non-strict) with the example inputs when fx cannot trace."""
    try:
        gm = graphs.trace_fx(model, infos)
    except Exception as fx_error:
        if args is None:
            raise UsageError(
                f"torch.fx cannot trace {type(model).__name__} ({type(fx_error).__name__}: {_first_line(fx_error)}); "
                "pass example_inputs=(x,) so that bnfold can analyse it with torch.export instead"
            ) from fx_error
        try:
            with torch.no_grad():
                ep = graphs.trace_export(model, args)
        except Exception as export_error:
            raise UsageError(
                f"neither torch.fx ({_first_line(fx_error)}) nor torch.export "
                f"({type(export_error).__name__}: {_first_line(export_error)}) can analyse {type(model).__name__}; "
                "check that example_inputs are valid arguments for model(*example_inputs)"
            ) from export_error
        return graphs.from_export(ep, model, infos)
    if args is not None:
        try:
            graphs.propagate_shapes(gm, args)
        except Exception as exc:
            raise UsageError(
                f"running {type(model).__name__} on example_inputs failed ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
    return graphs.from_fx(gm, model, infos)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _run(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*args)
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


_RTOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _verify(model: nn.Module, args: tuple, reference: list[torch.Tensor], undos: list[apply.Undo], report: FoldReport) -> None:
    """The folded model must reproduce the original's outputs on the example inputs (a coarse guard).

    The tolerance is loose on purpose (1e-3 of the output's magnitude in float32): it catches a fold of
    the wrong thing, which is off by the BatchNorm's whole effect, not rounding noise.
    """
    got = _run(model, args)
    worst = 0.0
    ok = len(got) == len(reference)
    for r, g in zip(reference, got):
        if r.shape != g.shape or r.dtype != g.dtype:
            ok = False
            break
        if not r.is_floating_point():
            ok = ok and bool(torch.equal(r, g))
            continue
        diff = float((r.double() - g.double()).abs().max()) if r.numel() else 0.0
        scale = float(r.double().abs().max()) if r.numel() else 0.0
        worst = max(worst, diff)
        if not diff <= _RTOL.get(r.dtype, 1e-3) * (1.0 + scale):
            ok = False
    if not ok:
        for undo in reversed(undos):
            undo.restore()
        raise VerificationError(
            f"the folded {type(model).__name__} does not reproduce the original outputs on example_inputs "
            f"(max abs diff {worst:.3g}); the model was left unchanged. The forward probably calls a module "
            "the trace did not see; please report it"
        )
    report.notes.append(f"checked on example_inputs: max abs difference {worst:.3g}")


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
