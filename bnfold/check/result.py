"""What the gate found: plain records, filled by `bnfold.check.gate` and read by the renderers.

These types hold no policy. A finding's ``verdict`` and a model's ``exit_code`` are *set* by the gate
(`bnfold.check.gate`), the one place where a verdict is decided; here they are only stored, counted and
turned into the dictionaries the JSON schema (``check-v1.schema.json`` beside this file) describes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE
from bnfold.report import FoldReport

SCHEMA_VERSION = 1

FOLDABLE_CODE = "foldable"
"""The code of a finding that `bnfold fold` would fold (the fold's skip reasons are the other codes)."""

# Verdicts of a finding (decided in bnfold.check.gate.judge).
FAIL = "fail"  # makes the model fail the gate
ALLOWED = "allowed"  # would fail, but its node matches an --allow pattern
INFO = "info"  # left, and not a failure (an unfoldable BatchNorm without --strict)

STATUS_OF_EXIT_CODE = {EXIT_OK: "ok", EXIT_CHECK_FAILED: "failed", EXIT_USAGE: "error"}
"""A model's status is the name of the exit code the gate gave it, never a second judgement."""


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

    def names(self) -> set[str]:
        """What an --allow pattern is matched against: the node, its chain, and both qualified by subgraph."""
        return candidate_names(self.node, self.nodes, self.graph)

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
    """One model: its findings, or the one-line error that kept it from being read.

    ``exit_code`` is the gate's verdict on this model (`bnfold.check.gate`); ``status`` is its name.
    """

    path: str
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    batchnorms_found: int = 0
    report: FoldReport | None = None
    exit_code: int = EXIT_USAGE  # until the gate has judged it, a model has not passed
    is_model: bool = True  # False: an argument (or entry) that names no model: missing, broken link, FIFO…

    @property
    def failing(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == FAIL]

    @property
    def status(self) -> str:
        return STATUS_OF_EXIT_CODE[self.exit_code]

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
    """Every model checked, in the order given; ``exit_code`` (set by the gate) is what `bnfold check` exits with."""

    models: list[ModelCheck] = field(default_factory=list)
    strict: bool = False
    allow: list[str] = field(default_factory=list)
    exit_code: int = EXIT_USAGE

    @property
    def unmatched_allow(self) -> list[str]:
        """--allow patterns that name no BatchNorm in any model checked (stale entries)."""
        names = {n for m in self.models for f in m.findings for n in f.names()}
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


def candidate_names(node: str, nodes: Sequence[str], graph: str) -> set[str]:
    """The names an --allow pattern may match: the node, its chain, and both qualified by subgraph path."""
    names = {node, *nodes}
    if graph:
        names |= {f"{graph}/{n}" for n in list(names)}
    return names
