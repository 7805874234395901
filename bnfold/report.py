"""What a fold found, did and left, in one object that both front-ends fill.

`FoldReport.__str__` is the human summary and `to_json()` the machine one. A report states facts
(found, folded, foldable, left and why); it passes no verdict: whether a BatchNorm left fails a CI gate
is the gate's policy (`bnfold.check.gate`), the one place an exit code of `bnfold check` is decided.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any



class Status(str, Enum):
    FOLDABLE = "foldable"  # a dry run (check) found it can be folded
    FOLDED = "folded"
    SKIPPED = "skipped"


class Reason(str, Enum):
    """Why a BatchNorm (or affine chain) was left. Values are stable: CI scripts match on them."""

    OTHER_CONSUMER = "other-consumer"
    GRAPH_OUTPUT = "graph-output"
    NOT_CONSTANT = "not-constant"
    OVERRIDABLE_INITIALIZER = "overridable-initializer"
    TRAINING_MODE = "training-mode"
    FP16_OVERFLOW = "overflow"
    SHAPE_MISMATCH = "shape-mismatch"
    PADDING = "consumer-pads"
    NO_LINEAR_NEIGHBOUR = "no-linear-neighbour"
    UNSUPPORTED = "unsupported"
    NO_RUNNING_STATS = "no-running-stats"
    MULTIPLE_CALL_SITES = "multiple-call-sites"
    NEEDS_EXAMPLE_INPUTS = "needs-example-inputs"


HINTS: dict[Reason, str] = {
    Reason.OTHER_CONSUMER: "fold is only exact when the BatchNorm is the layer's sole consumer",
    Reason.GRAPH_OUTPUT: "the pre-BatchNorm tensor is itself a model output; drop it from the outputs to fold",
    Reason.NOT_CONSTANT: "make the parameter an initializer (constant) in the exported model",
    Reason.OVERRIDABLE_INITIALIZER: "remove it from the graph inputs, or pass --assume-constant if no caller overrides it",
    Reason.TRAINING_MODE: "export the model in eval/inference mode (model.eval(), training=TrainingMode.EVAL)",
    Reason.FP16_OVERFLOW: "fold in a wider dtype (convert the model to float32 first)",
    Reason.SHAPE_MISMATCH: "the BatchNorm channel axis is not the layer's channel axis; nothing to do",
    Reason.PADDING: "zero padding does not pass through the BatchNorm; nothing to do unless the conv is unpadded",
    Reason.NO_LINEAR_NEIGHBOUR: "no Conv/ConvTranspose/Gemm/MatMul next to it; it stays as a BatchNorm (cheap)",
    Reason.UNSUPPORTED: "not supported by bnfold; please report it with the model",
    Reason.NO_RUNNING_STATS: "the BatchNorm tracks no running statistics; it normalises with batch statistics",
    Reason.MULTIPLE_CALL_SITES: "the module is called at several places; fold only where every call is the same pair",
    Reason.NEEDS_EXAMPLE_INPUTS: "pass example_inputs so the traced shapes can prove the channel axis",
}


@dataclass
class SkipReason:
    code: Reason
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message, "hint": HINTS.get(self.code, "")}


@dataclass
class Candidate:
    """One BatchNorm (or per-channel affine chain) and what became of it."""

    node: str  # the BatchNorm's name (or the chain's first node when it holds no BatchNorm)
    op_type: str  # "BatchNormalization", "BatchNorm2d", "Mul", ...
    status: Status
    nodes: list[str] = field(default_factory=list)  # every node of the chain, in order
    target: str | None = None  # the layer it was (or would be) folded into
    target_op: str | None = None
    direction: str | None = None  # "into-producer" | "into-consumer"
    reasons: list[SkipReason] = field(default_factory=list)
    graph: str = ""  # subgraph / function path, "" for the main graph
    bn_count: int | None = None  # BatchNorms in the chain; None: 1 if op_type is a BatchNorm
    rule: str | None = None  # the fold rule that folded it ("conv", "flatten-head"; docs/rules.md)

    @property
    def is_batchnorm(self) -> bool:
        return "BatchNorm" in self.op_type

    def describe(self) -> str:
        where = f"{self.graph}/" if self.graph else ""
        chain = " → ".join(self.nodes) if len(self.nodes) > 1 else self.node
        if self.status in (Status.FOLDED, Status.FOLDABLE):
            verb = "folded" if self.status is Status.FOLDED else "foldable"
            side = "producer" if self.direction == "into-producer" else "consumer"
            by = f" (rule {self.rule})" if self.rule else ""
            return f"{verb}: {where}{chain} into {side} {self.target_op} {self.target}{by}"
        why = "; ".join(f"[{r.code.value}] {r.message}" for r in self.reasons) or "no reason recorded"
        return f"left: {where}{chain} ({self.op_type}) — {why}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "status": self.status.value,
            "nodes": list(self.nodes),
            "target": self.target,
            "target_op": self.target_op,
            "direction": self.direction,
            "rule": self.rule,
            "graph": self.graph,
            "batchnorms": FoldReport._bn_count(self),
            "reasons": [r.to_dict() for r in self.reasons],
        }


@dataclass
class FoldReport:
    """Counts and per-candidate outcomes of one fold (or dry run) of one model."""

    source: str = "<memory>"
    frontend: str = "onnx"
    analysis: str = "onnx-graphsurgeon"
    dry_run: bool = False
    candidates: list[Candidate] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # `bnfold.verify.VerifyResult` when `fold_file(..., verify=...)` verified the written file (not in to_dict:
    # the command prints it beside the report)
    verification: Any = field(default=None, repr=False, compare=False)

    # -- counts -------------------------------------------------------------------------------
    @property
    def batchnorms(self) -> list[Candidate]:
        return [c for c in self.candidates if c.is_batchnorm]

    @property
    def found(self) -> int:
        """BatchNorm nodes seen (a chain counts each BatchNorm in it)."""
        return sum(self._bn_count(c) for c in self.candidates)

    @property
    def folded(self) -> int:
        return sum(self._bn_count(c) for c in self.candidates if c.status is Status.FOLDED)

    @property
    def foldable(self) -> int:
        return sum(self._bn_count(c) for c in self.candidates if c.status is Status.FOLDABLE)

    @property
    def left(self) -> int:
        return sum(self._bn_count(c) for c in self.candidates if c.status is Status.SKIPPED)

    @property
    def affine_ops_folded(self) -> int:
        """Mul/Add/Sub/Div nodes absorbed beside the BatchNorms."""
        done = (Status.FOLDED, Status.FOLDABLE)
        return sum(len(c.nodes) - self._bn_count(c) for c in self.candidates if c.status in done)

    @staticmethod
    def _bn_count(c: Candidate) -> int:
        if c.bn_count is not None:
            return c.bn_count
        return 1 if c.is_batchnorm else 0

    # -- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "frontend": self.frontend,
            "analysis": self.analysis,
            "dry_run": self.dry_run,
            "batchnorms_found": self.found,
            "batchnorms_folded": self.folded,
            "batchnorms_foldable": self.foldable,
            "batchnorms_left": self.left,
            "affine_ops_folded": self.affine_ops_folded,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": round(self.seconds, 6),
            "notes": list(self.notes),
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def __str__(self) -> str:
        verb = "foldable" if self.dry_run else "folded"
        done = self.foldable if self.dry_run else self.folded
        lines = [
            f"{self.source}: {self.found} BatchNorm found, {done} {verb}, {self.left} left"
            + (f", {self.affine_ops_folded} Mul/Add/Sub/Div absorbed" if self.affine_ops_folded else ""),
        ]
        if not self.dry_run:
            lines.append(
                f"  nodes {self.nodes_before} → {self.nodes_after}, "
                f"parameters {self.params_before:,} → {self.params_after:,}, {self.seconds:.3f}s"
                f" ({self.analysis})"
            )
        for c in self.candidates:
            if c.status is Status.SKIPPED or self.dry_run:
                lines.append("  " + c.describe())
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

