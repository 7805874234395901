"""`fold_torch`: the PyTorch pass, with its preconditions and the report.

Analysis first (torch.fx; torch.export where fx cannot trace), then the pairing rules (the plan), then
the rewrite on a deep copy (or in place when asked). With ``example_inputs`` the fold is also checked
numerically against a float64 copy of the original (`bnfold.torch.checking`): a fold error beyond the
model's own float noise raises `VerificationError` and changes nothing.
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
from bnfold.torch.checking import example_args, measure_before, verify_fold
from bnfold.torch.kinds import ModuleInfo, recognise
from bnfold.torch.pairs import Pairing, find_pairs


def fold_torch(
    model: Any,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
) -> tuple[Any, FoldReport]:
    """Fold every BatchNorm call that provably folds into a Conv/ConvTranspose/Linear next to it.

    ``model``: an ``nn.Module`` or a ``torch.export.ExportedProgram`` (folded into a new program, see
    `bnfold.torch.program`). ``example_inputs``: a tensor or a tuple of positional arguments for ``model``.
    Optional while torch.fx can trace the forward; needed for the torch.export fallback, to prove ranks
    (Linear, BatchNorm1d, reshapes, concatenations) and for the numerical check. Returns
    ``(folded, report)``; ``folded`` is a deep copy of ``model`` (the same class) unless ``inplace``.
    The report counts BatchNorm *calls* (a module called twice counts twice), so its counts equal the
    BatchNorm ops that run before (``found``) and after (``left``). Node counts are traced graph nodes
    that do work, each module call counted once: a folded BatchNorm call is one node less.
    """
    start = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        from bnfold.torch.program import fold_program

        if inplace:
            raise UsageError("an ExportedProgram is folded into a new program; inplace=True applies to nn.Module only")
        return fold_program(model, example_inputs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"fold_torch expects a torch.nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")
    args = example_args(example_inputs)
    _require_eval(model)
    work = model if inplace else copy.deepcopy(model)
    infos = recognise(work)
    site_graph = _analyse(work, infos, args)
    report = FoldReport(source=type(model).__name__, frontend="torch", analysis=site_graph.analysis)
    report.nodes_before = site_graph.compute_nodes
    report.params_before = _count_params(work)

    pairings, notes = find_pairs(site_graph, work, infos)
    report.notes.extend(notes)
    before = measure_before(work, args) if args is not None and any(p.ok for p in pairings) else None
    undos: list[apply.Undo] = []
    removed = 0
    for p in pairings:
        cand = _candidate(p)
        report.candidates.append(cand)
        if not p.ok:
            continue
        try:
            values = apply.compute(work, p)
        except FoldOverflowError as exc:
            cand.status = Status.SKIPPED
            cand.reasons.append(SkipReason(Reason.FP16_OVERFLOW, str(exc)))
            continue
        undos.append(apply.write(work, p, values))
        for v in values:
            report.notes.extend(v.notes)
        cand.status = Status.FOLDED
        removed += len(p.sites)
    if before is not None and undos:
        try:
            report.notes.append(verify_fold(work, args, before))
        except VerificationError:
            for undo in reversed(undos):
                undo.restore()
            raise
    report.nodes_after = report.nodes_before - removed
    report.params_after = _count_params(work)
    report.seconds = time.perf_counter() - start
    return work, report


def _candidate(p: Pairing) -> Candidate:
    return Candidate(
        node=p.name,
        op_type=p.op_type,
        status=Status.FOLDED if p.ok else Status.SKIPPED,
        nodes=[p.name],
        target=p.target_names,
        target_op=p.target_op,
        direction=p.direction or "into-producer",
        reasons=list(p.reasons),
        bn_count=len(p.sites),
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


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
