"""`bnfold check`: the CI gate. A dry run of the fold over many models; never writes a file."""

from __future__ import annotations

import sys

import click

from bnfold.cli._common import one_line_errors

PROGRESS_MIN_MODELS = 8
"""A progress bar (on stderr, only when it is a terminal) from this many models on."""


@click.command(
    epilog="""\b
Examples:
  bnfold check models/                          every *.onnx below models/
  bnfold check 'exports/**/*.onnx' -j 4         a glob (quoted: bnfold expands it), 4 processes
  bnfold check model.onnx --strict              also fail on BatchNorms that cannot be folded
  bnfold check models/ --allow 'head/*_bn'      accept these BatchNorm nodes knowingly
  bnfold check models/ --format github          GitHub Actions annotations

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
    default="text",
    show_default=True,
    help="text for people, json for programs (schema in the docs), github for Actions annotations.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Check models in N parallel processes (0: one per CPU).",
)
@click.option(
    "--assume-constant",
    is_flag=True,
    help="As for fold: treat initializers that are also graph inputs (IR >= 4) as constants.",
)
@click.option("-v", "--verbose", is_flag=True, help="Text format: also name the models that pass with no BatchNorm left.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr when it is a terminal and there are many models.")
@one_line_errors
def check(
    paths: tuple[str, ...],
    strict: bool,
    allow: tuple[str, ...],
    fmt: str,
    jobs: int,
    assume_constant: bool,
    verbose: bool,
    progress: bool,
) -> None:
    """Fail when a BatchNorm that `bnfold fold` would fold is left in any model.

    PATH: .onnx files, directories (searched recursively for *.onnx) and globs. The check runs the
    fold's own finder as a dry run, so it calls foldable exactly what the fold folds.
    """
    from bnfold.check import check_paths, expand_paths, render

    entries = expand_paths(paths)
    n_models = sum(isinstance(e, str) for e in entries)
    stderr = _stderr()
    if progress and n_models >= PROGRESS_MIN_MODELS and stderr.isatty():
        with click.progressbar(length=n_models, label="checking", file=stderr) as bar:
            result = check_paths(
                paths, strict=strict, allow=allow, assume_constant=assume_constant, jobs=jobs,
                entries=entries, on_progress=lambda _path: bar.update(1),
            )
    else:
        result = check_paths(paths, strict=strict, allow=allow, assume_constant=assume_constant, jobs=jobs, entries=entries)
    click.echo(render(result, fmt, verbose=verbose))
    sys.exit(result.exit_code)


def _stderr():
    """Where the progress bar goes (a function, so tests can stand in a terminal)."""
    return sys.stderr
