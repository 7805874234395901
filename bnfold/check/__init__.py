"""`bnfold check`: the CI gate. Is any foldable BatchNorm left in these models?

The check is a dry run of the fold itself (`bnfold.onnx.api.check_onnx`): a BatchNorm is called
*foldable* exactly when `bnfold fold` would fold it, so the gate and the fold can never disagree.
This package adds what a gate needs around that dry run, one job per module:

- `result`: the records (`Finding`, `ModelCheck`, `CheckResult`), no policy;
- `paths`: files, folders and globs → model files, and what names nothing (`expand_paths`);
- `gate`: the policy (``strict``, ``allow``) — the one place a verdict and an exit code are decided
  (`judge`, `check_model`, `check_paths`);
- `pool`: many models in parallel processes, started once;
- `render`: text, JSON (schema: the packaged ``check-v1.schema.json``) and GitHub annotations.

No click here; the command in ``bnfold.cli.check_cmd`` only parses, calls `check_paths`, prints
and exits.
"""

from __future__ import annotations

from bnfold.check.gate import check_model, check_paths, judge
from bnfold.check.paths import PathError, expand_paths
from bnfold.check.render import load_schema, render, render_github, render_json, render_text
from bnfold.check.result import ALLOWED, FAIL, INFO, CheckResult, Finding, ModelCheck

CHECK_JSON_SCHEMA = load_schema()
"""JSON Schema (draft 2020-12) of ``bnfold check --format json``: the packaged ``check-v1.schema.json``."""

__all__ = [
    "ALLOWED",
    "CHECK_JSON_SCHEMA",
    "FAIL",
    "INFO",
    "CheckResult",
    "Finding",
    "ModelCheck",
    "PathError",
    "check_model",
    "check_paths",
    "expand_paths",
    "judge",
    "render",
    "render_github",
    "render_json",
    "render_text",
]
