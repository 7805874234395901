"""Where the repository's own files are, for tests that read them (plain constants: some are used at collection time)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
RESNET = SAMPLES / "resnet_tiny.onnx"
