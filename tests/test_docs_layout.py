"""docs/layout.md names every module of the library, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

from tests.paths import ROOT

LAYOUT = ROOT / "docs" / "layout.md"
PACKAGES = {"bnfold": "## The library: `bnfold/`", "bnfold/onnx": "### `bnfold/onnx/`", "bnfold/check": "### `bnfold/check/`",
            "bnfold/torch": "### `bnfold/torch/`", "bnfold/onnx/rules": "`rules/`:"}


def _section(text: str, heading: str) -> str:
    """The text from ``heading`` to the next heading (the rules' paragraph: to its blank line)."""
    start = text.index(heading)
    end = text.find("\n\n", start) if heading.endswith(":") else text.find("\n#", start + len(heading))
    section = text[start:] if end < 0 else text[start:end]
    return section if heading.endswith(":") else section.split("\n`rules/`:")[0]  # the rules have their own


def test_layout_names_every_module_and_no_other() -> None:
    text = LAYOUT.read_text(encoding="utf-8")
    for package, heading in PACKAGES.items():
        on_disk = {p.name for p in (ROOT / package).iterdir() if p.suffix == ".py"} - {"__init__.py"}
        section = _section(text, heading)
        named = set(re.findall(r"`([a-z_]+\.py)`", section)) - {"__init__.py"}
        assert on_disk <= named, f"{package}: not in docs/layout.md: {sorted(on_disk - named)}"
        assert named <= on_disk, f"{package}: docs/layout.md names modules that are gone: {sorted(named - on_disk)}"
