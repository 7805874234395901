"""The rules the pass tries, in order: every module of this package that defines ``RULES``.

Adding a rule is adding a module (and its test): nothing here names it. The order is the rules'
``priority`` (then module name, then position in ``RULES``), so it does not depend on file-system
listing order. (name, direction) must be unique: it is what the report calls the fold. The direction
is one of the two the `bnfold check --format json` schema knows (its findings enumerate them).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path

from bnfold.onnx.rules.base import INTO_CONSUMER, INTO_PRODUCER, Rule

NOT_RULES = {"base", "registry"}


@lru_cache(maxsize=1)
def rules() -> tuple[Rule, ...]:
    """Every registered rule, in the order the pass tries them."""
    found: list[tuple[int, str, int, Rule]] = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name in NOT_RULES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for position, rule in enumerate(getattr(module, "RULES", ())):
            found.append((rule.priority, info.name, position, rule))
    ordered = tuple(rule for *_, rule in sorted(found, key=lambda f: f[:3]))
    keys = [(r.name, r.direction) for r in ordered]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise RuntimeError(f"two rules share a name and direction: {duplicates}")
    unknown = sorted({r.name for r in ordered if r.direction not in (INTO_PRODUCER, INTO_CONSUMER)})
    if unknown:
        raise RuntimeError(f"rules with a direction other than {INTO_PRODUCER!r} or {INTO_CONSUMER!r}: {unknown}")
    return ordered
