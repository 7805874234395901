"""How verification decides, in figures: fold error vs the model's own float noise on deep networks.

    python benchmarks/verify_noise.py [--trials 3] [--seed 0] [--corruptions 12] [--out FILE]

For each network of `sample_models.deep` (trained-like BN statistics), exported by the TorchScript and
the dynamo exporters with their BatchNorms kept, it folds with `bnfold.fold_onnx`, verifies with
`bnfold.verify_onnx` and prints, per model (the output and trial with the largest fold error):

* **fold error**: max |folded − original| / max |original|;
* the two noise measures: onnxruntime's own optimisation (ORT_ENABLE_ALL vs ORT_DISABLE_ALL of the
  original) and ±1 ulp at random signs on every arithmetic parameter of the original;
* **fold/noise** on that trial, the largest fold error / allowed over all outputs and trials (the
  margin: a correct fold must stay below 1), what the criterion allows (factor × noise, or the
  dtype's floor), the verdict, and what the former fixed rule (max error
  ≤ 1e-5 of scale in float32, any trial) would have said;
* the **×1.001 corruption**: output channel 0 of up to ``--corruptions`` conv weights of the *folded*
  model (evenly spaced through the network), each multiplied by 1.001. Its effect is
  max |corrupted − folded| / scale; "≥10×" counts the corruptions whose effect on some output and trial
  was at least 10× the noise floor that output was held against (allowed / factor), "caught" how many
  of those the verification failed (it must be all), and "caught, all" how many of every corruption.

A script, not a test: about a minute on 2 cores. Needs torch (and onnxscript for the dynamo export).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `sample_models` lives at the repo root
    sys.path.insert(0, str(ROOT))

from bnfold import fold_onnx, verify_onnx  # noqa: E402
from bnfold.criterion import NOISE_FACTOR  # noqa: E402
from bnfold.feeds import input_specs, random_feeds  # noqa: E402
from bnfold.sessions import make_session, model_source  # noqa: E402
from bnfold.verify import ORT_NOISE, ULP_NOISE  # noqa: E402
from sample_models import deep  # noqa: E402
from sample_models.corrupt import conv_weights, scale_channel  # noqa: E402

OLD_RTOL = 1e-5


def _effects(original: Path, good, bad, trials: int, seed: int) -> list[list[float]]:
    """Per output, per trial: max |bad − good| / max |original| on that trial's inputs."""
    sa, sg, sb = (make_session(model_source(m)) for m in (str(original), good, bad))
    specs = input_specs(sa)
    out: list[list[float]] = []
    for trial in range(trials):
        _, feeds = random_feeds(specs, trial, seed)
        for k, (a, g, b) in enumerate(zip(sa.run(None, feeds), sg.run(None, feeds), sb.run(None, feeds))):
            if len(out) <= k:
                out.append([])
            out[k].append(float(np.max(np.abs(b.astype(np.float64) - g)) / np.max(np.abs(a))))
    return out


def measure(path: Path, trials: int, seed: int, corruptions: int) -> dict:
    folded, report = fold_onnx(path)
    result = verify_onnx(path, folded, trials=trials, seed=seed)
    figures = [(o, t) for o in result.outputs["cpu"] for t in o.trials]
    o, t = max(figures, key=lambda ot: ot[1].fold_error)
    row = {
        "folded": f"{report.folded}/{report.found}",
        "fold_error": t.fold_error,
        "ort": t.noise_by_source.get(ORT_NOISE, 0.0),
        "ulp": t.noise_by_source.get(ULP_NOISE, 0.0),
        "ratio": t.fold_error / t.noise if t.noise else float("inf"),
        "allowed": t.allowed,
        "verdict": "equivalent" if result.passed else "DIFFERENT",
        "old": "pass" if all(x.max_rel_to_scale <= OLD_RTOL for x in result.outputs["cpu"]) else "FAIL",
        "worst_ratio": max(x.fold_error / x.noise for _, x in figures if x.noise),
        "worst_allowed": max(x.fold_error / x.allowed for _, x in figures),
    }
    weights = conv_weights(folded)
    k = min(corruptions, len(weights))
    pick = sorted({round(i * (len(weights) - 1) / max(1, k - 1)) for i in range(k)})
    shown = caught_shown = caught = 0
    ratios: list[float] = []
    for i in pick:
        bad = scale_channel(folded, weights[i], 0, 1.001)
        verdict = verify_onnx(path, bad, trials=trials, seed=seed)
        effects = _effects(path, folded, bad, trials, seed)
        best = 0.0
        for out, eff in zip(verdict.outputs["cpu"], effects):
            for tf, e in zip(out.trials, eff):
                best = max(best, e / (tf.allowed / NOISE_FACTOR))
        ratios.append(best)
        caught += not verdict.passed
        if best >= 10:
            shown += 1
            caught_shown += not verdict.passed
    row.update(n=len(pick), median_effect=statistics.median(ratios) if ratios else 0.0, shown=shown,
               caught_shown=caught_shown, caught=caught)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corruptions", type=int, default=12, help="conv weights to corrupt per model")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    lines = [
        f"| model | exporter | BN folded | fold error | {ORT_NOISE} | {ULP_NOISE} | fold/noise | max fold/allowed | allowed ({NOISE_FACTOR:g}×) | verdict | fixed rtol 1e-5 | ×1.001 effect/noise (median) | ≥10×: caught | caught, all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in deep.NETS:
            for exporter in deep.EXPORTERS:
                try:
                    path = deep.export(name, exporter, tmp, args.seed)
                except Exception as exc:  # the dynamo exporter needs onnxscript
                    lines.append(f"| {name} | {exporter} | export failed: {str(exc).splitlines()[0][:80]} |")
                    continue
                r = measure(path, args.trials, args.seed, args.corruptions)
                worst = max(worst, r["worst_ratio"])
                lines.append(
                    f"| {name} | {exporter} | {r['folded']} | {r['fold_error']:.2g} | {r['ort']:.2g} | {r['ulp']:.2g} | "
                    f"{r['ratio']:.2f} | {r['worst_allowed']:.2f} | {r['allowed']:.2g} | {r['verdict']} | {r['old']} | {r['median_effect']:.1f} | "
                    f"{r['caught_shown']}/{r['shown']} | {r['caught']}/{r['n']} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    import onnxruntime
    import torch

    lines += [
        "",
        f"Errors relative to the output's largest magnitude, on the output and trial with the largest fold error. "
        f"Largest fold/noise over every model, output and trial: {worst:.2f} (the factor is {NOISE_FACTOR:g}).",
        f"{args.trials} trials (normal, uniform, large), seed {args.seed}; onnxruntime {onnxruntime.__version__}, "
        f"torch {torch.__version__}, {platform.machine()}.",
        f"Command: python benchmarks/verify_noise.py {shlex.join(sys.argv[1:])}".rstrip(),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
