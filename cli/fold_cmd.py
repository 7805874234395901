"""`bnfold fold` (also plain `bnfold MODEL`): fold, verify, write atomically, print the report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from bnfold.cli._common import one_line_errors
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK


@click.command(
    epilog="""\b
Examples:
  bnfold model.onnx -o folded.onnx
  bnfold fold model.onnx --json > report.json       (writes model.folded.onnx)
  bnfold model.onnx --in-place --no-verify
  bnfold old_ir3_model.onnx -o out.onnx --assume-constant
"""
)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the folded model [default: MODEL.folded.onnx].")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL itself (atomically).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare outputs with onnxruntime (CPU) before writing.")
@click.option(
    "--assume-constant",
    is_flag=True,
    help="Fold initializers that are also graph inputs (IR >= 4): promise that no caller overrides them.",
)
@click.option(
    "--external-data",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Tensors in MODEL.data beside the output: auto = as the input had them, or when over 2 GB.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@one_line_errors
def fold(
    model: Path,
    output: Path | None,
    in_place: bool,
    verify: bool,
    assume_constant: bool,
    external_data: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Fold every foldable BatchNorm of MODEL (an .onnx file) and write the result.

    The fold is verified against the original with onnxruntime on CPU before anything is written; on a
    mismatch nothing is written and the exit code is 1.
    """
    from bnfold.errors import UsageError
    from bnfold.onnx.api import default_output_path, fold_file
    from bnfold.verify import NotEquivalent, VerifyOptions

    target = _output_path(model, output, in_place, default_output_path, UsageError)
    external = {"always": True, "never": False}.get(external_data)  # None: as the input had it
    try:
        report = fold_file(model, target, assume_constant=assume_constant, external_data=external,
                           verify=VerifyOptions() if verify else False)
    except NotEquivalent as failed:
        _emit(failed.report, failed.verification, as_json, quiet=False, written=None)
        click.echo(f"bnfold: verification failed; nothing written to {target}", err=True)
        sys.exit(EXIT_CHECK_FAILED)
    _emit(report, report.verification, as_json, quiet, written=target)
    sys.exit(EXIT_OK)


def _output_path(model: Path, output: Path | None, in_place: bool, default, usage_error) -> Path:
    if in_place and output is not None and not _same(model, output):
        raise usage_error("--in-place and -o name different files; give one of them")
    if in_place:
        return model
    target = output if output is not None else default(model)
    if _same(model, target):
        raise usage_error(f"{target} is the input model; pass --in-place to overwrite it")
    return target


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _emit(report, verification, as_json: bool, quiet: bool, written: Path | None) -> None:
    if as_json:
        import json

        data = report.to_dict()
        data["output"] = str(written) if written else None
        data["verification"] = verification.to_dict() if verification is not None else None
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    if quiet:
        return
    click.echo(str(report))
    if verification is not None:
        click.echo(str(verification))
    if written is not None:
        click.echo(f"wrote {written}")
