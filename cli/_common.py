"""What the commands share: one-line errors, and the option stacks that give them one vocabulary.

Every command spells the same idea the same way: ``--json`` for a machine-readable result on stdout,
``-q/--quiet`` for no output but errors, ``--progress/--no-progress`` for the progress line (by
default on a terminal only), and `verification_options` (``--shape``, ``--inputs``, ``--trials``,
``--rtol``, ``--atol``, ``--provider``, ``--seed``) wherever outputs are compared: ``verify`` and
``fold`` take the very same options and hand them to `bnfold.verify.verify_onnx` by keyword.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from bnfold.errors import BnfoldError

F = TypeVar("F", bound=Callable[..., Any])

VERIFY_KEYS = ("provider", "trials", "seed", "shapes", "inputs", "rtol", "atol")
"""The options in `verification_options`, by the keyword `verify_onnx` takes them with."""


def one_line_errors(func: F) -> F:
    """Turn the library's expected errors into a one-line message and their exit code, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BnfoldError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            click.echo("bnfold: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def fail(message: str, exit_code: int) -> None:
    """The one-line error every command ends with when it cannot do what was asked."""
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(exit_code)


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def output_options(json_help: str = "Print the result as JSON on stdout.") -> Callable[[F], F]:
    """``--json``, ``-q/--quiet``, ``--progress/--no-progress``: the same three in every command."""
    return _stack(
        click.option("--json", "as_json", is_flag=True, help=json_help),
        click.option("-q", "--quiet", is_flag=True,
                     help="No output but errors (a format asked for, such as --json, is still printed)."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress line on stderr [default: only when stderr is a terminal, never in CI logs]."),
    )


def verification_options(what: str = "compare") -> Callable[[F], F]:
    """The options of an onnxruntime comparison, shared by ``verify`` and ``fold`` (see `VERIFY_KEYS`)."""
    return _stack(
        click.option("--provider", type=click.Choice(["cpu", "cuda", "all"]), default="cpu", show_default=True,
                     help=f"Where to {what}: cuda needs the onnxruntime-gpu build; asked for and missing is exit 2."),
        click.option("--trials", type=click.IntRange(1), default=3, show_default=True,
                     help="Random input sets, cycling normal, uniform[-1,1] and large-magnitude values."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."),
        click.option("--shape", "shapes", multiple=True, metavar="NAME:D1xD2…",
                     help="Concrete shape of an input (symbolic dims default to 1); repeatable."),
        click.option("--inputs", type=click.Path(path_type=Path),
                     help="Use these inputs (.npz keyed by input name) instead of random ones."),
        click.option("--rtol", type=float,
                     help="Floor relative to each output's scale, below which an output always passes (default by "
                          "dtype: fp32 1e-6, fp16 4e-3); above it, 4x the model's measured float noise."),
        click.option("--atol", type=float, help="Absolute tolerance added to rtol·scale (default 0)."),
    )


def verification_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """The `verification_options` values as `bnfold.verify.verify_onnx` keywords (shapes parsed)."""
    from bnfold.feeds import parse_shapes

    kwargs = {key: params[key] for key in VERIFY_KEYS}
    kwargs["shapes"] = parse_shapes(kwargs["shapes"])
    return kwargs


def given(ctx: click.Context, *names: str) -> list[str]:
    """Which of these parameters were typed on the command line (not defaults)."""
    from click.core import ParameterSource

    return [n for n in names if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]
