"""bnfold on public architectures: timm and torchvision models, three ONNX exporters and `fold_torch`.

Why: the project's own samples are what we made; this measures what users have. Every model is built
with ``pretrained=False`` (nothing is downloaded) and given trained-like BatchNorm statistics by
`sample_models.deep.trained_like` (running statistics calibrated in train mode on random batches, then
variances redrawn log-uniform down to 1e-8, about a quarter of the γ negative, means shifted, γ/β
adjusted so that the outputs stay finite). Each model is then

* exported three ways: TorchScript (``dynamo=False, do_constant_folding=False``, eval), dynamo with its
  default optimiser (which fuses plain Conv+BN itself), dynamo with ``optimize=False``; the dynamo export
  is done once and optimised afterwards (``ONNXProgram.optimize()``, what ``optimize=True`` runs);
* folded with the default command's call, ``bnfold.onnx.api.fold_file(src, out, verify=True)`` (what
  ``bnfold IN -o OUT`` runs): BatchNorms in the export, folded, left by reason code, the verification's
  verdict (the fold's error against the model's own measured noise) and the fold's seconds;
* folded in PyTorch with ``bnfold.fold_torch``: BatchNorm calls counted at the dispatch level (aten
  ``batch_norm`` ops that run) before and after, and the check's verdict.

Needs an environment with torch, timm, torchvision, onnx, onnxruntime and onnxscript (not the test
suite's). Prints the machine and configuration, a Markdown table and totals. An exporter that fails is
recorded as such and skipped.

    python benchmarks/real_models.py                         # every model
    python benchmarks/real_models.py --models resnet18,levit_128s --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sample_models import deep  # noqa: E402

# name -> (builder, input side). LeViT's attention biases are sized for 224; the rest run at 96.
SIDE = 96


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return build


class _Conv(nn.Module):
    """ultralytics' Conv: Conv2d (no bias) → BatchNorm2d → SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _C2f(nn.Module):
    """ultralytics' C2f: 1x1 conv, split in two, a chain of bottlenecks on one half, concat, 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = _Conv(cin, 2 * self.c)
        self.cv2 = _Conv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(nn.Sequential(_Conv(self.c, self.c, 3), _Conv(self.c, self.c, 3)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class _SPPF(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = _Conv(c, c // 2)
        self.cv2 = _Conv(c * 2, c)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class YoloV8n(nn.Module):
    """An ultralytics-YOLOv8n-style network built here (ultralytics is not installed; nothing downloaded):
    Conv/C2f backbone, SPPF, FPN-PAN neck, decoupled Detect head (box DFL logits and class logits, raw
    convolution outputs, i.e. unbounded)."""

    def __init__(self, nc: int = 80, w: int = 16) -> None:
        super().__init__()
        self.b0, self.b1, self.b2 = _Conv(3, w, 3, 2), _Conv(w, 2 * w, 3, 2), _C2f(2 * w, 2 * w)
        self.b3, self.b4 = _Conv(2 * w, 4 * w, 3, 2), _C2f(4 * w, 4 * w, 2)
        self.b5, self.b6 = _Conv(4 * w, 8 * w, 3, 2), _C2f(8 * w, 8 * w, 2)
        self.b7, self.b8, self.b9 = _Conv(8 * w, 16 * w, 3, 2), _C2f(16 * w, 16 * w), _SPPF(16 * w)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.n12, self.n15 = _C2f(24 * w, 8 * w), _C2f(12 * w, 4 * w)
        self.n16, self.n18 = _Conv(4 * w, 4 * w, 3, 2), _C2f(12 * w, 8 * w)
        self.n19, self.n21 = _Conv(8 * w, 8 * w, 3, 2), _C2f(24 * w, 16 * w)
        chs = (4 * w, 8 * w, 16 * w)
        c2, c3 = max(16, chs[0] // 4, 64), max(chs[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(_Conv(c, c2, 3), _Conv(c2, c2, 3), nn.Conv2d(c2, 64, 1)) for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(_Conv(c, c3, 3), _Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        n4 = self.n12(torch.cat((self.up(p5), p4), 1))
        n3 = self.n15(torch.cat((self.up(n4), p3), 1))
        n4 = self.n18(torch.cat((self.n16(n3), n4), 1))
        n5 = self.n21(torch.cat((self.n19(n4), p5), 1))
        outs = [torch.cat((b(f), c(f)), 1).flatten(2) for f, b, c in zip((n3, n4, n5), self.box, self.cls)]
        return torch.cat(outs, 2)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (_timm("resnet18"), SIDE),
    "efficientnet_b0": (_timm("efficientnet_b0"), SIDE),
    "mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), SIDE),
    "mixnet_s": (_timm("mixnet_s"), SIDE),
    "levit_128s": (_timm("levit_128s"), 224),
    "rexnet_100": (_timm("rexnet_100"), SIDE),
    "repvgg_a0": (_timm("repvgg_a0"), SIDE),
    "mobileone_s0": (_timm("mobileone_s0"), SIDE),
    "fastvit_t8": (_timm("fastvit_t8"), SIDE),
    "regnety_002": (_timm("regnety_002"), SIDE),
    "cspresnet50": (_timm("cspresnet50"), SIDE),
    "densenet121": (_timm("densenet121"), SIDE),
    "tv_resnet50": (_tv("resnet50"), SIDE),
    "tv_mobilenet_v2": (_tv("mobilenet_v2"), SIDE),
    "tv_shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), SIDE),
    "tv_googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), SIDE),
    "yolov8n_style": (YoloV8n, 128),
}
# More architectures, run with ``--models extra`` (or by name): reparameterisable blocks (RepGhost, RepViT),
# BatchNorm inside attention (EfficientFormer, EfficientViT-MSRA, LeViT's conv variant), ghost modules,
# multi-branch/multi-scale (HRNet, DLA, Res2Net, VoVNet), MobileViT, MobileNetV4, HGNetV2.
EXTRA: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "ghostnet_100": (_timm("ghostnet_100"), SIDE),
    "repghostnet_050": (_timm("repghostnet_050"), SIDE),
    "repvit_m0_9": (_timm("repvit_m0_9"), 224),
    "efficientformer_l1": (_timm("efficientformer_l1"), 224),
    "efficientvit_m0": (_timm("efficientvit_m0"), 224),
    "efficientvit_b0": (_timm("efficientvit_b0"), 128),
    "levit_conv_128s": (_timm("levit_conv_128s"), 224),
    "mobilevit_xxs": (_timm("mobilevit_xxs"), 128),
    "mobilenetv4_conv_small": (_timm("mobilenetv4_conv_small"), SIDE),
    "hgnetv2_b0": (_timm("hgnetv2_b0"), SIDE),
    "ese_vovnet19b_dw": (_timm("ese_vovnet19b_dw"), SIDE),
    "dla34": (_timm("dla34"), SIDE),
    "hrnet_w18_small": (_timm("hrnet_w18_small"), SIDE),
    "res2net50_14w_8s": (_timm("res2net50_14w_8s"), SIDE),
    "lcnet_050": (_timm("lcnet_050"), SIDE),
}
ALL = {**MODELS, **EXTRA}
EXPORTERS = ("torchscript", "dynamo", "dynamo-noopt")


@dataclass
class OnnxRow:
    model: str
    exporter: str
    bns: int = 0
    folded: int = 0
    left: dict[str, int] = field(default_factory=dict)
    verdict: str = ""  # "pass" | "FAIL" | "export failed" | "fold error"
    fold_error: float = 0.0  # worst output's, relative to scale
    noise: float = 0.0
    seconds: float = 0.0
    detail: str = ""
    left_nodes: list[str] = field(default_factory=list)


@dataclass
class TorchRow:
    model: str
    calls_before: int = 0
    calls_after: int = 0
    report_found: int = 0
    report_left: int = 0
    left: dict[str, int] = field(default_factory=dict)
    verdict: str = ""
    seconds: float = 0.0
    detail: str = ""


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model with trained-like statistics (calibrated at its own input size), eval mode, and an input."""
    make, side = ALL[name]
    torch.manual_seed(seed)
    net = make()
    shape = (1, 3, side, side)
    saved = deep.INPUT_SHAPE
    deep.INPUT_SHAPE = shape  # trained_like calibrates on batches of this shape
    try:
        deep.trained_like(net, seed, batches=2, batch_size=4)
    finally:
        deep.INPUT_SHAPE = saved
    return net.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def count_bn_nodes(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs and its local functions."""

    def walk(graph: onnx.GraphProto) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == "BatchNormalization"
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += walk(a.g)
                n += sum(walk(g) for g in a.graphs)
        return n

    return walk(model.graph) + sum(sum(n.op_type == "BatchNormalization" for n in f.node) for f in model.functions)


def export(net: nn.Module, x: torch.Tensor, folder: Path) -> dict[str, Path | str]:
    """Each exporter's file, or the first line of its failure."""
    out: dict[str, Path | str] = {}
    try:
        out["torchscript"] = deep.export_torchscript(net, x, folder / "ts.onnx")
    except Exception as exc:  # noqa: BLE001 - a failing exporter is a result
        out["torchscript"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False, input_names=["input"])
            prog.save(str(folder / "dn.onnx"))
            out["dynamo-noopt"] = folder / "dn.onnx"
            prog.optimize()
            prog.save(str(folder / "d.onnx"))
            out["dynamo"] = folder / "d.onnx"
    except Exception as exc:  # noqa: BLE001
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        out.setdefault("dynamo-noopt", msg)
        out.setdefault("dynamo", msg)
    finally:
        quiet.setLevel(level)
    return out


def fold_onnx(name: str, exporter: str, src: Path | str, folder: Path) -> OnnxRow:
    from bnfold.onnx.api import fold_file
    from bnfold.report import Status
    from bnfold.verify import NotEquivalent

    row = OnnxRow(name, exporter)
    if isinstance(src, str):
        row.verdict, row.detail = "export failed", src
        return row
    row.bns = count_bn_nodes(onnx.load(str(src), load_external_data=False))
    start = time.perf_counter()
    try:
        report = fold_file(src, folder / f"{exporter}.folded.onnx", verify=True)
        verification, row.verdict = report.verification, "pass"
    except NotEquivalent as exc:
        report, verification, row.verdict = exc.report, exc.verification, "FAIL"
    except Exception as exc:  # noqa: BLE001
        row.seconds = time.perf_counter() - start
        row.verdict, row.detail = "fold error", f"{type(exc).__name__}: {exc}"[:300]
        return row
    row.seconds = time.perf_counter() - start
    row.folded = report.folded
    for c in report.candidates:
        if c.status is Status.SKIPPED and report._bn_count(c):
            code = c.reasons[0].code.value if c.reasons else "none"
            row.left[code] = row.left.get(code, 0) + report._bn_count(c)
            row.left_nodes.append(c.describe())
    if report.found != row.bns:
        row.detail += f"report found {report.found} BN, file has {row.bns}; "
    outs = [o for os_ in verification.outputs.values() for o in os_] if verification is not None else []
    if outs:
        worst = max(outs, key=lambda o: o.fold_error / o.allowed if o.allowed else 0.0)
        row.fold_error, row.noise = worst.fold_error, worst.noise
        if not verification.passed:
            row.detail += "; ".join(f"{o.name}: {o.words()}" for o in outs if not o.passed)
    return row


class _CountBN(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten batch-norm ops that actually run (independent of bnfold's own report)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if "batch_norm" in func.__name__:
            self.count += 1
        return func(*args, **(kwargs or {}))


def bn_calls(net: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), _CountBN() as mode:
        net(x)
    return mode.count


def fold_in_torch(name: str, net: nn.Module, x: torch.Tensor) -> TorchRow:
    from bnfold import fold_torch
    from bnfold.report import Status

    row = TorchRow(name, calls_before=bn_calls(net, x))
    start = time.perf_counter()
    try:
        folded, report = fold_torch(net, (x,))
    except Exception as exc:  # noqa: BLE001
        row.seconds = time.perf_counter() - start
        row.verdict, row.detail = type(exc).__name__, str(exc)[:300]
        return row
    row.seconds = time.perf_counter() - start
    row.verdict = "pass"
    row.report_found, row.report_left = report.found, report.left
    row.calls_after = bn_calls(folded, x)
    for c in report.candidates:
        if c.status is Status.SKIPPED:
            code = c.reasons[0].code.value if c.reasons else "none"
            row.left[code] = row.left.get(code, 0) + report._bn_count(c)
    if row.report_found != row.calls_before or row.report_left != row.calls_after:
        row.detail = f"report says {row.report_found} found/{row.report_left} left, dispatch counts {row.calls_before}/{row.calls_after}"
    return row


def run_model(name: str, exporters: tuple[str, ...], torch_too: bool, seed: int = 0) -> tuple[list[OnnxRow], TorchRow | None]:
    net, x = build(name, seed)
    rows: list[OnnxRow] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-real-") as tmp:
        files = export(net, x, Path(tmp))
        for e in exporters:
            rows.append(fold_onnx(name, e, files[e], Path(tmp)))
    trow = fold_in_torch(name, net, x) if torch_too else None
    return rows, trow


def _left(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "—"


def print_tables(rows: list[OnnxRow], trows: list[TorchRow], wall: float, seed: int = 0) -> None:
    import onnxruntime

    sides = {m: ALL[m][1] for m in dict.fromkeys(r.model for r in rows) if ALL[m][1] != SIDE}
    others = f" ({', '.join(f'{m} {s}' for m, s in sides.items())})" if sides else ""
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"python {platform.python_version()}, torch {torch.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; timm/torchvision with pretrained=False, trained-like BN statistics "
          f"(sample_models.deep.trained_like, seed {seed}); input 1×3×{SIDE}×{SIDE}{others}; wall {wall:.0f} s\n")
    print("| model | exporter | BNs | folded | left (reason: count) | verify | fold err / noise | fold s |")
    print("|---|---|---:|---:|---|---|---|---:|")
    for r in rows:
        err = f"{r.fold_error:.1e} / {r.noise:.1e}" if r.verdict in ("pass", "FAIL") else r.detail[:60]
        print(f"| {r.model} | {r.exporter} | {r.bns} | {r.folded} | {_left(r.left)} | {r.verdict} | {err} | {r.seconds:.1f} |")
    print("\nTotals per exporter:")
    for e in EXPORTERS:
        sel = [r for r in rows if r.exporter == e and r.verdict in ("pass", "FAIL")]
        if not sel and not any(r.exporter == e for r in rows):
            continue
        left: collections.Counter[str] = collections.Counter()
        for r in sel:
            left.update(r.left)
        failed = [r.model for r in rows if r.exporter == e and r.verdict not in ("pass",)]
        print(f"- {e}: {sum(r.bns for r in sel)} BNs, {sum(r.folded for r in sel)} removed, "
              f"{sum(left.values())} left ({_left(dict(left))}); verify pass {sum(r.verdict == 'pass' for r in sel)}"
              f"/{len([r for r in rows if r.exporter == e])}" + (f"; not pass: {', '.join(failed)}" if failed else ""))
    if trows:
        print("\n| model | fold_torch BN calls before → after | report found/left | left (reason: count) | check | s |")
        print("|---|---|---|---|---|---:|")
        for t in trows:
            print(f"| {t.model} | {t.calls_before} → {t.calls_after} | {t.report_found}/{t.report_left} | {_left(t.left)} | "
                  f"{t.verdict}{' — ' + t.detail[:80] if t.detail else ''} | {t.seconds:.1f} |")
        left = collections.Counter()
        for t in trows:
            left.update(t.left)
        print(f"- fold_torch: {sum(t.calls_before for t in trows)} BN calls → {sum(t.calls_after for t in trows)} "
              f"({_left(dict(left))}); check pass {sum(t.verdict == 'pass' for t in trows)}/{len(trows)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated names, or 'extra' for the EXTRA list, 'all' for both; default: " + ", ".join(MODELS)
                    + "; extra: " + ", ".join(EXTRA))
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    ap.add_argument("--no-torch", action="store_true", help="skip fold_torch")
    ap.add_argument("--seed", type=int, default=0, help="weights, statistics and inputs (default 0)")
    ap.add_argument("--json", help="also write every row (and each BN left) to this file")
    ap.add_argument("--show-left", action="store_true", help="print every BN left, with its reason")
    args = ap.parse_args(argv)
    groups = {"extra": list(EXTRA), "all": list(ALL)}
    names = [n for m in args.models.split(",") if m for n in groups.get(m, [m])]
    unknown = [m for m in names if m not in ALL]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    exporters = tuple(e for e in args.exporters.split(",") if e)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    rows: list[OnnxRow] = []
    trows: list[TorchRow] = []
    for name in names:
        t0 = time.perf_counter()
        try:
            r, t = run_model(name, exporters, not args.no_torch, args.seed)
        except Exception:  # noqa: BLE001
            print(f"{name}: failed to build\n{traceback.format_exc()}", file=sys.stderr)
            continue
        rows.extend(r)
        if t is not None:
            trows.append(t)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print_tables(rows, trows, time.perf_counter() - start, args.seed)
    if args.show_left:
        for r in rows:
            for line in r.left_nodes:
                print(f"  {r.model}/{r.exporter}: {line}")
            if r.detail:
                print(f"  {r.model}/{r.exporter}: {r.detail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"onnx": [asdict(r) for r in rows], "torch": [asdict(t) for t in trows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
