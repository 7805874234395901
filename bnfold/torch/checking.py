"""The post-fold check: is the folded model the same function as the original, up to float noise?

A correct fold still rounds differently (``s·W`` once, where the original rounded the conv output and
then the BatchNorm's), and on deep networks with trained-like statistics that difference grows to
1e-5..3e-4 of the output's scale in float32, so no fixed tolerance separates a correct fold from a wrong
one. The check measures instead, on the example inputs, against a **float64 deep copy of the original
model** (cheap next to the model: run once, then dropped):

* ``noise`` = max |original (its own dtype) − original in float64| / scale: how far the model's own
  rounding moves its output;
* ``fold error`` = max |folded (its own dtype) − original in float64| / scale: the fold measured against
  the exact function, not against the original's rounding;
* ``scale`` = max |original in float64|;

and `bnfold.criterion.judge` decides (a stated multiple of the noise, a floor per dtype). float16 and
bfloat16 models are judged the same way: the float64 copy widens their stored values exactly. Where
the float64 copy cannot run (a module without float64 kernels), the fold error is measured against the
original itself and only the dtype's floor can excuse it; the report says which was done.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnfold.criterion import judge
from bnfold.errors import UsageError, VerificationError

_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class Before:
    """The original's outputs on the example inputs, in its dtype and (if it ran) from a float64 copy."""

    outputs: list[torch.Tensor]
    exact: list[torch.Tensor] | None
    why_no_exact: str = ""


def _run(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*args)
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


def _widen(value):
    return value.to(torch.float64) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def measure_before(model: nn.Module, args: tuple) -> Before:
    """Run the original, and a float64 deep copy of it, on ``args`` (before anything is written)."""
    outputs = _run(model, args)
    try:
        with warnings.catch_warnings():  # torch's pytree deprecation, raised when copying a program's TreeSpecs
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            wide = copy.deepcopy(model).to(torch.float64)
        exact = _run(wide, torch.utils._pytree.tree_map(_widen, args))
        del wide
    except Exception as exc:  # a module without float64 kernels, a dtype-pinned forward, …
        return Before(outputs, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if len(exact) != len(outputs) or any(e.shape != o.shape for e, o in zip(exact, outputs)):
        return Before(outputs, None, "the float64 copy returns differently shaped outputs")
    return Before(outputs, exact)


def verify_fold(model: nn.Module, args: tuple, before: Before) -> str:
    """Judge the folded ``model`` against ``before``; the words for the report, or `VerificationError`."""
    got = _run(model, args)
    name = type(model).__name__
    if len(got) != len(before.outputs):
        raise VerificationError(f"the folded {name} returns {len(got)} tensors, the original {len(before.outputs)}; the model was left unchanged")
    words: list[str] = []
    failed: list[str] = []
    for k, (orig, new) in enumerate(zip(before.outputs, got)):
        label = f"output {k}" if len(got) > 1 else "output"
        if orig.shape != new.shape or orig.dtype != new.dtype:
            failed.append(f"{label}: {list(new.shape)} {new.dtype} instead of {list(orig.shape)} {orig.dtype}")
            continue
        if not orig.is_floating_point():
            if not torch.equal(orig, new):
                failed.append(f"{label}: integer values differ")
            continue
        if orig.numel() == 0:
            continue
        exact = before.exact[k] if before.exact is not None else orig.double()
        scale = float(exact.abs().max()) or 1.0
        if not torch.isfinite(exact).all():
            scale = float(exact[torch.isfinite(exact)].abs().max()) if torch.isfinite(exact).any() else 1.0
        fold_error = _rel(new, exact, scale)
        noise = _rel(orig, exact, scale) if before.exact is not None else 0.0
        j = judge(fold_error, noise, _DTYPE_NAMES.get(orig.dtype, str(orig.dtype)), scale=scale)
        line = f"{label}: {j.words()}"
        (words if j.passed else failed).append(line)
    basis = (
        "against a float64 copy of the original (fold error = |folded − float64|, noise = |original − float64|, "
        "relative to max |float64 output|)"
        if before.exact is not None
        else f"against the original itself: no float64 copy could run ({before.why_no_exact}), so the noise is unmeasured and only the dtype floor applies"
    )
    if failed:
        raise VerificationError(
            f"the folded {name} is not the original function on example_inputs, measured {basis}: "
            + "; ".join(failed)
            + ". The model was left unchanged; please report it with the model"
        )
    return f"checked on example_inputs {basis}: " + "; ".join(words)


def _rel(a: torch.Tensor, exact: torch.Tensor, scale: float) -> float:
    """max |a − exact| / scale, NaN/inf compared as equal only where both are the same non-finite value."""
    a64 = a.double()
    same_nonfinite = (~torch.isfinite(exact)) & (a64 == exact) | (torch.isnan(exact) & torch.isnan(a64))
    diff = (a64 - exact).abs()
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) / scale


def example_args(example_inputs: Any) -> tuple | None:
    """``example_inputs`` as positional arguments: a tensor, a tuple or list of them, or None."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise UsageError(
        f"example_inputs must be a tensor or a tuple of positional arguments, got {type(example_inputs).__name__}"
    )
