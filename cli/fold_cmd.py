"""`bnfold fold` (also plain `bnfold MODEL`): fold, verify, write atomically, print the report."""

from __future__ import annotations

import os
import sys
import tempfile
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
    from bnfold.onnx.api import default_output_path
    from bnfold.onnx.io import check_writable, load_model_and_layout

    target = _output_path(model, output, in_place, default_output_path, UsageError)
    # External tensors stay on disk (read when folded, streamed when written): memory stays near the
    # size of what the fold changes, whatever the model's size.
    original, had_external = load_model_and_layout(model, load_data=False)
    check_writable(target)
    external = {"always": True, "never": False}.get(external_data)
    if external is None:
        external = had_external or None  # None: inline unless over 2 GB
    if not had_external:
        _fold_and_write(model, original, target, external, None, assume_constant, verify, as_json, quiet)
        return
    # Folded weights of a model kept in external data go to a spill file beside the output, then are
    # streamed into the output's data file: memory stays bounded whatever the model's size.
    with tempfile.TemporaryDirectory(prefix=".bnfold-spill-", dir=target.parent) as spill:
        _fold_and_write(model, original, target, external, spill, assume_constant, verify, as_json, quiet)


def _fold_and_write(
    model: Path, original, target: Path, external: bool | None, spill: str | None,
    assume_constant: bool, verify: bool, as_json: bool, quiet: bool,
) -> None:
    """Fold, write through a temporary file, verify that file, rename; exits with the code."""
    from bnfold.errors import VerificationError
    from bnfold.onnx.api import fold_onnx
    from bnfold.onnx.io import save_model

    folded, report = fold_onnx(original, assume_constant=assume_constant, spill_dir=spill)
    report.source = str(model)
    checked: list = []

    def verify_before_commit(written: str) -> None:
        """Compare the written files with the input, before they are renamed into place."""
        from bnfold.verify import verify_onnx

        checked.append(verify_onnx(model, written))
        checked[-1].folded = str(target)  # the name it is about to get, not the temporary one
        if not checked[-1].passed:
            raise VerificationError("verification failed")

    hook = verify_before_commit if verify and report.folded else None
    try:
        save_model(folded, target, external_data=external, keep_data=False, before_commit=hook)
    except VerificationError:
        _emit(report, checked[-1], as_json, quiet=False, written=None)
        click.echo(f"bnfold: verification failed; nothing written to {target}", err=True)
        sys.exit(EXIT_CHECK_FAILED)
    _emit(report, checked[-1] if checked else None, as_json, quiet, written=target)
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
