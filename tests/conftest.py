"""Shared pytest fixtures."""
from __future__ import annotations

import pytest

from tests.fixtures.tiny_artifact import build_tiny_artifact


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """Path of a valid 3-member, 2-class tiny artifact (read-only: copy it before mutating)."""
    return build_tiny_artifact(tmp_path_factory.mktemp("models"))
