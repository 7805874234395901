"""`bnfold verify ORIGINAL FOLDED`: compare every output with onnxruntime; exit 0 pass, 1 mismatch, 2 error."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnfold.cli._common import one_line_errors


@click.command(
    epilog="""\b
Examples:
  bnfold verify model.onnx folded.onnx
  bnfold verify model.onnx folded.onnx --trials 6 --shape input:4x3x224x224
  bnfold verify model.onnx folded.onnx --inputs samples.npz --rtol 1e-4
  bnfold verify model.onnx folded.onnx --provider all --json
"""
)
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("folded", type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(["cpu", "cuda", "all"]), default="cpu", show_default=True,
              help="cuda needs the onnxruntime-gpu build; asked for and missing is exit 2.")
@click.option("--trials", type=click.IntRange(1), default=3, show_default=True,
              help="Random input sets, cycling normal, uniform[-1,1] and large-magnitude values.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shape", "shapes", multiple=True, metavar="NAME:D1xD2…", help="Concrete shape of an input (symbolic dims default to 1).")
@click.option("--inputs", type=click.Path(path_type=Path), help="Use these inputs (.npz keyed by input name) instead of random ones.")
@click.option("--rtol", type=float, help="Floor relative to each output's scale, below which an output always passes (default by dtype: fp32 1e-6, fp16 4e-3); above it, 4x the model's measured float noise.")
@click.option("--atol", type=float, help="Absolute tolerance added to rtol·scale (default 0).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@one_line_errors
def verify(original: Path, folded: Path, provider: str, trials: int, seed: int, shapes: tuple[str, ...],
           inputs: Path | None, rtol: float | None, atol: float | None, as_json: bool) -> None:
    """Run ORIGINAL and FOLDED with onnxruntime (both at ORT_DISABLE_ALL) and judge every output against
    ORIGINAL's own float noise, measured in the same run."""
    from bnfold.feeds import parse_shapes
    from bnfold.onnx.io import load_model
    from bnfold.verify import verify_onnx

    for p in (original, folded):  # the same one-line errors as fold for unreadable models
        load_model(p)
    result = verify_onnx(original, folded, provider=provider, trials=trials, seed=seed,
                         shapes=parse_shapes(shapes), inputs=inputs, rtol=rtol, atol=atol)
    if as_json:
        import json

        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(str(result))
    sys.exit(result.return_code)
