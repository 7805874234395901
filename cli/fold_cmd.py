"""`bnfold fold` (also plain `bnfold MODEL [OUTPUT]`): fold, verify, write atomically, print the report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from bnfold.cli._common import (
    VERIFY_KEYS,
    given,
    one_line_errors,
    output_options,
    verification_kwargs,
    verification_options,
)
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK

MODEL_SUFFIX = ".onnx"


@click.command(
    epilog="""\b
Examples:
  bnfold model.onnx -o folded.onnx
  bnfold model.onnx folded.onnx                     (OUTPUT as a second word)
  bnfold -q -o folded.onnx model.onnx               (options before the model)
  bnfold fold model.onnx --json > report.json       (writes model.folded.onnx)
  bnfold model.onnx -o out.onnx --shape input:8x3x224x224 --trials 6
  bnfold model.onnx --in-place --no-verify
  bnfold old_ir3_model.onnx -o out.onnx --assume-constant
"""
)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.argument("output_arg", metavar="[OUTPUT]", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the folded model [default: MODEL.folded.onnx].")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL itself (atomically).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare outputs with onnxruntime before writing (options below, as for `bnfold verify`).")
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
    help="Tensors in OUTPUT.data beside the output: auto = as the input had them, or when over 2 GB.",
)
@click.option("--force", is_flag=True, help="Overwrite a .data file bnfold did not write (or the input's own).")
@verification_options("verify before writing")
@output_options("Print the report (and the verification) as JSON on stdout.")
@click.pass_context
@one_line_errors
def fold(ctx: click.Context, model: Path, output_arg: Path | None, output: Path | None, in_place: bool, verify: bool,
         assume_constant: bool, external_data: str, force: bool, as_json: bool, quiet: bool, progress: bool | None,
         **verification: object) -> None:
    """Fold every foldable BatchNorm of MODEL (an .onnx file) and write the result to OUTPUT.

    The fold is verified against the original with onnxruntime (the same check as `bnfold verify`,
    with the same options) before anything is written; on a mismatch nothing is written and the exit
    code is 1.
    """
    from bnfold.cli._progress import Progress, wanted
    from bnfold.errors import UsageError
    from bnfold.onnx.api import default_output_path, fold_file
    from bnfold.verify import NotEquivalent, VerifyOptions

    target = _output_path(model, _one_output(output_arg, output, UsageError), in_place, default_output_path, UsageError)
    verify_kwargs = _verification(ctx, verify, verification, UsageError)
    data_before = _data_state(target)

    with Progress(f"folding {model}", enabled=wanted(progress, quiet)) as bar:

        def show_phase(written: str, report) -> None:
            """Runs on the written file just before the library verifies it (fold_file's own step)."""
            verifying = verify_kwargs is not None and report.folded
            bar.phase(f"{'verifying' if verifying else 'writing'} {target}")

        external = {"always": True, "never": False}.get(external_data)  # None: as the input had it
        try:
            report = fold_file(model, target, assume_constant=assume_constant, external_data=external,
                               before_commit=show_phase, force=force,
                               verify=VerifyOptions(**verify_kwargs) if verify_kwargs is not None else False)
        except NotEquivalent as failed:
            report = failed
    if isinstance(report, NotEquivalent):
        _emit(report.report, report.verification, as_json, quiet=False, written=None)
        click.echo(f"bnfold: verification failed; nothing written to {target}", err=True)
        sys.exit(EXIT_CHECK_FAILED)
    _emit(report, report.verification, as_json, quiet, written=target, data=_data_file(target, data_before))
    sys.exit(EXIT_OK)


def _one_output(positional: Path | None, option: Path | None, usage_error) -> Path | None:
    """OUTPUT and -o are two spellings of one thing: give one, or the same file twice."""
    if positional is not None and option is not None and positional != option:
        raise usage_error(f"OUTPUT {positional} and -o {option} name different files; give one of them")
    return option if option is not None else positional


def _output_path(model: Path, output: Path | None, in_place: bool, default, usage_error) -> Path:
    if in_place and output is not None and not _same(model, output):
        raise usage_error("--in-place and -o name different files; give one of them")
    if in_place:
        return model
    if output is not None:
        _check_suffix(output, usage_error)
    target = output if output is not None else default(model)
    if _same(model, target):
        raise usage_error(f"{target} is the input model; pass --in-place to overwrite it")
    return target


def _check_suffix(output: Path, usage_error) -> None:
    """The output is a binary ONNX model: `-o report.json` is a mistake, not a request for JSON."""
    if output.suffix.lower() != MODEL_SUFFIX:
        what = f"'{output.suffix}'" if output.suffix else "no suffix"
        hint = "; for a JSON report use --json" if output.suffix.lower() == ".json" else ""
        raise usage_error(f"{output}: the output is an ONNX model and must end in {MODEL_SUFFIX} (got {what}){hint}")


def _verification(ctx: click.Context, verify: bool, options: dict, usage_error) -> dict | None:
    """verify_onnx's keywords, or None with --no-verify (where a verification option is a mistake)."""
    if not verify:
        typed = given(ctx, *VERIFY_KEYS)
        if typed:
            flags = ", ".join("--shape" if k == "shapes" else f"--{k}" for k in typed)
            verb = "configures" if len(typed) == 1 else "configure"
            raise usage_error(f"{flags} {verb} the verification, which --no-verify turns off")
        return None
    kwargs = verification_kwargs(options)
    from bnfold.providers import choose

    choose(kwargs["provider"])  # exit 2 before any work when the provider is missing
    return kwargs


def _data_state(target: Path) -> tuple[int, int] | None:
    """(inode, mtime) of the external-data file beside ``target``, or None when there is none."""
    try:
        st = target.with_name(target.name + ".data").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _data_file(target: Path, before: tuple[int, int] | None) -> Path | None:
    """The external-data file this run wrote beside the model, if it wrote one (not one left from before)."""
    after = _data_state(target)
    return target.with_name(target.name + ".data") if after is not None and after != before else None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _emit(report, verification, as_json: bool, quiet: bool, written: Path | None, data: Path | None = None) -> None:
    if as_json:
        import json

        out = report.to_dict()
        out["output"] = str(written) if written else None
        out["output_data"] = str(data) if data else None
        out["verification"] = verification.to_dict() if verification is not None else None
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    if quiet:
        return
    click.echo(str(report))
    if verification is not None:
        click.echo(str(verification))
    if written is not None:
        click.echo(f"wrote {written}" + (f" (+ {data})" if data else ""))
