"""Shared fixtures: small models are generated at test time, never downloaded."""

from __future__ import annotations

import os

from hypothesis import settings

# Deterministic property tests in CI: the same examples every run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
