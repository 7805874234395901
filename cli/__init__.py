"""The `bnfold` command: a thin click layer over the library.

`bnfold model.onnx -o folded.onnx` runs `bnfold fold model.onnx -o folded.onnx`: when the first word
is not a command, the whole command line is fold's, so its options may come before or after the model
(`bnfold -q -o out.onnx model.onnx`) and the output may be a second word (`bnfold in.onnx out.onnx`),
as with onnxsim and onnxslim. A first word that is neither a command nor a file that exists, and looks
like a command, is answered "no such command 'foldd' (did you mean fold?)" rather than "no such file".

Command modules are imported only when their command runs (or its help is shown), and the library's
heavy imports (onnx, onnxruntime, torch) happen inside command bodies, so `bnfold --help` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
import os

import click

from bnfold.errors import EXIT_USAGE

# name -> "module:attribute", loaded on first use.
COMMANDS: dict[str, str] = {
    "fold": "bnfold.cli.fold_cmd:fold",
    "check": "bnfold.cli.check_cmd:check",
    "verify": "bnfold.cli.verify_cmd:verify",
    "bench": "bnfold.cli.bench_cmd:bench",
}
DEFAULT_COMMAND = "fold"
GROUP_OPTIONS = frozenset({"-h", "--help", "--version"})


class BnfoldGroup(click.Group):
    """A group whose commands load lazily and whose default command, `fold`, takes the whole line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in COMMANDS and args[0] not in GROUP_OPTIONS:
            refuse_mistyped_command(args[0])
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def refuse_mistyped_command(word: str) -> None:
    """Exit 2 with "no such command" when ``word`` is meant as a command, not a model path.

    It is taken for a path when it is an option, exists, or looks like a path (a separator or a dot);
    otherwise a close command name is suggested, as git does.
    """
    if word.startswith("-") or os.path.lexists(word) or os.sep in word or "/" in word or "." in word:
        return
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.5)
    if close:
        message = f"no such command {word!r} (did you mean {close[0]}?)"
    else:
        message = f"no such command or model file {word!r} (commands: {', '.join(COMMANDS)})"
    click.echo(f"bnfold: error: {message}", err=True)
    raise SystemExit(EXIT_USAGE)


@click.group(
    cls=BnfoldGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  bnfold model.onnx -o folded.onnx          fold, verify on CPU, write
  bnfold in.onnx out.onnx                   the same (onnxsim/onnxslim habit)
  bnfold -q --no-verify -o out.onnx in.onnx options before the model work too
  bnfold check models/                      CI gate: exit 1 if a foldable BatchNorm is left
  bnfold verify model.onnx folded.onnx      compare outputs with onnxruntime
  bnfold bench model.onnx                   latency before/after folding

\b
Every command: --json (machine-readable result), -q (no output but errors),
--progress/--no-progress (progress line on stderr; by default on a terminal only).
Exit codes: 0 ok, 1 check failed (foldable BatchNorm left / outputs differ), 2 usage or input error.
""",
)
@click.version_option(package_name="bnfold", prog_name="bnfold")
def main() -> None:
    """Fold BatchNorm into neighbouring Conv/ConvTranspose/Gemm/MatMul layers, provably exactly.

    With no command, the arguments are fold's: bnfold MODEL [OUTPUT] [OPTIONS].
    """
