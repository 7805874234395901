"""Fold a generated model over 2 GB kept in external data; report time and peak memory.

    python benchmarks/large_model.py [--gb 2.2] [--workdir DIR]

Builds a chain of 1x1 Conv(1024→1024) → BatchNorm blocks (random weights and statistics) until the
weights pass the size asked for, saves it with external data, then in a fresh process loads, folds
and saves it the way `bnfold model.onnx -o out.onnx --no-verify` does, and reports wall time and peak
resident memory (ru_maxrss) next to the size of the weights. Verification is left out here: onnxruntime
holds its own copy of both models, which measures onnxruntime rather than the fold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

C = 1024


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
        stats = [rng.standard_normal(C) * 0.5 + 1, rng.standard_normal(C) * 0.1, rng.standard_normal(C) * 0.1, rng.uniform(0.5, 2, C)]
        for name, v in zip(("scale", "bias", "mean", "var"), stats):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{name}"))
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *(f"bn{i}.{n}" for n in ("scale", "bias", "mean", "var"))], [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, 4, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    return blocks


def fold_in_this_process(src: str, dst: str) -> None:
    from bnfold.onnx.api import fold_onnx
    from bnfold.onnx.io import load_model_and_layout, save_model

    start = time.perf_counter()
    model, external = load_model_and_layout(src)
    loaded = time.perf_counter()
    folded, report = fold_onnx(model)
    del model
    folded_at = time.perf_counter()
    save_model(folded, dst, external_data=external or None, keep_data=False)
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": loaded - start, "fold_s": folded_at - loaded, "save_s": end - folded_at, "total_s": end - start,
                      "peak_rss_bytes": peak, "folded": report.folded, "left": report.left}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--_fold", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._fold:
        fold_in_this_process(*args._fold)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bnfold-large-"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "large.onnx", work / "large.folded.onnx"
    t = time.perf_counter()
    blocks = build(src, args.gb)
    weights = sum(f.stat().st_size for f in work.glob("large.onnx*"))
    print(f"built {blocks} Conv→BN blocks, {weights / 2**30:.2f} GiB on disk, in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    out = subprocess.run([sys.executable, __file__, "--_fold", str(src), str(dst)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    import onnx

    print("| model | BN folded | load | fold | save | total | peak RSS | peak / weights |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {blocks}× Conv1x1({C}→{C})→BN, {weights / 2**30:.2f} GiB external data | {r['folded']} | {r['load_s']:.1f}s | "
          f"{r['fold_s']:.1f}s | {r['save_s']:.1f}s | {r['total_s']:.1f}s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
          f"{r['peak_rss_bytes'] / weights:.2f}× |")
    print(f"\nmachine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, onnx {onnx.__version__}, numpy {np.__version__}")
    print(f"command: python benchmarks/large_model.py --gb {args.gb}")
    for f in work.glob("large*"):
        f.unlink()


if __name__ == "__main__":
    main()
