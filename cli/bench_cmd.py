"""`bnfold bench ORIGINAL [FOLDED]`: onnxruntime latency of both models at ORT_DISABLE_ALL and ORT_ENABLE_ALL."""

from __future__ import annotations

from pathlib import Path

import click

from bnfold.cli._common import one_line_errors, output_options

LEVEL_CHOICES = {"disable_all": ("disable_all",), "enable_all": ("enable_all",), "both": ("disable_all", "enable_all")}


@click.command(
    epilog="""\b
Levels:
  ORT_DISABLE_ALL  the raw effect of folding (onnxruntime rewrites nothing)
  ORT_ENABLE_ALL   what a deployment sees (onnxruntime fuses Conv+BN itself: expect ~1x there)
\b
Examples:
  bnfold bench model.onnx                          fold in memory, then time both
  bnfold bench model.onnx folded.onnx --repeats 200 --threads 1
  bnfold bench model.onnx --shape input:8x3x224x224 --level disable_all --json
  bnfold bench model.onnx --no-progress            no progress line, even on a terminal
"""
)
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("folded", type=click.Path(path_type=Path), required=False)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "all"]), default="cpu", show_default=True,
              help="cuda needs the onnxruntime-gpu build (timed with I/O binding); asked for and missing is exit 2.")
@click.option("--threads", type=click.IntRange(1), help="Intra-op threads, fixed and reported [default: min(4, CPUs)].")
@click.option("--batch", type=click.IntRange(1), help="Size of the first symbolic dimension of the first input [default: 1].")
@click.option("--repeats", type=click.IntRange(1), default=50, show_default=True, help="Timed runs of each model.")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, help="Untimed runs of each model first.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME:D1xD2…", help="Concrete shape of an input.")
@click.option("--level", type=click.Choice(list(LEVEL_CHOICES)), default="both", show_default=True,
              help="onnxruntime graph optimisation level(s) to time at.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs and the bootstrap interval.")
@output_options("Print the result as JSON (timings of every run included).")
@one_line_errors
def bench(original: Path, folded: Path | None, provider: str, threads: int | None, batch: int | None, repeats: int,
          warmup: int, shapes: tuple[str, ...], level: str, seed: int, as_json: bool, quiet: bool,
          progress: bool | None) -> None:
    """Time ORIGINAL and FOLDED with onnxruntime, interleaved; FOLDED is folded in memory when not given.

    Prints, per level, session-creation time, median/p10/p90 latency and throughput of both models, and
    the speedup median(original)/median(folded) with a 95% bootstrap interval.
    """
    from bnfold.bench import bench_onnx, planned_runs
    from bnfold.cli._progress import Progress, wanted
    from bnfold.feeds import parse_shapes
    from bnfold.providers import choose

    levels = LEVEL_CHOICES[level]
    parsed = parse_shapes(shapes)
    n_providers = len(choose(provider).selected)  # exit 2 here, before any work, when CUDA is missing
    kwargs = dict(provider=provider, levels=levels, threads=threads, batch=batch, repeats=repeats,
                  warmup=warmup, shapes=parsed, seed=seed)
    total = planned_runs(n_providers, len(levels), repeats, warmup)
    with Progress("bnfold bench: model runs", total=total, enabled=wanted(progress, quiet)) as bar:
        result = bench_onnx(original, folded, progress=bar.advance, **kwargs)
    if as_json:
        import json

        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(str(result))
