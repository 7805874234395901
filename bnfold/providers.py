"""Which onnxruntime execution providers to use, said plainly when one is missing.

`cuda` means onnxruntime's `CUDAExecutionProvider`, which only the `onnxruntime-gpu` build offers. Asked
for explicitly and missing, it is an error (exit 2): a silent run on the CPU would be a lie about what
was verified or measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bnfold.errors import ProviderUnavailableError, UsageError

NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CUDA_HINT = "install the GPU build: pip uninstall onnxruntime && pip install onnxruntime-gpu"


@dataclass
class ProviderChoice:
    """The providers to run on (short names), and what was asked for but is not there."""

    selected: list[str]
    notes: list[str] = field(default_factory=list)


def available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose(request: str) -> ProviderChoice:
    """`cpu`, `cuda` or `all` → the providers to use.

    `cuda` without the CUDA provider raises `ProviderUnavailableError`; `all` runs what exists and notes
    what does not.
    """
    request = request.lower()
    have = available()
    cuda_ok = NAMES["cuda"] in have
    missing = f"CUDAExecutionProvider is not available in this onnxruntime build ({', '.join(have)}); {CUDA_HINT}"
    if request == "cpu":
        return ProviderChoice(["cpu"])
    if request == "cuda":
        if not cuda_ok:
            raise ProviderUnavailableError(missing)
        return ProviderChoice(["cuda"])
    if request == "all":
        return ProviderChoice(["cpu", "cuda"] if cuda_ok else ["cpu"], [] if cuda_ok else [f"skipped CUDA: {missing}"])
    raise UsageError(f"unknown provider {request!r}: use cpu, cuda or all")


def session_providers(short: str) -> list[str]:
    """onnxruntime's provider list for one short name (CUDA keeps the CPU for ops it lacks)."""
    return [NAMES["cuda"], NAMES["cpu"]] if short == "cuda" else [NAMES["cpu"]]


def assert_running_on(session, short: str) -> None:
    """onnxruntime falls back to the CPU when CUDA fails to initialise: refuse to report that as CUDA."""
    if short == "cuda" and session.get_providers()[0] != NAMES["cuda"]:
        raise ProviderUnavailableError(
            f"onnxruntime did not start CUDAExecutionProvider (got {session.get_providers()}); {CUDA_HINT}"
        )
