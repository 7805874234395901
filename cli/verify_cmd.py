"""`bnfold verify ORIGINAL FOLDED`: compare every output with onnxruntime; exit 0 pass, 1 mismatch, 2 error."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnfold.cli._common import one_line_errors, output_options, verification_kwargs, verification_options


@click.command(
    epilog="""\b
Examples:
  bnfold verify model.onnx folded.onnx
  bnfold verify model.onnx folded.onnx --trials 6 --shape input:4x3x224x224
  bnfold verify model.onnx folded.onnx --inputs samples.npz --rtol 1e-4
  bnfold verify model.onnx folded.onnx --provider all --json
  bnfold verify -q model.onnx folded.onnx          only the exit code (and errors)
"""
)
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("folded", type=click.Path(path_type=Path))
@verification_options()
@output_options()
@one_line_errors
def verify(original: Path, folded: Path, as_json: bool, quiet: bool, progress: bool | None, **options: object) -> None:
    """Run ORIGINAL and FOLDED with onnxruntime (both at ORT_DISABLE_ALL) and judge every output against
    ORIGINAL's own float noise, measured in the same run."""
    from bnfold.cli._progress import Progress, wanted
    from bnfold.onnx.io import load_model
    from bnfold.verify import verify_onnx

    kwargs = verification_kwargs(options)
    with Progress(f"verifying {folded}", enabled=wanted(progress, quiet)):
        for p in (original, folded):  # the same one-line errors as fold for unreadable models
            load_model(p)
        result = verify_onnx(original, folded, **kwargs)
    if as_json:
        import json

        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(str(result))
    sys.exit(result.return_code)
