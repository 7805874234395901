"""onnxruntime latency of a RepVGG-style block stack before and after `bnfold` merges each block into one Conv.

The stack is built here with `onnx.helper` (nothing downloaded, no torch): a stem-free run of `--blocks`
RepVGG blocks, each ``Conv3x3(x)→BN + Conv1x1(x)→BN + BN(x) → Add → Relu`` over `--channels` channels at
`--size`² (the TorchScript export of a training-time RepVGG stage, trained-like BatchNorm statistics).
The script folds it with `bnfold.fold_file` (the `reparam` rule merges 3 branches → 1 Conv per block),
checks the outputs at ORT_DISABLE_ALL, then runs `bnfold bench ORIGINAL FOLDED` (both levels) and prints
its table. onnxruntime fuses Conv+BatchNorm at ORT_ENABLE_ALL, but not the three branches into one
Conv: the merged model stays faster there.

    python benchmarks/reparam_speed.py                          # 12 blocks, 64 ch, 56², batch 1
    python benchmarks/reparam_speed.py --repeats 100 --threads 1 --keep /tmp/rep
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def bn(x: str, y: str, name: str, c: int, rng: np.random.Generator) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    gamma = rng.standard_normal(c) * 0.5
    gamma[::3] *= -1
    stats = {
        "scale": gamma,
        "bias": rng.standard_normal(c) * 0.2,
        "mean": rng.standard_normal(c) * 0.5,
        "var": np.exp(rng.uniform(np.log(1e-3), np.log(4.0), c)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in stats.items()]
    return helper.make_node("BatchNormalization", [x, *(f"{name}.{k}" for k in stats)], [y], name=name), inits


def repvgg_stack(blocks: int, c: int, size: int, batch: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i in range(blocks):
        p = f"block{i}"
        for k, tag in ((3, "kxk"), (1, "scale")):
            w = rng.standard_normal((c, c, k, k)) * np.sqrt(2.0 / (c * k * k))
            inits.append(numpy_helper.from_array(w.astype(np.float32), f"{p}.{tag}.w"))
            nodes.append(helper.make_node("Conv", [x, f"{p}.{tag}.w"], [f"{p}.{tag}.c"], name=f"{p}.{tag}.conv", pads=[k // 2] * 4))
            node, bi = bn(f"{p}.{tag}.c", f"{p}.{tag}.y", f"{p}.{tag}.bn", c, rng)
            nodes.append(node)
            inits += bi
        nodes.append(helper.make_node("Add", [f"{p}.kxk.y", f"{p}.scale.y"], [f"{p}.sum"], name=f"{p}.add"))
        node, bi = bn(x, f"{p}.id", f"{p}.identity", c, rng)
        nodes.append(node)
        inits += bi
        nodes.append(helper.make_node("Add", [f"{p}.sum", f"{p}.id"], [f"{p}.pre"], name=f"{p}.add_id"))
        y = "output" if i == blocks - 1 else f"{p}.out"
        nodes.append(helper.make_node("Relu", [f"{p}.pre"], [y], name=f"{p}.relu"))
        x = y
    shape = [batch, c, size, size]
    graph = helper.make_graph(
        nodes,
        "repvgg_stack",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write the two models here instead of a temporary folder")
    args = ap.parse_args()

    from bnfold import fold_onnx
    from bnfold.verify import verify_onnx

    work = args.keep or Path(tempfile.mkdtemp(prefix="reparam_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    original, folded = work / "repvgg_stack.onnx", work / "repvgg_stack_merged.onnx"
    model = repvgg_stack(args.blocks, args.channels, args.size, args.batch)
    onnx.save(model, original)
    merged, report = fold_onnx(model)
    onnx.save(merged, folded)
    ops = lambda m: {op: [n.op_type for n in m.graph.node].count(op) for op in ("Conv", "BatchNormalization", "Add")}  # noqa: E731
    print(f"model: {args.blocks} RepVGG blocks, {args.channels} channels, {args.size}x{args.size}, batch {args.batch}")
    print(f"fold: {report.folded} BatchNorm(s) folded, {report.left} left; {sum('branches → 1 Conv' in n for n in report.notes)} block(s) merged")
    print(f"nodes: original {ops(model)}  merged {ops(merged)}")
    check = verify_onnx(model, merged)
    worst = max(o.max_rel_to_scale for outs in check.outputs.values() for o in outs)
    print(f"verify (ORT_DISABLE_ALL): {'pass' if check.passed else 'FAIL'}, max error / scale {worst:.2g}")
    cmd = [shutil.which("bnfold") or "bnfold", "bench", str(original), str(folded), "--repeats", str(args.repeats), "-q"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ " + " ".join(["bnfold", *cmd[1:]]), flush=True)
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    main()
