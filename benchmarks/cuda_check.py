"""verify and bench on CUDA, over the sample models and a ResNet-50-size model, in one table.

    python benchmarks/cuda_check.py [--repeats 50] [--skip-large] [--out FILE]

Ready for the day a GPU is there: with onnxruntime-gpu on a machine with an NVIDIA GPU it folds every
`sample_models/*.onnx` and the ResNet-50 topology (`sample_models.zoo.resnet50_size`, built locally,
~100 MB), then runs what ``bnfold verify --provider cuda`` and ``bnfold bench --provider cuda`` run
(`bnfold.verify_onnx` and `bnfold.bench.bench_onnx`, the same engines) and prints one Markdown table:
the verification verdict with the worst output's fold error and noise, and the folded/original latency
at both optimisation levels. Without a GPU it says plainly that none was found — no
CUDAExecutionProvider in this onnxruntime build, or one that does not start — and exits 0: the check
did not fail, it could not run. A script, not a test.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `sample_models` lives at the repo root
    sys.path.insert(0, str(ROOT))

CUDA = "CUDAExecutionProvider"


def no_gpu_reason() -> str | None:
    """Why CUDA cannot be used here, or None when it can (a session really starts on it)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if CUDA not in have:
        return (f"no GPU: this onnxruntime ({ort.__version__}) has no {CUDA} (it has {', '.join(have)}); "
                "install onnxruntime-gpu on a machine with an NVIDIA GPU to run this check")
    from bnfold.errors import BnfoldError
    from bnfold.sessions import make_session, model_source

    try:
        make_session(model_source(ROOT / "sample_models" / "conv_bn.onnx"), "cuda")
    except BnfoldError as exc:
        return f"no usable GPU: {CUDA} is listed but did not start ({exc})"
    return None


def row(name: str, path: Path, folded: Path, repeats: int, provider: str = "cuda") -> str:
    from bnfold import verify_onnx
    from bnfold.bench import bench_onnx

    v = verify_onnx(path, folded, provider=provider)
    worst = max((o for o in v.outputs[provider] if o.is_float), key=lambda o: o.fold_error / o.allowed if o.allowed else 0.0, default=None)
    figures = f"{worst.fold_error:.2g} / {worst.noise:.2g}" if worst is not None else "-"
    b = bench_onnx(path, folded, provider=provider, repeats=repeats)
    cells = {r.level: f"{r.original.median_ms:.3f} → {r.folded.median_ms:.3f} ms ({r.ratio:.2f}×)" for r in b.runs}
    return (f"| {name} | {'PASS' if v.passed else 'FAIL'} | {figures} | {cells.get('disable_all', '-')} | "
            f"{cells.get('enable_all', '-')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--skip-large", action="store_true", help="leave out the ResNet-50-size model")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same table on CPU, to try the script where there is no GPU")
    args = ap.parse_args()
    reason = no_gpu_reason() if args.provider == "cuda" else None
    if reason is not None:
        print(reason)
        return 0
    import onnx
    import onnxruntime as ort

    from bnfold import fold_onnx
    from sample_models import zoo

    lines = [
        f"| model | verify ({args.provider}) | fold error / noise | bench ORT_DISABLE_ALL original → folded | bench ORT_ENABLE_ALL original → folded |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        models = sorted((ROOT / "sample_models").glob("*.onnx"))
        if not args.skip_large:
            large = Path(tmp) / "resnet50_size.onnx"
            onnx.save(zoo.resnet50_size(), large)
            models.append(large)
        for path in models:
            model, report = fold_onnx(path)
            if not report.folded:
                lines.append(f"| {path.stem} | nothing folded | - | - | - |")
                continue
            folded = Path(tmp) / f"{path.stem}.folded.onnx"
            onnx.save(model, folded)
            lines.append(row(path.stem, path, folded, args.repeats, args.provider))
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), {platform.machine()}; "
              f"bench: {args.repeats} repeats, medians."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
