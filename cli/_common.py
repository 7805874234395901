"""Helpers shared by the commands: error handling and output writing."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import click

from bnfold.errors import BnfoldError

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(func: F) -> F:
    """Turn the library's expected errors into a one-line message and their exit code, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BnfoldError as exc:
            click.echo(f"bnfold: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("bnfold: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
