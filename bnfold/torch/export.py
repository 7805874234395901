"""`export_onnx`: fold, export with `torch.onnx.export`, check the file, then move it into place.

Two checks before the file appears at ``path``. First, the exported folded model, run by onnxruntime
(all graph optimisations off, so it cannot fuse Conv+BatchNorm itself and hide a difference), must
compute what the original eager model computes, judged like every bnfold verification
(`bnfold.verify.compare_outputs`, `bnfold.criterion`): both are compared with a float64 copy of the
original on the example inputs; the original's own distance from that copy is its float noise, and the
exported fold may be off by at most 4× that (or the dtype's floor). A float64 copy is cheap here (one
more eager forward) and measures the model's own rounding directly, however deep it is. Second, the
ONNX finder (`check_onnx`) runs on the exported graph so that a BatchNorm the PyTorch pass could not
see (a functional ``F.conv2d``, say) is reported rather than shipped unnoticed.
"""

from __future__ import annotations

import copy
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
from bnfold.torch.api import fold_torch
from bnfold.torch.checking import _run, example_args

NOISE = "the original's float32 error vs its float64 copy"


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
    The ONNX Runtime outputs must equal the original eager outputs up to the model's own float noise
    (see the module docstring; ``rtol`` replaces the dtype's floor, ``atol`` adds an absolute
    allowance), else `VerificationError`, which says what was measured, and nothing is written. The ONNX check's findings go in ``report.notes``;
    with ``strict=True`` a foldable BatchNorm left in the file is an error too.
    """
    args = example_args(example_inputs)
    if args is None:
        raise UsageError("export_onnx needs example_inputs (a tensor or a tuple of positional arguments)")
    target = Path(path)
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: {target.parent} is not a directory")
    folded, report = fold_torch(model, args)
    reference = _run(model, args)
    exact = _float64_outputs(model, args)

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
        _compare_with_ort(tmp, args, reference, exact, report, rtol, atol)
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


def _float64_outputs(model: nn.Module, args: tuple) -> list[torch.Tensor] | None:
    """The original's outputs from a float64 copy of it (None where a layer has no float64 kernel)."""
    def widen(t: Any) -> Any:
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    try:
        wide = copy.deepcopy(model).double()
        return _run(wide, tuple(torch.utils._pytree.tree_map(widen, a) for a in args))
    except Exception:  # an op without a float64 kernel, a model that cannot be deep-copied: no copy
        return None


def _compare_with_ort(
    onnx_path: Path,
    args: tuple,
    reference: list[torch.Tensor],
    exact: list[torch.Tensor] | None,
    report: FoldReport,
    rtol: float | None,
    atol: float | None,
) -> None:
    """The exported fold against the eager original, held to the original's own float noise."""
    from bnfold.sessions import make_session, model_source
    from bnfold.verify import compare_outputs

    source = model_source(onnx_path, "the exported model")
    try:
        sess = make_session(source, "cpu")  # ORT_DISABLE_ALL
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
    for k, (got, ref) in enumerate(zip(outputs, reference)):
        if tuple(np.shape(got)) != tuple(ref.shape):
            raise VerificationError(f"output {k}: onnxruntime gives shape {list(np.shape(got))}, PyTorch {list(ref.shape)}")
    ref32 = [_to_numpy(r) for r in reference]
    names = [f"output {k}" for k in range(len(outputs))]
    if exact is not None:
        wide = [e.detach().cpu().numpy() for e in exact]
        comps = compare_outputs(names, wide, outputs, [(NOISE, ref32)], dtypes=[r.dtype.name for r in ref32],
                                rtol=rtol, atol=atol)
        against = "a float64 copy of the original PyTorch model"
    else:  # no float64 copy: the original itself, held to the dtype's floor
        comps = compare_outputs(names, ref32, outputs, [], rtol=rtol, atol=atol)
        against = "the original PyTorch model (no float64 copy could run: held to the dtype's floor)"
    failed = [c for c in comps if not c.passed]
    if failed:
        raise VerificationError(
            f"the exported folded model (onnxruntime, ORT_DISABLE_ALL) differs from {against} more than "
            f"float rounding explains: " + "; ".join(f"{c.name}: {c.words()}" for c in failed)
            + "; the file was not written"
        )
    report.notes.append(
        f"onnxruntime (ORT_DISABLE_ALL) on the exported file vs {against}: "
        + "; ".join(f"{c.name}: {c.words()}" for c in comps)
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
