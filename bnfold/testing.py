"""Helpers for test suites: assert that a model holds no BatchNorm that `bnfold fold` would fold.

    from bnfold.testing import assert_fully_folded

    def test_export_is_folded(tmp_path):
        path = export_my_model(tmp_path)
        assert_fully_folded(path)

The assertion is the same gate as ``bnfold check`` (the fold's own finder, as a dry run).
"""

from __future__ import annotations

from typing import Any, Sequence

from bnfold.check import FAIL, ModelCheck, check_model

__all__ = ["assert_fully_folded"]


def assert_fully_folded(
    model_or_path: Any,
    *,
    strict: bool = False,
    allow: Sequence[str] = (),
    assume_constant: bool = False,
) -> ModelCheck:
    """Raise ``AssertionError`` when a foldable BatchNorm is left in the model (a path or ModelProto).

    The message lists each failing BatchNorm: its node, where it would fold (or, with ``strict``, the
    reason it cannot) and a hint. ``allow``: glob patterns on node names accepted knowingly. A model
    that cannot be read raises ``AssertionError`` too, with the one-line reason. Returns the
    `bnfold.check.ModelCheck` when the model passes.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this one
    result = check_model(model_or_path, strict=strict, allow=allow, assume_constant=assume_constant)
    if result.error is not None:
        raise AssertionError(f"cannot check the model: {result.error}")
    failing = [f for f in result.findings if f.verdict == FAIL]
    if failing:
        what = "BatchNorm left" if strict else "foldable BatchNorm left"
        lines = [f"{result.path}: {sum(f.batchnorms for f in failing)} {what}:"]
        for f in failing:
            lines.append(f"  {f.qualified_name} ({f.op_type}) [{f.code}] {f.message}")
            if len(f.nodes) > 1:
                lines.append(f"    chain: {' → '.join(f.nodes)}")
            if f.hint:
                lines.append(f"    hint: {f.hint}")
        raise AssertionError("\n".join(lines))
    return result
