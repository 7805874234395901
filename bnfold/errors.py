"""Errors and exit codes shared by the library and the command layer.

The library raises these; the command layer turns them into one-line messages and exit codes.
No click here: the library must be usable from any program.
"""

from __future__ import annotations

EXIT_OK = 0
"""Everything went as asked."""
EXIT_CHECK_FAILED = 1
"""The check failed: a foldable BatchNorm is left, or a verification found a mismatch."""
EXIT_USAGE = 2
"""Usage or input error: nothing was written."""


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose; its message is one line for the user."""

    exit_code = EXIT_USAGE


class InputError(BnfoldError):
    """The model (or another input) cannot be read or is not a valid model."""


class OutputError(BnfoldError):
    """The result cannot be written where asked."""


class UsageError(BnfoldError):
    """The call itself is wrong (bad option combination, unsupported request)."""


class ProviderUnavailableError(BnfoldError):
    """An execution provider was asked for explicitly but the installed onnxruntime lacks it."""


class VerificationError(BnfoldError):
    """The folded model does not compute what the original computes."""

    exit_code = EXIT_CHECK_FAILED
