"""`bnfold check`: the CI gate. A dry run of the fold over many models; never writes a file."""

from __future__ import annotations

import sys

import click

from bnfold.cli._common import one_line_errors, output_options


@click.command(
    epilog="""\b
Examples:
  bnfold check models/                          every *.onnx below models/
  bnfold check 'exports/**/*.onnx' -j 4         a glob (quoted: bnfold expands it), 4 processes
  bnfold check model.onnx --strict              also fail on BatchNorms that cannot be folded
  bnfold check models/ --allow 'head/*_bn'      accept these BatchNorm nodes knowingly
  bnfold check models/ --format github          GitHub Actions annotations
  bnfold check models/ --json > report.json     the same as --format json
  bnfold check -q models/                       only the exit code (and errors)

\b
Exit codes: 0 no foldable BatchNorm left; 1 one is left (with --strict: any BatchNorm);
2 an input cannot be read (every other model is still checked and reported).
"""
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--strict", is_flag=True, help="Also fail on BatchNorms that cannot be folded (models meant to be BN-free).")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="PATTERN",
    help="Accept BatchNorm nodes whose name matches this glob (fnmatch; repeatable); reported as allowed.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "github"]),
    default=None,
    help="text for people [default], json for programs (schema in the docs), github for Actions annotations.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Check models in up to N processes (0: one per CPU); a few MB of models in all are checked in one.",
)
@click.option(
    "--assume-constant",
    is_flag=True,
    help="As for fold: treat initializers that are also graph inputs (IR >= 4) as constants.",
)
@click.option("-v", "--verbose", is_flag=True, help="Text format: also name the models that pass with no BatchNorm left.")
@output_options("The same as --format json.")
@one_line_errors
def check(
    paths: tuple[str, ...],
    strict: bool,
    allow: tuple[str, ...],
    fmt: str | None,
    jobs: int,
    assume_constant: bool,
    verbose: bool,
    as_json: bool,
    quiet: bool,
    progress: bool | None,
) -> None:
    """Fail when a BatchNorm that `bnfold fold` would fold is left in any model.

    PATH: .onnx files, directories (searched recursively for *.onnx) and globs. The check runs the
    fold's own finder as a dry run, so it calls foldable exactly what the fold folds.
    """
    from bnfold.check import check_paths, expand_paths, render
    from bnfold.check.render import render_errors
    from bnfold.cli._progress import Progress, wanted
    from bnfold.errors import UsageError

    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json and --format {fmt} ask for two formats; give one")
    fmt = "json" if as_json else (fmt or "text")
    entries = expand_paths(paths)
    n_models = sum(isinstance(e, str) for e in entries)
    with Progress("checking", total=n_models, enabled=wanted(progress, quiet) and n_models > 0) as bar:
        result = check_paths(paths, strict=strict, allow=allow, assume_constant=assume_constant, jobs=jobs,
                             entries=entries, on_progress=lambda _path: bar.advance())
    if quiet and fmt == "text":
        errors = render_errors(result)
        if errors:  # no output but errors
            click.echo(errors, err=True)
    else:
        click.echo(render(result, fmt, verbose=verbose))
    sys.exit(result.exit_code)
