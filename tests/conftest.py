"""Shared pytest fixtures."""
from __future__ import annotations

import os

import pytest

from tests.fixtures.tiny_artifact import build_tiny_artifact

# Exports in tests record an OOD reference from 8 frames, not 200 (trainer/model/export.py).
os.environ.setdefault("ELIT_REFERENCE_FRAMES", "8")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """Path of a valid 3-member, 2-class tiny artifact (read-only: copy it before mutating)."""
    return build_tiny_artifact(tmp_path_factory.mktemp("models"))
