"""Fold a generated model over 2 GB kept in external data; report time and peak memory.

    python benchmarks/large_model.py [--gb 2.2] [--workdir DIR]

Builds a chain of 1x1 Conv(4096→4096) → BatchNorm → Relu blocks (random weights and statistics) until the
weights pass the size asked for, saves it with external data, then runs `bnfold large.onnx -o
out.onnx --no-verify` in a fresh process and reports its wall time and peak resident memory (ru_maxrss)
next to the size of the weights. `--verify` adds the default run, which also compares outputs with
onnxruntime — whose sessions hold both models in memory, so that figure measures onnxruntime too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

C = 4096


def build(path: Path, gb: float, seed: int = 0) -> int:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    per_block = C * C * 4
    blocks = int(np.ceil(gb * 2**30 / per_block))
    nodes, inits = [], []
    x = "input"
    for i in range(blocks):
        w = (rng.standard_normal((C, C, 1, 1), dtype=np.float32) * (1.0 / np.sqrt(C))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"conv{i}.w"))
        stats = [rng.standard_normal(C) * 0.5 + 1.4, rng.standard_normal(C) * 0.1, rng.standard_normal(C) * 0.1, rng.uniform(0.5, 2, C)]
        for name, v in zip(("scale", "bias", "mean", "var"), stats):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{name}"))
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *(f"bn{i}.{n}" for n in ("scale", "bias", "mean", "var"))], [f"b{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"y{i}"], name=f"relu{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, 2, 2])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    return blocks


def run_cli(args: list[str]) -> tuple[float, int, dict]:
    """Wall time and peak RSS of one `bnfold` run in a fresh process (its own, not this one's)."""
    code = (
        "import sys, time\n"
        "from bnfold.cli import main\n"
        "t = time.perf_counter()\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report this script's own peak
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('BENCH', time.perf_counter() - t, hwm * 1024, rc, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    line = next(l for l in proc.stderr.splitlines() if l.startswith("BENCH"))
    _, seconds, rss, rc = line.split()
    if rc != "0":
        raise SystemExit(f"bnfold failed ({rc}): {proc.stderr[-2000:]}")
    return float(seconds), int(rss), json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--verify", action="store_true", help="also time the default run, which verifies with onnxruntime")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bnfold-large-"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "large.onnx", work / "large.folded.onnx"
    t = time.perf_counter()
    blocks = build(src, args.gb)
    weights = sum(f.stat().st_size for f in work.glob("large.onnx*"))
    print(f"built {blocks} Conv→BN blocks, {weights / 2**30:.2f} GiB on disk, in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    runs = [("bnfold large.onnx -o out.onnx --no-verify", [str(src), "-o", str(dst), "--no-verify", "--json"])]
    if args.verify:
        runs.append(("bnfold large.onnx -o out.onnx (verifies)", [str(src), "-o", str(dst), "--json"]))
    import onnx

    print("| command | BN folded | wall time | peak RSS | peak / weights |")
    print("|---|---|---|---|---|")
    for label, cli_args in runs:
        seconds, rss, report = run_cli(cli_args)
        print(f"| `{label}` | {report['batchnorms_folded']} / {report['batchnorms_found']} | {seconds:.1f} s | "
              f"{rss / 2**30:.2f} GiB | {rss / weights:.2f}× |")
    print(f"\nmodel: {blocks}× Conv1x1({C}→{C}) → BatchNorm → Relu, {weights / 2**30:.2f} GiB of weights in external data")
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, onnx {onnx.__version__}, numpy {np.__version__}")
    print(f"command: python benchmarks/large_model.py --gb {args.gb}" + (" --verify" if args.verify else ""))
    for f in work.glob("large*"):
        f.unlink()


if __name__ == "__main__":
    main()
