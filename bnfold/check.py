"""`bnfold check`: the CI gate. Is any foldable BatchNorm left in these models?

The check is a dry run of the fold itself (`bnfold.onnx.api.check_onnx`): a BatchNorm is called
*foldable* exactly when `bnfold fold` would fold it, so the gate and the fold can never disagree.
This module adds what a gate needs around that dry run, and nothing that changes its verdict:

- `expand_paths`: files, directories (searched recursively for ``*.onnx``) and globs → model files;
- `check_paths`: check many models (optionally in parallel processes), never writing a file;
- the gate's policy: ``strict`` (also fail on BatchNorms that cannot be folded) and ``allow``
  (glob patterns on node names, for BatchNorms accepted knowingly);
- `CheckResult.exit_code`: 0 when no model fails, 1 when one does, 2 when an input cannot be read
  (every other model is still checked and reported);
- three renderers: `render_text`, `render_json` (schema: `CHECK_JSON_SCHEMA`), `render_github`
  (GitHub Actions ``::error`` annotations).

No click here; the command in ``bnfold.cli.check_cmd`` only parses, calls `check_paths`, prints
and exits.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, BnfoldError
from bnfold.report import HINTS, Candidate, FoldReport, Status

__all__ = [
    "CHECK_JSON_SCHEMA",
    "CheckResult",
    "Finding",
    "ModelCheck",
    "check_model",
    "check_paths",
    "expand_paths",
    "render",
    "render_github",
    "render_json",
    "render_text",
]

SCHEMA_VERSION = 1
GLOB_CHARS = frozenset("*?[")

FOLDABLE_CODE = "foldable"
"""The code of a finding that `bnfold fold` would fold (the fold's skip reasons are the other codes)."""
FOLDABLE_HINT = "run `bnfold fold {path}` to fold it (outputs are verified before anything is written)"
FOLDABLE_HINT_MEMORY = "fold it with bnfold.fold_onnx(model) (or `bnfold fold` on its file)"
ALLOWED_HINT = "accepted by --allow"

# Verdicts of a finding.
FAIL = "fail"  # makes the model fail the gate
ALLOWED = "allowed"  # would fail, but its node matches an --allow pattern
INFO = "info"  # left, and not a failure (an unfoldable BatchNorm without --strict)


# ------------------------------------------------------------------------------------------------
# Result objects
# ------------------------------------------------------------------------------------------------
@dataclass
class Finding:
    """One BatchNorm (or chain holding BatchNorms) still in a model, and what the gate makes of it."""

    node: str
    op_type: str
    graph: str
    nodes: list[str]
    batchnorms: int
    foldable: bool
    verdict: str  # FAIL | ALLOWED | INFO
    code: str  # "foldable", or the first skip reason's code ("other-consumer", ...)
    message: str
    hint: str
    target: str | None = None
    target_op: str | None = None
    direction: str | None = None
    reasons: list[dict[str, str]] = field(default_factory=list)

    @property
    def qualified_name(self) -> str:
        return f"{self.graph}/{self.node}" if self.graph else self.node

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "graph": self.graph,
            "nodes": list(self.nodes),
            "batchnorms": self.batchnorms,
            "status": "foldable" if self.foldable else "unfoldable",
            "verdict": self.verdict,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "target": self.target,
            "target_op": self.target_op,
            "direction": self.direction,
            "reasons": [dict(r) for r in self.reasons],
        }


@dataclass
class ModelCheck:
    """The gate's verdict on one model: its findings, or the one-line error that kept it from being read."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    batchnorms_found: int = 0
    report: FoldReport | None = None

    @property
    def failing(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == FAIL]

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        return "failed" if self.failing else "ok"

    @property
    def exit_code(self) -> int:
        return {"error": EXIT_USAGE, "failed": EXIT_CHECK_FAILED}.get(self.status, EXIT_OK)

    def counts(self) -> dict[str, int]:
        def bns(pred: Callable[[Finding], bool]) -> int:
            return sum(f.batchnorms for f in self.findings if pred(f))

        return {
            "found": self.batchnorms_found,
            "foldable": bns(lambda f: f.foldable),
            "unfoldable": bns(lambda f: not f.foldable),
            "failing": bns(lambda f: f.verdict == FAIL),
            "allowed": bns(lambda f: f.verdict == ALLOWED),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "batchnorms": self.counts(),
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class CheckResult:
    """Every model checked, in the order given; `exit_code` is what `bnfold check` exits with."""

    models: list[ModelCheck] = field(default_factory=list)
    strict: bool = False
    allow: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        codes = {m.exit_code for m in self.models}
        if not self.models or EXIT_USAGE in codes:
            return EXIT_USAGE
        return EXIT_CHECK_FAILED if EXIT_CHECK_FAILED in codes else EXIT_OK

    @property
    def unmatched_allow(self) -> list[str]:
        """--allow patterns that name no BatchNorm in any model checked (stale entries)."""
        names = {n for m in self.models for f in m.findings for n in _names(f.node, f.nodes, f.graph)}
        return [p for p in self.allow if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    @property
    def failed(self) -> list[ModelCheck]:
        return [m for m in self.models if m.status == "failed"]

    @property
    def errors(self) -> list[ModelCheck]:
        return [m for m in self.models if m.status == "error"]

    def summary(self) -> dict[str, int]:
        counted = [m.counts() for m in self.models]
        return {
            "models": len(self.models),
            "ok": sum(m.status == "ok" for m in self.models),
            "failed": len(self.failed),
            "errors": len(self.errors),
            "batchnorms_found": sum(c["found"] for c in counted),
            "batchnorms_foldable": sum(c["foldable"] for c in counted),
            "batchnorms_unfoldable": sum(c["unfoldable"] for c in counted),
            "batchnorms_failing": sum(c["failing"] for c in counted),
            "batchnorms_allowed": sum(c["allowed"] for c in counted),
        }

    def summary_line(self) -> str:
        s = self.summary()
        verdict = {EXIT_OK: "passed", EXIT_CHECK_FAILED: "FAILED", EXIT_USAGE: "ERROR"}[self.exit_code]
        parts = [f"{s['models']} model{'s' if s['models'] != 1 else ''} checked"]
        if s["failed"]:
            what = "BatchNorm" if s["batchnorms_failing"] == 1 else "BatchNorms"
            because = "left" if self.strict else "foldable"
            parts.append(f"{s['failed']} failed ({s['batchnorms_failing']} {what} {because})")
        if s["errors"]:
            parts.append(f"{s['errors']} unreadable")
        parts.append(f"{s['ok']} ok")
        if s["batchnorms_allowed"]:
            parts.append(f"{s['batchnorms_allowed']} allowed")
        if s["batchnorms_unfoldable"] and not self.strict:
            n = s["batchnorms_unfoldable"]
            parts.append(f"{n} unfoldable BatchNorm{'s' if n != 1 else ''} left (not failing without --strict)")
        return f"bnfold check {verdict}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "exit_code": self.exit_code,
            "strict": self.strict,
            "allow": list(self.allow),
            "allow_unmatched": self.unmatched_allow,
            "summary": self.summary(),
            "models": [m.to_dict() for m in self.models],
        }


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------
def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str | ModelCheck]:
    """Turn the command's arguments into model files, in order, each once.

    A file is taken as it is (whatever its suffix); a directory is searched recursively for
    ``*.onnx``; an argument that does not exist but holds ``*``, ``?`` or ``[`` is a glob (``**``
    recurses). An argument that names nothing, or a directory or glob that holds no model, comes back
    in its place as a `ModelCheck` with an error (exit code 2), so a mistyped path never passes the
    gate silently. Returns model paths (str) and those error entries, in the order given.
    """
    entries: list[str | ModelCheck] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        key = os.path.normcase(os.path.realpath(p))
        if key not in seen:
            seen.add(key)
            entries.append(p)

    for arg in paths:
        raw = os.fspath(arg)
        if os.path.isdir(raw):
            found = sorted(str(p) for p in Path(raw).rglob("*.onnx") if p.is_file())
            if not found:
                entries.append(ModelCheck(raw, error=f"{raw}: no *.onnx file in this directory"))
            for f in found:
                add(f)
        elif os.path.exists(raw):
            add(raw)
        elif GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            found = []
            for m in matches:
                if os.path.isdir(m):
                    found.extend(sorted(str(p) for p in Path(m).rglob("*.onnx") if p.is_file()))
                else:
                    found.append(m)
            if not found:
                entries.append(ModelCheck(raw, error=f"{raw}: the pattern matches no model"))
            for f in found:
                add(f)
        else:
            entries.append(ModelCheck(raw, error=f"{raw}: no such file or directory"))
    return entries


# ------------------------------------------------------------------------------------------------
# Checking
# ------------------------------------------------------------------------------------------------
def _names(node: str, nodes: Sequence[str], graph: str) -> set[str]:
    """What an --allow pattern is matched against: the node, its chain, and both qualified by subgraph."""
    names = {node, *nodes}
    if graph:
        names |= {f"{graph}/{n}" for n in list(names)}
    return names


def _matches(candidate: Candidate, allow: Sequence[str]) -> bool:
    names = _names(candidate.node, candidate.nodes, candidate.graph)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allow for name in names)


def _bn_count(c: Candidate) -> int:
    return FoldReport._bn_count(c)


def judge(report: FoldReport, *, path: str, strict: bool = False, allow: Sequence[str] = ()) -> ModelCheck:
    """Apply the gate's policy to a dry-run report: which BatchNorms fail, which are allowed.

    Marks allowed candidates (``Candidate.allowed``) on the report itself, so that
    ``report.return_code`` agrees with the gate when ``strict`` is off.
    """
    result = ModelCheck(path, batchnorms_found=report.found, report=report)
    for c in report.candidates:
        n = _bn_count(c)
        if not n:  # a Mul/Add chain without a BatchNorm: not the gate's business
            continue
        if c.status not in (Status.FOLDABLE, Status.SKIPPED):
            continue  # FOLDED: not a dry run; nothing is left of it
        foldable = c.status is Status.FOLDABLE
        c.allowed = bool(allow) and _matches(c, allow)
        fails = foldable or strict
        verdict = ALLOWED if fails and c.allowed else FAIL if fails else INFO
        if foldable:
            side = "producer" if c.direction == "into-producer" else "consumer"
            code = FOLDABLE_CODE
            message = f"can be folded into its {side} {c.target_op} '{c.target}'"
            hint = FOLDABLE_HINT.format(path=path) if path != "<memory>" else FOLDABLE_HINT_MEMORY
        else:
            first = c.reasons[0] if c.reasons else None
            code = first.code.value if first else "unsupported"
            message = "; ".join(r.message for r in c.reasons) or "no reason recorded"
            hint = HINTS.get(first.code, "") if first else ""
        if verdict == ALLOWED:
            hint = f"{ALLOWED_HINT} ({hint})" if hint else ALLOWED_HINT
        result.findings.append(
            Finding(
                node=c.node,
                op_type=c.op_type,
                graph=c.graph,
                nodes=list(c.nodes),
                batchnorms=n,
                foldable=foldable,
                verdict=verdict,
                code=code,
                message=message,
                hint=hint,
                target=c.target,
                target_op=c.target_op,
                direction=c.direction,
                reasons=[r.to_dict() for r in c.reasons],
            )
        )
    return result


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

    name = path if path is not None else (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<memory>")
    try:
        report = check_onnx(model, assume_constant=assume_constant)
    except BnfoldError as exc:
        return ModelCheck(name, error=str(exc))
    except Exception as exc:  # an engine bug must not stop the other models from being checked
        return ModelCheck(name, error=f"{name}: internal error, please report it: {type(exc).__name__}: {exc}")
    report.source = name
    return judge(report, path=name, strict=strict, allow=allow)


def _check_worker(path: str, strict: bool, allow: tuple[str, ...], assume_constant: bool) -> ModelCheck:
    """Top-level (picklable) for the process pool; keeps no proto, only the report."""
    return check_model(path, strict=strict, allow=allow, assume_constant=assume_constant)


def check_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    strict: bool = False,
    allow: Sequence[str] = (),
    assume_constant: bool = False,
    jobs: int = 1,
    on_progress: Callable[[str], None] | None = None,
    entries: Sequence[str | ModelCheck] | None = None,
) -> CheckResult:
    """Check every model the paths name; see `expand_paths`. Writes nothing.

    ``jobs``: models checked in parallel processes (0: one per CPU). ``on_progress`` is called with
    each model's path as it completes. ``entries``: what `expand_paths` returned (skip the expansion).
    """
    if entries is None:
        entries = expand_paths(paths)
    files = [e for e in entries if isinstance(e, str)]
    allow_t = tuple(allow)
    results: dict[int, ModelCheck] = {}
    workers = (os.cpu_count() or 1) if jobs <= 0 else jobs
    workers = min(workers, len(files))
    if workers <= 1:
        for i, f in enumerate(files):
            results[i] = _check_worker(f, strict, allow_t, assume_constant)
            if on_progress:
                on_progress(f)
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_check_worker, f, strict, allow_t, assume_constant): i for i, f in enumerate(files)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:  # a worker died (out of memory, killed)
                    results[i] = ModelCheck(files[i], error=f"{files[i]}: check failed in a worker process: {exc}")
                if on_progress:
                    on_progress(files[i])
    done = iter(results[i] for i in range(len(files)))
    models = [next(done) if isinstance(e, str) else e for e in entries]
    return CheckResult(models=models, strict=strict, allow=list(allow))


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
_MARK = {FAIL: "FAIL", ALLOWED: "allowed", INFO: "left"}


def render_text(result: CheckResult, *, verbose: bool = False) -> str:
    """Per model with something left: each BatchNorm, its node, code and a hint; then the summary line.

    Models with no BatchNorm left are named only with ``verbose``; unreadable models always are.
    """
    lines: list[str] = []
    for m in result.models:
        if m.error is not None:
            same = m.error.startswith(f"{m.path}: ")
            lines.append(f"ERROR {m.error}" if same else f"ERROR {m.path}: {m.error}")
            continue
        if not m.findings:
            if verbose:
                lines.append(f"{m.path}: ok, no BatchNorm left")
            continue
        c = m.counts()
        head = f"{m.path}: {'FAILED' if m.status == 'failed' else 'ok'}, {c['foldable']} foldable"
        head += f", {c['unfoldable']} unfoldable"
        if c["allowed"]:
            head += f", {c['allowed']} allowed"
        lines.append(head)
        for f in m.findings:
            chain = " → ".join(f.nodes) if len(f.nodes) > 1 else ""
            where = f"{f.graph}/" if f.graph else ""
            lines.append(f"  {_MARK[f.verdict]:<7} {where}{f.node} ({f.op_type}) [{f.code}] {f.message}")
            if chain:
                lines.append(f"          chain: {chain}")
            if f.hint:
                lines.append(f"          hint: {f.hint}")
    lines.extend(f"note: --allow {p!r} matched no BatchNorm" for p in result.unmatched_allow)
    lines.append(result.summary_line())
    return "\n".join(lines)


def render_json(result: CheckResult, *, indent: int | None = 2) -> str:
    """The whole result as one JSON document; it validates against `CHECK_JSON_SCHEMA`."""
    return json.dumps(result.to_dict(), indent=indent, ensure_ascii=False)


def _gh_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(s: str) -> str:
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def render_github(result: CheckResult) -> str:
    """GitHub Actions workflow commands: one ``::error`` per failing BatchNorm or unreadable model,
    ``::notice`` for allowed ones, then the summary line as plain log text."""
    lines: list[str] = []
    for m in result.models:
        file = _gh_prop(m.path)
        if m.error is not None:
            lines.append(f"::error file={file},title={_gh_prop('bnfold: unreadable model')}::{_gh_data(m.error)}")
            continue
        for f in m.findings:
            if f.verdict == INFO:
                continue
            kind = "error" if f.verdict == FAIL else "notice"
            what = "foldable BatchNorm" if f.foldable else "BatchNorm left (--strict)"
            if f.verdict == ALLOWED:
                what += " (allowed)"
            text = f"{f.qualified_name} ({f.op_type}) [{f.code}] {f.message}. Hint: {f.hint}"
            lines.append(f"::{kind} file={file},title={_gh_prop('bnfold: ' + what)}::{_gh_data(text)}")
    lines.extend(f"::warning title=bnfold::{_gh_data(f'--allow {p!r} matched no BatchNorm')}" for p in result.unmatched_allow)
    lines.append(result.summary_line())
    return "\n".join(lines)


def render(result: CheckResult, fmt: str = "text", *, verbose: bool = False) -> str:
    if fmt == "json":
        return render_json(result)
    if fmt == "github":
        return render_github(result)
    return render_text(result, verbose=verbose)


# ------------------------------------------------------------------------------------------------
# The JSON schema
# ------------------------------------------------------------------------------------------------
_REASON = {
    "type": "object",
    "required": ["code", "message", "hint"],
    "additionalProperties": False,
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "hint": {"type": "string"}},
}
_COUNT = {"type": "integer", "minimum": 0}
_NULLABLE_STR = {"type": ["string", "null"]}

CHECK_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://bnfold.invalid/schemas/check-v1.json",
    "title": "bnfold check --format json",
    "type": "object",
    "required": ["version", "exit_code", "strict", "allow", "allow_unmatched", "summary", "models"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": SCHEMA_VERSION, "description": "Schema version; bumped on incompatible change."},
        "exit_code": {"enum": [EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE], "description": "What the command exits with."},
        "strict": {"type": "boolean"},
        "allow": {"type": "array", "items": {"type": "string"}, "description": "--allow patterns, as given."},
        "allow_unmatched": {
            "type": "array",
            "items": {"type": "string"},
            "description": "--allow patterns that name no BatchNorm in any model checked (stale entries).",
        },
        "summary": {
            "type": "object",
            "additionalProperties": False,
            "required": [
                "models", "ok", "failed", "errors", "batchnorms_found", "batchnorms_foldable",
                "batchnorms_unfoldable", "batchnorms_failing", "batchnorms_allowed",
            ],
            "properties": {
                k: _COUNT
                for k in (
                    "models", "ok", "failed", "errors", "batchnorms_found", "batchnorms_foldable",
                    "batchnorms_unfoldable", "batchnorms_failing", "batchnorms_allowed",
                )
            },
        },
        "models": {
            "type": "array",
            "description": "One entry per model (and per argument that named no model), in the order given.",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["path", "status", "exit_code", "error", "batchnorms", "findings"],
                "properties": {
                    "path": {"type": "string"},
                    "status": {"enum": ["ok", "failed", "error"]},
                    "exit_code": {"enum": [EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE]},
                    "error": {**_NULLABLE_STR, "description": "One-line reason the model could not be read."},
                    "batchnorms": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["found", "foldable", "unfoldable", "failing", "allowed"],
                        "properties": {k: _COUNT for k in ("found", "foldable", "unfoldable", "failing", "allowed")},
                    },
                    "findings": {
                        "type": "array",
                        "description": "Every BatchNorm (or affine chain holding BatchNorms) left in the model.",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": [
                                "node", "op_type", "graph", "nodes", "batchnorms", "status", "verdict",
                                "code", "message", "hint", "target", "target_op", "direction", "reasons",
                            ],
                            "properties": {
                                "node": {"type": "string", "description": "The BatchNorm node's name."},
                                "op_type": {"type": "string"},
                                "graph": {"type": "string", "description": "Subgraph/function path; '' = main graph."},
                                "nodes": {"type": "array", "items": {"type": "string"}},
                                "batchnorms": {"type": "integer", "minimum": 1},
                                "status": {"enum": ["foldable", "unfoldable"]},
                                "verdict": {"enum": [FAIL, ALLOWED, INFO]},
                                "code": {
                                    "type": "string",
                                    "description": "'foldable', or the fold's skip reason code (bnfold.report.Reason).",
                                },
                                "message": {"type": "string"},
                                "hint": {"type": "string"},
                                "target": _NULLABLE_STR,
                                "target_op": _NULLABLE_STR,
                                "direction": {"enum": ["into-producer", "into-consumer", None]},
                                "reasons": {"type": "array", "items": _REASON},
                            },
                        },
                    },
                },
            },
        },
    },
}
"""JSON Schema (draft 2020-12) of ``bnfold check --format json``; documented in docs/check.md.

Top level: ``version`` (1), ``exit_code`` (0/1/2, what the command exits with), ``strict``,
``allow`` (the patterns), ``allow_unmatched`` (patterns that matched no BatchNorm), ``summary`` (counts over all models) and ``models``: per model its
``path``, ``status`` (``ok`` | ``failed`` | ``error``), ``exit_code``, ``error`` (one line, or
null), ``batchnorms`` counts (``found``, ``foldable``, ``unfoldable``, ``failing``, ``allowed``)
and ``findings``: each BatchNorm left, with ``node``, ``op_type``, ``graph``, ``nodes`` (its chain),
``status`` (``foldable`` | ``unfoldable``), ``verdict`` (``fail`` | ``allowed`` | ``info``),
``code`` (``foldable`` or the fold's reason code such as ``other-consumer``), ``message``, ``hint``,
``target``/``target_op``/``direction`` (where it would fold) and ``reasons`` (every skip reason).
"""
