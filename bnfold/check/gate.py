"""The gate's policy: the one place where a verdict and an exit code are decided.

`judge` turns the fold's dry-run report into findings (``fail`` / ``allowed`` / ``info``) under
``strict`` and ``allow``; `model_exit_code` and `run_exit_code` turn findings and errors into the exit
codes `bnfold check`, `bnfold.testing.assert_fully_folded` and the JSON output report. Nothing else
in bnfold computes a check verdict (the fold report carries none), so they cannot disagree.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from typing import Any, Callable, Iterable, Sequence

from bnfold.check.paths import PathError, expand_paths
from bnfold.check.pool import run_pool
from bnfold.check.result import ALLOWED, FAIL, FOLDABLE_CODE, INFO, CheckResult, Finding, ModelCheck, candidate_names
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, BnfoldError
from bnfold.report import HINTS, Candidate, FoldReport, Status

FOLDABLE_HINT = "run `bnfold fold {path}` to fold it (outputs are verified before anything is written)"
FOLDABLE_HINT_MEMORY = "fold it with bnfold.fold_onnx(model) (or `bnfold fold` on its file)"
ALLOWED_HINT = "accepted by --allow"
MEMORY = "<memory>"


# The rules whose name only repeats the target op; the others change more than one layer's weights.
PER_OP_RULES = frozenset({"conv", "conv-transpose", "gemm", "matmul"})


def model_exit_code(model: ModelCheck) -> int:
    """2 when the model could not be read, 1 when a finding fails, else 0."""
    if model.error is not None:
        return EXIT_USAGE
    return EXIT_CHECK_FAILED if any(f.verdict == FAIL for f in model.findings) else EXIT_OK


def run_exit_code(models: Sequence[ModelCheck]) -> int:
    """The worst model's code; nothing checked at all is an input error, never a pass."""
    codes = {m.exit_code for m in models}
    if not models or EXIT_USAGE in codes:
        return EXIT_USAGE
    return EXIT_CHECK_FAILED if EXIT_CHECK_FAILED in codes else EXIT_OK


def unreadable(path: str, error: str, *, is_model: bool = True) -> ModelCheck:
    """A model that could not be read (or, ``is_model`` False, an argument that names none), judged."""
    result = ModelCheck(path, error=error, is_model=is_model)
    result.exit_code = model_exit_code(result)
    return result


def judge(report: FoldReport, *, path: str, strict: bool = False, allow: Sequence[str] = ()) -> ModelCheck:
    """Apply the gate's policy to a dry-run report: which BatchNorms fail, which are allowed, which are info."""
    result = ModelCheck(path, batchnorms_found=report.found, report=report)
    for c in report.candidates:
        n = FoldReport._bn_count(c)
        if not n:  # a Mul/Add chain without a BatchNorm: not the gate's business
            continue
        if c.status not in (Status.FOLDABLE, Status.SKIPPED):
            continue  # FOLDED: not a dry run; nothing is left of it
        result.findings.append(_finding(c, n, path, strict, allow))
    result.exit_code = model_exit_code(result)
    return result


def _finding(c: Candidate, n: int, path: str, strict: bool, allow: Sequence[str]) -> Finding:
    foldable = c.status is Status.FOLDABLE
    allowed = bool(allow) and any(
        fnmatch.fnmatchcase(name, pattern) for pattern in allow for name in candidate_names(c.node, c.nodes, c.graph)
    )
    fails = foldable or strict
    verdict = ALLOWED if fails and allowed else FAIL if fails else INFO
    if foldable:
        side = "producer" if c.direction == "into-producer" else "consumer"
        code = FOLDABLE_CODE
        message = f"can be folded into its {side} {c.target_op} '{c.target}'"
        if c.rule and c.rule not in PER_OP_RULES:  # through a Reshape, a Concat, merged branches: say which
            message += f" (rule {c.rule}, docs/rules.md)"
        hint = FOLDABLE_HINT.format(path=path) if path != MEMORY else FOLDABLE_HINT_MEMORY
    else:
        first = c.reasons[0] if c.reasons else None
        code = first.code.value if first else "unsupported"
        message = "; ".join(r.message for r in c.reasons) or "no reason recorded"
        hint = HINTS.get(first.code, "") if first else ""
    if verdict == ALLOWED:
        hint = f"{ALLOWED_HINT} ({hint})" if hint else ALLOWED_HINT
    return Finding(
        node=c.node, op_type=c.op_type, graph=c.graph, nodes=list(c.nodes), batchnorms=n, foldable=foldable,
        verdict=verdict, code=code, message=message, hint=hint, target=c.target, target_op=c.target_op,
        direction=c.direction, reasons=[r.to_dict() for r in c.reasons],
    )


def check_model(
    model: Any,
    *,
    strict: bool = False,
    allow: Sequence[str] = (),
    assume_constant: bool = False,
    path: str | None = None,
) -> ModelCheck:
    """Check one model (a path or an ``onnx.ModelProto``). Unreadable input → a `ModelCheck` with `error`."""
    from bnfold.onnx.api import check_onnx

    name = path if path is not None else (os.fspath(model) if isinstance(model, (str, os.PathLike)) else MEMORY)
    try:
        report = check_onnx(model, assume_constant=assume_constant)
    except BnfoldError as exc:
        return unreadable(name, str(exc))
    except Exception as exc:  # an engine bug must not stop the other models from being checked
        return unreadable(name, f"{name}: internal error, please report it: {type(exc).__name__}: {exc}")
    report.source = name
    return judge(report, path=name, strict=strict, allow=allow)


def _import_engine() -> None:
    """What every check needs, imported once per process (before the pool forks, where it forks)."""
    import bnfold.onnx.api  # noqa: F401


def check_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    strict: bool = False,
    allow: Sequence[str] = (),
    assume_constant: bool = False,
    jobs: int = 1,
    on_progress: Callable[[str], None] | None = None,
    entries: Sequence[str | PathError] | None = None,
) -> CheckResult:
    """Check every model the paths name (see `bnfold.check.paths.expand_paths`). Writes nothing.

    ``jobs``: worker processes (0: one per CPU; see `bnfold.check.pool` for when they pay off).
    ``on_progress`` is called with each model's path as it completes. ``entries``: what `expand_paths`
    returned (skip the expansion).
    """
    if entries is None:
        entries = expand_paths(paths)
    files = [e for e in entries if isinstance(e, str)]
    one = functools.partial(check_model, strict=strict, allow=tuple(allow), assume_constant=assume_constant)
    checked = iter(list(run_pool(one, files, jobs=jobs, on_error=unreadable, on_progress=on_progress,
                            warm_up=_import_engine)))
    models = [next(checked) if isinstance(e, str) else unreadable(e.path, e.error, is_model=False) for e in entries]
    return CheckResult(models=models, strict=strict, allow=list(allow), exit_code=run_exit_code(models))
