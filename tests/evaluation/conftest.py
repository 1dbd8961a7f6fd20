"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest
from hostcheck import HostState


@pytest.fixture
def host() -> HostState:
    """A snapshot of the host before the test; `host.leftovers()` afterwards must be empty."""
    return HostState()
