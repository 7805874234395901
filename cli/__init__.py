"""The `bnfold` command: a thin click layer over the library.

`bnfold model.onnx -o folded.onnx` is shorthand for `bnfold fold model.onnx -o folded.onnx`. Command
modules are imported only when their command runs (or its help is shown), and the library's heavy
imports (onnx, onnxruntime, torch) happen inside command bodies, so `bnfold --help` stays fast.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute", loaded on first use.
COMMANDS: dict[str, str] = {
    "fold": "bnfold.cli.fold_cmd:fold",
    "check": "bnfold.cli.check_cmd:check",
    "verify": "bnfold.cli.verify_cmd:verify",
    "bench": "bnfold.cli.bench_cmd:bench",
}
DEFAULT_COMMAND = "fold"


class BnfoldGroup(click.Group):
    """A group whose commands load lazily and whose default command is `fold`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a command whose module is not there yet
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attr)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        # `bnfold model.onnx -o out.onnx`: the first word is not a command, so it is fold's argument.
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            args = [DEFAULT_COMMAND, *args]
        return super().resolve_command(ctx, args)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=BnfoldGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  bnfold model.onnx -o folded.onnx          fold, verify on CPU, write
  bnfold check models/                      CI gate: exit 1 if a foldable BatchNorm is left
  bnfold verify model.onnx folded.onnx      compare outputs with onnxruntime
  bnfold bench model.onnx                   latency before/after folding

Exit codes: 0 ok, 1 check failed (foldable BatchNorm left / outputs differ), 2 usage or input error.
""",
)
@click.version_option(package_name="bnfold", prog_name="bnfold")
def main() -> None:
    """Fold BatchNorm into neighbouring Conv/ConvTranspose/Gemm/MatMul layers, provably exactly."""
