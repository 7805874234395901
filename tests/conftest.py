"""Shared fixtures: small models are generated at test time, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings

from tests.onnx.helpers import conv_bn_relu

# Deterministic property tests in CI: the same examples every run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """`tmp_path/model.onnx`: input → Conv → BatchNormalization → Relu → output (seed 1), one foldable BN."""
    p = tmp_path / "model.onnx"
    onnx.save(conv_bn_relu(np.random.default_rng(1)), p)
    return p
