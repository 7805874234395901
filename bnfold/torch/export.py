"""`export_onnx`: fold, export with `torch.onnx.export`, check the file, then move it into place.

Two checks before the file appears at ``path``: onnxruntime (all graph optimisations off, so it cannot
fuse Conv+BatchNorm itself and hide a difference) must reproduce the eager model's outputs on the
example inputs, and the ONNX finder (`check_onnx`) runs on the exported graph so that a BatchNorm the
PyTorch pass could not see (a functional ``F.conv2d``, say) is reported rather than shipped unnoticed.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold import files
from bnfold.errors import OutputError, UsageError, VerificationError
from bnfold.report import FoldReport, Status
from bnfold.torch.api import _as_args, _run, fold_torch

_TOLERANCE = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    strict: bool = False,
    **export_kwargs: Any,
) -> tuple[nn.Module, FoldReport]:
    """Fold ``model`` (a copy), export it to ``path`` and check the file; returns ``(folded, report)``.

    ``export_kwargs`` go to ``torch.onnx.export`` (default ``dynamo=False``: the TorchScript exporter).
    The ONNX Runtime outputs must match the original eager outputs within ``atol + rtol·|ref|``
    (``atol`` scaled by the output's magnitude; defaults 1e-4/1e-5 in float32), else
    `VerificationError` and nothing is written. The ONNX check's findings go in ``report.notes``;
    with ``strict=True`` a foldable BatchNorm left in the file is an error too.
    """
    args = _as_args(example_inputs)
    if args is None:
        raise UsageError("export_onnx needs example_inputs (a tensor or a tuple of positional arguments)")
    target = Path(path)
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: {target.parent} is not a directory")
    folded, report = fold_torch(model, args)
    reference = _run(model, args)
    folded_out = _run(folded, args)

    kwargs: dict[str, Any] = {"dynamo": False}
    kwargs.update(export_kwargs)
    our_default = "dynamo" not in export_kwargs
    fd, tmp_name = tempfile.mkstemp(prefix=f".bnfold-tmp-{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp_name, files.output_mode(target))  # mkstemp's 0600 would make the model private
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            if our_default:  # the TorchScript exporter is bnfold's choice here, not the caller's
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"bnfold\.torch.*")
            torch.onnx.export(folded, args, str(tmp), **kwargs)
        _compare_with_ort(tmp, args, reference, folded_out, report, rtol, atol)
        _check_exported(tmp, target, report, strict)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return folded, report


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise UsageError("onnxruntime cannot be fed bfloat16 inputs from numpy; export a float32 or float16 model")
    return t.numpy()


def _compare_with_ort(
    onnx_path: Path,
    args: tuple,
    reference: list[torch.Tensor],
    folded_out: list[torch.Tensor],
    report: FoldReport,
    rtol: float | None,
    atol: float | None,
) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load the exported model: {exc}") from exc
    flat, _ = torch.utils._pytree.tree_flatten(args)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    inputs = sess.get_inputs()
    if len(inputs) != len(tensors):
        raise VerificationError(
            f"the exported model has {len(inputs)} inputs but example_inputs hold {len(tensors)} tensors; cannot compare"
        )
    feeds = {i.name: _to_numpy(t) for i, t in zip(inputs, tensors)}
    outputs = sess.run(None, feeds)
    if len(outputs) != len(reference):
        raise VerificationError(f"the exported model has {len(outputs)} outputs, the PyTorch model {len(reference)}")
    worst_ref = worst_folded = 0.0
    for k, (got, ref, fold) in enumerate(zip(outputs, reference, folded_out)):
        r = ref.detach().cpu().double().numpy()
        f = fold.detach().cpu().double().numpy()
        g = np.asarray(got, dtype=np.float64)
        if g.shape != r.shape:
            raise VerificationError(f"output {k}: onnxruntime gives shape {list(g.shape)}, PyTorch {list(r.shape)}")
        default_rtol, default_atol = _TOLERANCE.get(ref.dtype, (1e-4, 1e-5))
        rt = default_rtol if rtol is None else rtol
        at = (default_atol if atol is None else atol) * max(1.0, float(np.abs(r).max()) if r.size else 1.0)
        diff = np.abs(g - r)
        worst_ref = max(worst_ref, float(diff.max()) if diff.size else 0.0)
        worst_folded = max(worst_folded, float(np.abs(g - f).max()) if g.size else 0.0)
        if not np.all(diff <= at + rt * np.abs(r)):
            raise VerificationError(
                f"output {k}: onnxruntime (ORT_DISABLE_ALL) differs from the original PyTorch model by up to "
                f"{float(diff.max()):.3g} (rtol={rt:g}, atol={at:.3g}); the file was not written"
            )
    report.notes.append(
        f"onnxruntime (ORT_DISABLE_ALL) vs PyTorch: max abs difference {worst_ref:.3g} to the original, "
        f"{worst_folded:.3g} to the folded model"
    )


def _check_exported(onnx_path: Path, target: Path, report: FoldReport, strict: bool) -> None:
    """Run the ONNX finder on the exported file and say what it found."""
    from bnfold.onnx.api import check_onnx

    found = check_onnx(onnx_path)
    foldable = [c for c in found.candidates if c.status is Status.FOLDABLE]
    if found.found == 0:
        report.notes.append(f"ONNX check of {target.name}: no BatchNormalization left")
        return
    report.notes.append(
        f"ONNX check of {target.name}: {found.found} BatchNormalization left, {found.foldable} of them foldable"
        + (" (run `bnfold fold` on the file)" if foldable else "")
    )
    report.notes.extend(f"ONNX check: {c.describe()}" for c in found.candidates)
    if strict and foldable:
        raise VerificationError(
            f"{found.foldable} foldable BatchNormalization left in the exported model: "
            + "; ".join(c.describe() for c in foldable)
        )
