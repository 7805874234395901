"""bnfold: fold BatchNorm into neighbouring linear layers, provably without changing outputs.

The public API. Names load lazily so that `import bnfold` stays cheap and the ONNX-only user never
imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BnfoldError",
    "Candidate",
    "FoldReport",
    "Reason",
    "Status",
    "check_onnx",
    "export_onnx",
    "fold_file",
    "fold_onnx",
    "fold_torch",
    "verify_onnx",
]

_LAZY: dict[str, str] = {
    "BnfoldError": "bnfold.errors",
    "Candidate": "bnfold.report",
    "FoldReport": "bnfold.report",
    "Reason": "bnfold.report",
    "Status": "bnfold.report",
    "fold_onnx": "bnfold.onnx.api",
    "fold_file": "bnfold.onnx.api",
    "check_onnx": "bnfold.onnx.api",
    "verify_onnx": "bnfold.verify",
    "fold_torch": "bnfold.torch",
    "export_onnx": "bnfold.torch.export",
}

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.errors import BnfoldError
    from bnfold.onnx.api import check_onnx, fold_file, fold_onnx
    from bnfold.report import Candidate, FoldReport, Reason, Status
    from bnfold.torch import fold_torch
    from bnfold.torch.export import export_onnx
    from bnfold.verify import verify_onnx


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "onnxscript"):  # the ONNX-only install: say how to get the PyTorch front-end
            raise ImportError(torch_install_hint(name)) from exc
        raise


TORCH_REQUIREMENTS = ("torch>=2.13", "onnxscript>=0.3")
"""The `torch` extra of pyproject.toml (a test keeps the two equal)."""


def torch_install_hint(name: str) -> str:
    """What to install for the PyTorch front-end, in words that work however bnfold was installed.

    ``pip install 'bnfold[torch]'`` only works where bnfold comes from an index; the packages
    themselves install anywhere, and a checkout has its extra.
    """
    packages = " ".join(f"'{r}'" for r in TORCH_REQUIREMENTS)
    return (f"bnfold.{name} needs PyTorch, which is not installed: pip install {packages} "
            "(in a bnfold source checkout: pip install -e '.[torch]')")


def __dir__() -> list[str]:
    return sorted(__all__)
