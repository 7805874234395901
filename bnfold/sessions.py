"""onnxruntime sessions for verification and benchmarks, from a path or an in-memory model.

A model over 2 GB cannot travel to onnxruntime as bytes; it is written (with external data) to a
temporary folder that lives as long as the session's `ModelSource`.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from bnfold.errors import InputError
from bnfold.providers import assert_running_on, session_providers

LEVELS = {
    "disable_all": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "enable_all": "ORT_ENABLE_ALL",
}


@dataclass
class ModelSource:
    """What onnxruntime is given: a path, or serialised bytes."""

    label: str
    data: bytes | str
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def model_source(model: onnx.ModelProto | str | os.PathLike[str], label: str | None = None) -> ModelSource:
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not p.is_file():
            raise InputError(f"{p}: no such file")
        from bnfold.onnx.io import check_external_data

        check_external_data(p)  # onnxruntime reads external data itself: the same rule as fold, first
        return ModelSource(label or str(p), str(p))
    from bnfold.onnx.io import PROTOBUF_LIMIT, model_size

    if model_size(model) <= PROTOBUF_LIMIT:
        return ModelSource(label or "<memory>", model.SerializeToString())
    tmp = tempfile.TemporaryDirectory(prefix="bnfold-ort-")
    path = os.path.join(tmp.name, "model.onnx")
    from bnfold.onnx.storage import save_model

    save_model(model, path, external_data=True)
    return ModelSource(label or "<memory>", path, tmp)


def make_session(
    source: ModelSource,
    provider: str = "cpu",
    level: str = "disable_all",
    threads: int | None = None,
    *,
    spinning: bool = True,
):
    """A session at the given optimisation level (`disable_all` unless told: onnxruntime fuses Conv+BN
    itself at its basic level, so an optimised reference would compare the fold with itself).

    ``spinning=False`` stops idle intra-op threads from busy-waiting: two sessions timed in one process
    would otherwise take each other's cores (see `bnfold.bench`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(source.data, so, providers=session_providers(provider))
    except Exception as exc:  # onnxruntime raises its own types for models it cannot run
        text = " ".join(str(exc).split())
        newest = re.search(r"support for domain (\S+) is till opset (\d+)", text)
        if newest:  # onnxruntime's own message is 600 characters of source location and caveats
            raise InputError(
                f"{source.label}: its opset is newer than onnxruntime {ort.__version__} runs "
                f"(domain {newest.group(1)} up to opset {newest.group(2)})"
            ) from None
        raise InputError(f"{source.label}: onnxruntime cannot load it ({text[:300]})") from None
    assert_running_on(session, provider)
    return session
