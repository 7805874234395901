"""How a `CheckResult` is shown: text for people, JSON for programs, GitHub Actions annotations.

Renderers only read the result; the verdicts and exit codes in it were decided by `bnfold.check.gate`.
The JSON document is described by the packaged schema ``check-v1.schema.json`` (`CHECK_JSON_SCHEMA`).
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from typing import Any

from bnfold.check.result import ALLOWED, FAIL, INFO, CheckResult, ModelCheck
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE

SCHEMA_FILE = "check-v1.schema.json"


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``bnfold check --format json``, as shipped in the package."""
    return json.loads(resources.files("bnfold.check").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


FORMATS = ("text", "json", "github")
_MARK = {FAIL: "FAIL", ALLOWED: "allowed", INFO: "left"}


def summary_line(result: CheckResult) -> str:
    s = result.summary()
    verdict = {EXIT_OK: "passed", EXIT_CHECK_FAILED: "FAILED", EXIT_USAGE: "ERROR"}[result.exit_code]
    n_models = sum(m.is_model for m in result.models)
    named_nothing = s["models"] - n_models
    parts = [f"{n_models} model{'s' if n_models != 1 else ''} checked"]
    if named_nothing:
        parts.append(f"{named_nothing} path{'s' if named_nothing != 1 else ''} named no model")
    if s["failed"]:
        what = "BatchNorm" if s["batchnorms_failing"] == 1 else "BatchNorms"
        because = "left" if result.strict else "foldable"
        parts.append(f"{s['failed']} failed ({s['batchnorms_failing']} {what} {because})")
    if s["errors"] - named_nothing:
        parts.append(f"{s['errors'] - named_nothing} unreadable")
    if n_models:
        parts.append(f"{s['ok']} ok")
    if s["batchnorms_allowed"]:
        parts.append(f"{s['batchnorms_allowed']} allowed")
    if s["batchnorms_unfoldable"] and not result.strict:
        n = s["batchnorms_unfoldable"]
        parts.append(f"{n} unfoldable BatchNorm{'s' if n != 1 else ''} left (not failing without --strict)")
    return f"bnfold check {verdict}: " + ", ".join(parts)


def error_line(m: ModelCheck) -> str:
    """``ERROR path: reason`` for a model that could not be read."""
    same = (m.error or "").startswith(f"{m.path}: ")
    return f"ERROR {m.error}" if same else f"ERROR {m.path}: {m.error}"


def render_errors(result: CheckResult) -> str:
    """Only the unreadable models (``check -q``: no output but errors); empty when there are none."""
    return "\n".join(error_line(m) for m in result.models if m.error is not None)


def render_text(result: CheckResult, *, verbose: bool = False) -> str:
    """Per model with something left: each BatchNorm, its node, code and a hint; then the summary line.

    A hint is printed once per reason code and model, under the first BatchNorm it applies to, with
    the count when several share it (a 25-BatchNorm model does not repeat the same line 25 times).
    Models with no BatchNorm left are named only with ``verbose``; unreadable models always are.
    """
    lines: list[str] = []
    for m in result.models:
        if m.error is not None:
            lines.append(error_line(m))
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
        sharing = Counter((f.code, f.hint) for f in m.findings if f.hint)
        hinted: set[tuple[str, str]] = set()
        for f in m.findings:
            chain = " → ".join(f.nodes) if len(f.nodes) > 1 else ""
            where = f"{f.graph}/" if f.graph else ""
            lines.append(f"  {_MARK[f.verdict]:<7} {where}{f.node} ({f.op_type}) [{f.code}] {f.message}")
            if chain:
                lines.append(f"          chain: {chain}")
            key = (f.code, f.hint)
            if f.hint and key not in hinted:
                hinted.add(key)
                n = sharing[key]
                label = "hint" if n == 1 else f"hint for all {n} [{f.code}] here"
                lines.append(f"          {label}: {f.hint}")
    lines.extend(f"note: --allow {p!r} matched no BatchNorm" for p in result.unmatched_allow)
    lines.append(summary_line(result))
    return "\n".join(lines)


def render_json(result: CheckResult, *, indent: int | None = 2) -> str:
    """The whole result as one JSON document; it validates against the packaged schema."""
    return json.dumps(result.to_dict(), indent=indent, ensure_ascii=False)


def _gh_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(s: str) -> str:
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def render_github(result: CheckResult) -> str:
    """GitHub Actions workflow commands: one ``::error`` per failing BatchNorm or unreadable model,
    ``::notice`` for allowed ones, then the summary line as plain log text. Each annotation stands
    alone on the file view, so each keeps its hint."""
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
    lines.append(summary_line(result))
    return "\n".join(lines)


def render(result: CheckResult, fmt: str = "text", *, verbose: bool = False) -> str:
    """``fmt``: one of `FORMATS`."""
    if fmt == "json":
        return render_json(result)
    if fmt == "github":
        return render_github(result)
    return render_text(result, verbose=verbose)
